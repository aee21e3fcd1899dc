"""``memaudit run`` as a function: plan, load the model, run the units on an engine, finalize."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import datetime as dt
from pathlib import Path
import sys
import time
from typing import Callable

from audit.errors import ModelError, RunError
from audit.pipeline import (Plan, RunConfig, build_plan, finalize, prepare_out_dir, prepare_unit,
                            process_unit, run_identity, unit_done, default_out_dir)

ENGINES = ("local", "ray")


def default_model() -> str:
    """The bundled lab model folder (``audit/lab/model``), used when ``--model`` is not given.

    Raises:
        audit.errors.ModelError: the package was installed without the lab model.
    """
    try:
        from audit.lab import LAB_MODEL_DIR
    except ImportError:
        LAB_MODEL_DIR = None
    if LAB_MODEL_DIR is None or not Path(LAB_MODEL_DIR, "model_index.json").exists():
        raise ModelError("no --model given and no bundled lab model in this install: pass --model "
                         "(a hub id such as CompVis/stable-diffusion-v1-4, or a local diffusers folder)")
    return str(LAB_MODEL_DIR)


def model_info(model) -> dict:
    """Identity of a loaded model for manifests and Parquet metadata."""
    return {"name": model.name, "fingerprint": model.fingerprint, "path": str(model.path),
            "device": str(model.device), "dtype": str(model.dtype).replace("torch.", "")}


def validate_config(cfg: RunConfig) -> None:
    """Check every option that needs no input or model, so that a typo fails at once, in one line.

    Raises:
        RunError: naming the option and what it accepts.
    """
    import re

    from audit.scorers import get_scorer

    if cfg.engine not in ENGINES:
        raise RunError(f"--engine {cfg.engine}: choose one of {', '.join(ENGINES)}")
    get_scorer(cfg.scorer)  # RunError naming the scorers, with a did-you-mean
    if cfg.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise RunError(f"--dtype {cfg.dtype}: choose auto, float32, float16 or bfloat16")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise RunError(f"--device {cfg.device}: choose auto, cpu, cuda or cuda:N")
    if cfg.noise_draws < 1:
        raise RunError("--noise-draws must be at least 1")
    if cfg.batch_size != "auto" and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise RunError(f"--batch-size {cfg.batch_size}: give a positive integer or auto")
    if cfg.unit_rows < 1:
        raise RunError("--unit-rows must be at least 1")
    if cfg.limit is not None and cfg.limit < 0:
        raise RunError("--limit must be 0 or more")
    if cfg.stall_timeout is not None and cfg.stall_timeout < 0:
        raise RunError("--stall-timeout must be 0 (never) or more seconds")
    if cfg.workers is not None and cfg.workers < 1:
        raise RunError("--workers must be at least 1")
    if cfg.layers is not None and not all(cfg.layers):
        raise RunError("--layers: give cross-attention module paths, comma separated")


def score_config_for(cfg: RunConfig, model):
    """The :class:`audit.scorers.ScoreConfig` of a run (layers default to the model's default)."""
    from audit.scorers import ScoreConfig

    layers = tuple(cfg.layers) if cfg.layers else tuple(model.default_layers)
    return ScoreConfig(scorer=cfg.scorer, layers=layers, noise_draws=cfg.noise_draws, seed=cfg.seed,
                       dtype=str(model.dtype).replace("torch.", ""))


def run_local(units, scorer, cfg: RunConfig, shard_dir: Path, progress: Callable[[int], None]) -> list:
    """The local engine: units one after another in this process; the next unit is read while the
    model scores the current one."""
    from audit.faults import run_unit_with_retries

    stats = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="memaudit-read") as pool:
        nxt = pool.submit(prepare_unit, units[0], cfg) if units else None
        for i, unit in enumerate(units):
            prepared = nxt.result()
            nxt = pool.submit(prepare_unit, units[i + 1], cfg) if i + 1 < len(units) else None
            first = [prepared]  # consumed by the first attempt; a retry reads the unit again

            def attempt(unit=unit):
                prep, first[0] = first[0], None
                return process_unit(unit, scorer, cfg, shard_dir, progress=progress, prepared=prep)

            stats.append(run_unit_with_retries(attempt, unit))
    return stats


class _Progress:
    """A rich progress bar (rows, prompts/s, ETA) on a terminal; silent otherwise."""

    def __init__(self, total: int, enabled: bool | None):
        from rich.console import Console

        console = Console(stderr=True)
        self.enabled = console.is_terminal if enabled is None else enabled
        self.bar = None
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                                TaskProgressColumn(), TextColumn("{task.fields[rate]} prompts/s"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("scoring", total=total, rate="-")
            self.t0 = time.perf_counter()
            self.done = 0

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        if self.bar:
            self.done += n
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:,.0f}")


def execute(cfg: RunConfig, progress: bool | None = None, log: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Run an audit end to end; returns ``(run folder, manifest)``.

    Raises:
        audit.sources.SourceError, audit.errors.ModelError, RunError: bad inputs, model or run folder.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    validate_config(cfg)
    plan: Plan = build_plan(cfg)
    from audit.calibrate import calibration_for_run, check_calibration

    calibration = calibration_for_run(cfg)
    from audit.models import load_model
    from audit.scorers import Scorer

    model_arg = cfg.model
    if model_arg is None:
        model_arg = default_model()
        log(f"memaudit: no --model given: auditing the bundled lab model ({model_arg})")
    if cfg.engine == "local":
        ignored = [flag for flag, value in (("--workers", cfg.workers), ("--address", cfg.address)) if value]
        if ignored:
            verb = "applies" if len(ignored) == 1 else "apply"
            log(f"memaudit: {' and '.join(ignored)} {verb} to --engine ray only; ignored with --engine local")
    model = load_model(model_arg, cfg.device, cfg.dtype)
    score_config = score_config_for(cfg, model)
    scorer = Scorer(model, score_config, compile=cfg.compile and cfg.engine == "local")
    if cfg.compile and model.device.type == "cpu":
        log("memaudit: --compile on CPU was measured slower than eager (0.6-0.8x, docs/gpu.md); it pays, if at "
            "all, on GPUs")
    info = model_info(model)
    sc = score_config.to_dict() | {"first_timestep": scorer.first_timestep}
    if calibration is not None:
        check_calibration(calibration, info, sc)
    out = Path(cfg.out) if cfg.out else default_out_dir()
    shard_dir = prepare_out_dir(out, run_identity(cfg, plan, info, sc))
    todo = [u for u in plan.units if not unit_done(shard_dir, u)]
    resumed = len(plan.units) - len(todo)
    if resumed:
        log(f"memaudit: resuming {out}: {resumed} of {len(plan.units)} units already done")
    with _Progress(sum(u.rows for u in todo), progress) as bar:
        if cfg.engine == "local":
            from audit.faults import StallWatchdog

            with StallWatchdog(cfg.stall_timeout, "the run") as watchdog:
                run_local(todo, scorer, cfg, shard_dir, watchdog.wrap(bar.advance))
        else:
            from audit.ray_engine import run_ray

            run_ray(todo, cfg, shard_dir, bar.advance, model_arg=model_arg, score_config=score_config,
                    fingerprint=info["fingerprint"])
    manifest = finalize(out, shard_dir, plan, cfg, info, sc, started, started_at,
                        extra_manifest={"engine": cfg.engine, "units": {"total": len(plan.units),
                                                                         "resumed": resumed}},
                        calibration=calibration)
    return out, manifest
