"""``memaudit generate``: images with first-step detection and optional mitigation, resumable.

For each prompt, one pipeline call makes ``--seeds`` images (seed s draws its initial latent from a CPU
``torch.Generator`` seeded with s, so an image does not depend on the device or on the other seeds).
The call runs inside :class:`audit.mitigation.detect.DetectAndMitigate`: the first step's unmitigated
cross-attention gives each image's risk (attention entropy, as ``memaudit run`` scores; no extra forward),
a calibration gives the flag, and ``--mitigate`` says which images get the inference-time rule
(off: none; always: all, from step 0; flagged: flagged images, from step 1). With ``always`` there is no
unmitigated first step, so ``risk`` and ``flagged`` are null; so are they for an image whose first-step entropy is
not finite, which ``--mitigate flagged`` mitigates (fail closed).

Output folder::

    generate.json          the options (a rerun with other options is refused)
    images/PPPPPPPP_sS.png one image per prompt index P and seed S
    parts/PPPPPPPP.parquet the rows of one prompt (written atomically after its images: resume points)
    parts/PPPPPPPP.failed.parquet  the reject rows of a prompt whose generation failed (tried again on a rerun)
    generations.parquet    all rows in prompt order (schemas/generations.json), written at the end
    summary.json           counts and throughput

Every prompt x seed is exactly one row: an image row, or a reject row with the reason. A rerun with the
same options (the prompts file and model may be named by other paths) skips the prompts whose part exists;
one process writes a folder at a time (:func:`audit.pipeline.out_lock`). Bad options, an unsupported model
family, ``--mitigate flagged`` without a calibration made for this model, or a calibration naming layers the
model lacks stop the command before any image, with one line and exit code 2.

Registered through ``audit.cli.COMMAND_MODULES`` (its :func:`register`), or
with ``app.command("generate")(generate)``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
import time
from typing import Optional

import typer

from audit.config import MAX_SEEDS  # (images per prompt; the lab's mitigation command shares the bound)
from audit.text import visible

MODES = ("off", "always", "flagged")
SCHEMA_NAME = "generations"



from audit.errors import GenerateError  # noqa: E402  (re-exported: callers catch it from here too)


# --- table schema ---------------------------------------------------------------------------------
def arrow_schema():
    """The pyarrow schema of ``generations.parquet`` (``schemas/generations.json``)."""
    from audit.tables import arrow_schema as table_schema

    return table_schema(SCHEMA_NAME)


def _write_table_atomic(rows: list[dict], path: Path, metadata: dict | None = None) -> None:
    """Check ``rows`` against the schema and write them as Parquet to ``path`` atomically."""
    import pyarrow as pa

    from audit.tables import write_parquet_atomic

    write_parquet_atomic(pa.Table.from_pylist(rows, schema=arrow_schema()), path, SCHEMA_NAME, metadata=metadata)


def _write_json_atomic(obj, path: Path) -> None:
    from audit.tables import write_json_atomic

    write_json_atomic(obj, path)


# --- inputs ---------------------------------------------------------------------------------------
def read_prompts(path: Path, prompt_column: str = "prompt") -> list[tuple[str | None, str | None]]:
    """``[(prompt, reject_reason)]`` per input row: TXT (one prompt a line) or Parquet / CSV / JSONL with
    ``prompt_column``, read by ``memaudit run``'s reader (:func:`_table_values`), so that a file's rows and their
    reasons are the run's (a rejected row keeps the text the run's rejects keep). Prompts are NFC-normalized and
    stripped; empty (or invisible only: :func:`audit.sources.is_blank`), null and non-string prompts get a reason
    (and keep their row).

    Raises:
        GenerateError: missing file, a folder, unknown format, or no row with the prompt column (a table or JSON
            lines: the message lists the columns found).
    """
    from audit.sources import is_blank, normalize_prompt

    path = Path(path)
    if path.is_dir():  # (memaudit run reads a folder's files; generate one file)
        raise GenerateError(f"PROMPTS {path} is a folder: give one prompts file (.txt, .parquet, .csv or .jsonl)")
    if not path.is_file():
        raise GenerateError(f"PROMPTS {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".ndjson", ".parquet", ".csv"):
        raise GenerateError(f"PROMPTS {path}: unknown format {suffix or '(none)'}; use .txt, .parquet, .csv or .jsonl")
    if path.stat().st_size == 0:  # as `memaudit run`: an empty file holds no rows (a CSV reader would refuse it)
        values = []
    else:
        values = _table_values(path, prompt_column)
    out = []
    for v in values:
        if isinstance(v, _Invalid):
            out.append((v.text, v.reason))
        elif v is None:
            out.append((None, "null_prompt"))
        elif not isinstance(v, str):
            out.append((str(v), f"prompt_not_string:{type(v).__name__}"))
        else:
            p = normalize_prompt(v)
            out.append((p, "empty_prompt") if is_blank(p) else (p, None))
    return out


def _table_values(path: Path, prompt_column: str) -> list:
    """The prompt values of a file, read by ``memaudit run``'s own reader (:mod:`audit.sources`): the same rows
    and the same per-row reasons (a row whose bytes are not UTF-8 is one ``invalid_utf8`` row, not a failed file;
    a CSV cell is text: ``1984`` is a prompt; a JSON line that is no object is ``invalid_json``), each reason as an
    :class:`_Invalid` keeping the text the run's rejects keep.

    Raises:
        GenerateError: the file cannot be read, or has no ``prompt_column`` (the message lists its columns).
    """
    from audit.errors import SourceError
    from audit.sources import NOTHING_TO_SKIP_HINT, SKIP_BAD_FILES_HINT, discover, plan_units, read_unit

    try:
        files, _ = discover([str(path)])
        plan = plan_units(files, prompt_column, unit_rows=1 << 40)
        values = []
        for unit in plan.units:
            for batch in read_unit(unit, prompt_column):
                # (generations.parquet has no detail column: invalid_json's "why" after its colon is left out)
                values += [_Invalid(err.split(":", 1)[0] if err.startswith(("invalid_json:", "invalid_utf8:")) else err,
                                    prompt if isinstance(prompt, str) else None) if err else prompt
                           for prompt, err in zip(batch.prompts, batch.errors)]
    except SourceError as exc:  # (generate has no --skip-bad-files: the reader's hint for `memaudit run` goes)
        reason = str(exc).removesuffix(SKIP_BAD_FILES_HINT).removesuffix(NOTHING_TO_SKIP_HINT)
        for name in (str(path.absolute()), str(path)):  # the reader names the file too: named once
            reason = reason.removeprefix(f"{name}: ")
        raise GenerateError(f"PROMPTS {path}: {reason}") from None
    return values


class _Invalid:
    """An input row without a usable prompt value: its reason, and the text its row keeps (None: none)."""

    def __init__(self, reason: str, text: str | None = None):
        self.reason, self.text = reason, text


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _vae_fingerprint(root: Path) -> str | None:
    """The fingerprint of ``root/vae`` (:func:`audit.models.base.fingerprint_files` of that one component): the
    model fingerprint covers what scores, not the decoder, and a resumed generation must decode with one VAE.
    None without a ``vae/`` folder (a pipeline built by the caller)."""
    from audit.models.base import fingerprint_files

    return fingerprint_files(Path(root), ("vae",), settings=False) if (Path(root) / "vae").is_dir() else None


# --- the pipeline -----------------------------------------------------------------------------------
def build_pipeline(model: str, device: str = "auto", dtype: str = "auto"):
    """``(pipe, loaded)``: a ``StableDiffusionPipeline`` from memaudit's loader plus the model's VAE, sampling with
    the scheduler ``memaudit run``'s attention_entropy scores the first step with (the family adapter's
    :meth:`audit.models.base.ModelAdapter.scheduler`): DDIM from the model's scheduler config for SD 1.x (Ren et
    al.'s sampler), the class the folder names for SD 2.x (SD 2.0: Euler), so that a calibration of the folder
    has the generation's first timestep; no safety checker. ``loaded`` is :class:`audit.models.LoadedModel`
    (name, fingerprint, default layers).

    Raises:
        audit.errors.ModelError: unloadable model; GenerateError: a pipeline class other than
        ``StableDiffusionPipeline`` in ``model_index.json`` (SDXL, PixArt, SD 3.x: before anything is loaded), no
        ``vae/`` with safetensors weights.
    """
    from audit.lab import LAB_MODEL_DIR
    from audit.models.base import read_extra, read_json, resolve_model_dir
    from audit.runner import model_argument

    model = model_argument(model)  # "lab": the bundled lab model, as `memaudit run` reads it
    # the folder only (from the hub with the VAE's weights): the refusals below come before any file is hashed or loaded
    _, root = resolve_model_dir(model, vae=True)
    extra = read_extra(root)
    if root.resolve() == LAB_MODEL_DIR.resolve():
        raise GenerateError(f"--model {model}: the bundled lab model has no VAE (it denoises 16x16 pixels) and its UNet "
                            "takes an attention mask the pipeline does not pass; `memaudit lab mitigation` samples it "
                            "with its own loop. generate needs a Stable Diffusion 1.x/2.x folder with vae/")
    index = root / "model_index.json"
    declared = read_json(index).get("_class_name") if index.is_file() else None
    if declared not in (None, "StableDiffusionPipeline"):  # before the weights are hashed and loaded
        raise GenerateError(f"--model {model}: model_index.json declares {declared}; generate makes images with "
                            "StableDiffusionPipeline, for Stable Diffusion 1.x/2.x folders only (the mitigation is "
                            "defined for their UNet with one CLIP text encoder)")
    if extra.get("unet_encoder_attention_mask"):
        raise GenerateError(f"--model {model} declares a UNet encoder attention mask "
                            f"({extra['unet_encoder_attention_mask']}) that StableDiffusionPipeline does not pass; "
                            "sample such a model with its own loop (Mitigation.set_prompts works on direct UNet calls)")
    vae_dir = root / "vae"
    if not vae_dir.is_dir():
        raise GenerateError(f"--model {model}: no vae/ folder with .safetensors weights; generate decodes images "
                            "with the model's VAE")
    from audit.models.base import no_safetensors_error

    if (error := no_safetensors_error(model, root, "vae")) is not None:  # pickled only: how to convert it
        raise GenerateError(f"{error}; generate decodes images with the model's VAE")
    latent = {comp: read_json(root / comp / "config.json").get(key) if (root / comp / "config.json").is_file() else None
              for comp, key in (("vae", "latent_channels"), ("unet", "in_channels"))}
    if None not in latent.values() and latent["vae"] != latent["unet"]:  # else every prompt fails at its first image
        raise GenerateError(f"--model {model}: its VAE makes latents of {latent['vae']} channels and its UNet takes "
                            f"{latent['unet']}; generate needs the two of one Stable Diffusion model")
    from audit.models import load_model

    loaded = load_model(model, device=device, dtype=dtype)
    # imported after the loader quieted transformers' logging (the pipeline module imports its image processors,
    # which warned that torchvision is missing: generate decodes with the VAE and uses no image processor)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from audit.models.base import cannot_load, load_weights

    try:
        vae = load_weights(model, root, "vae", AutoencoderKL, loaded.dtype)
    except Exception as exc:
        raise cannot_load(model, root, exc) from exc
    vae.to(loaded.device).eval().requires_grad_(False)
    from audit.models import adapter_of

    sampler = type(adapter_of(loaded).scheduler(loaded.scheduler_config, 1))  # ModelError: a class it does not take
    # StableDiffusionPipeline sets clip_sample to False whatever the config says, printing a 25-line FutureWarning when
    # it was true, as DDIM's default is for a config without it (a PNDM or Euler config saved by diffusers): set here
    scheduler = sampler.from_config(loaded.scheduler_config, **({"clip_sample": False} if sampler is DDIMScheduler
                                                                 else {}))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=loaded.text_encoder, tokenizer=loaded.tokenizer, unet=loaded.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, loaded


def run_generate(prompts: Path, model: str, out: Path, mitigate: str = "off", calibration: Path | None = None,
                 seeds: int = 1, steps: int = 50, guidance: float = 7.5, c1: float = 1.25, mask_eos: bool = False,
                 device: str = "auto", dtype: str = "auto", prompt_column: str = "prompt",
                 progress: bool | None = None, log=None, _pipeline=None) -> dict:
    """Generate images for every prompt x seed; see the module docstring. Returns the summary dict.

    ``progress``: a progress bar on stderr (None: only when stderr is a terminal). ``log``: called with one line
    for notes (default: stderr). ``_pipeline``: ``(pipe, loaded)`` already built
    (tests), instead of loading ``model``.

    Raises:
        GenerateError, audit.mitigation.MitigationError, audit.errors.ModelError,
        audit.calibrate.CalibrationError: before any image is generated.
    """
    import torch

    from audit.mitigation.detect import (DetectAndMitigate, check_detection_calibration, detection_scored_with,
                                         generation_rows, settings_warning)
    from audit.mitigation.inference import MitigationRule, check_pipeline

    log = log or (lambda msg: typer.echo(visible(msg), err=True))  # names files found in --out: untrusted

    # options first (cheap), then the model
    if not str(model).strip():  # (not run's EMPTY_MODEL: generate has no default model, and refuses the lab's)
        raise GenerateError("--model is empty: give a Stable Diffusion 1.x/2.x folder with vae/ or its hub id "
                            "(generate has no default model)")
    if mitigate not in MODES:
        raise GenerateError(f"--mitigate {mitigate}: choose off, always or flagged")
    for flag, value in (("--seeds", seeds), ("--steps", steps)):
        if value < 1:
            raise GenerateError(f"{flag} {value}: must be at least 1")
    if seeds > MAX_SEEDS:  # before the folder keeps the options: a rerun with the intended count would be refused
        raise GenerateError(f"--seeds {seeds}: give 1 to {MAX_SEEDS:,} (a prompt's images are generated in one "
                            "batch, one per seed)")
    if not (0 <= guidance < math.inf):
        raise GenerateError(f"--guidance {guidance}: must be a finite number >= 0")
    from audit.errors import MitigationError

    try:
        MitigationRule(c1, True, mask_eos)  # c1 <= 0 or > 100 -> MitigationError
    except MitigationError as exc:  # the rule's message names its field ("c1 must be ..., got 0.0"): name the
        # option and its value once
        raise GenerateError(f"--c1 {c1:g}: {str(exc).removeprefix('c1 ').rsplit(', got ', 1)[0]}") from None
    if Path(prompts).suffix.lower() == ".txt" and prompt_column != "prompt":
        raise GenerateError(f"--prompt-column {prompt_column!r}: {prompts} is a .txt file, one prompt a line, with no "
                            "columns; leave --prompt-column out")
    if mitigate == "flagged" and calibration is None:
        raise GenerateError("--mitigate flagged needs --calibration (a `memaudit calibrate` file made for this model)")
    if mitigate == "always" and calibration is not None:  # it was checked (and could refuse the run), then unused
        raise GenerateError("--calibration with --mitigate always: every image is mitigated from step 0, so no "
                            "unmitigated first step is scored and nothing is flagged; leave --calibration out, or "
                            "use --mitigate flagged (or off) to detect")
    from audit.config import device_dtype_problem

    if problem := device_dtype_problem(device, dtype):
        raise GenerateError(problem)
    from audit.errors import RunError, RunFolderBusyError
    from audit.pipeline import beside_note, check_out_dir
    from audit.sources import GENERATE_FILES

    from audit.config import check_folder_creatable

    try:
        # a read-only mount, a folder this user may not write, a file on the path: said as `memaudit run` says it
        # ("--out X: cannot write in X (on a read-only file system)"), before the model loads; it said "--out X:
        # cannot create the folder X (OSError: Read-only file system)" after loading, or of a finished folder
        # "cannot make the run folder or its lock there"
        check_folder_creatable(Path(out), f"--out {out}")
        previous, others = check_out_dir(Path(out), "generate.json", GENERATE_FILES)
    except RunError as exc:  # a file, a damaged generate.json, or another command's outputs
        raise GenerateError(str(exc)) from None
    if note := beside_note(out, others, "the images and tables"):
        log(note)
    rows_in = read_prompts(prompts, prompt_column)
    cal = None
    if calibration is not None:  # what does not depend on the model is checked before loading it (seconds to minutes)
        from audit.calibrate import load_calibration

        cal = load_calibration(calibration)
        check_detection_calibration(cal, steps)

    pipe, loaded = _pipeline if _pipeline is not None else build_pipeline(model, device, dtype)
    check_pipeline(pipe)
    from audit.models import adapter_of
    from audit.models.base import model_notes

    for note in model_notes(model, loaded.path, adapter_of(loaded).components + ("vae",)) if _pipeline is None else ():
        log(f"memaudit: warning: {note}")  # a fp16 variant beside the plain weights, a LoRA, config keys ignored
    trained = int(pipe.scheduler.config.num_train_timesteps)
    if steps > trained:  # the sampler would refuse it at every prompt (and the folder would keep those options)
        raise GenerateError(f"--steps {steps}: more than the scheduler's {trained} training timesteps")
    threshold, layers, cal_summary = None, list(loaded.default_layers), None
    if cal is not None:
        sampler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sampler.set_timesteps(steps)
        layers = check_detection_calibration(cal, steps, loaded.fingerprint, int(sampler.timesteps[0]),
                                             str(loaded.dtype).replace("torch.", ""))
        threshold = float(cal["threshold"])
        from audit.capture import cross_attention_layers

        if unknown := [n for n in layers if n not in cross_attention_layers(pipe.unet)]:
            raise GenerateError(f"--calibration {calibration}: its layers are not cross-attention layers of this "
                                f"model's UNet: {', '.join(unknown)}")
        cal_summary = {"path": str(calibration), "threshold": threshold, "fpr": cal.get("fpr"),
                       "sha256": _file_sha256(Path(calibration))}

    out = Path(out)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "parts").mkdir(exist_ok=True)
    except OSError as exc:  # a file where a folder of the path should be, no permission
        where = exc.filename or out  # the folder that could not be made (parts/ may be a file)
        raise GenerateError(f"--out {out}: cannot create the folder {where} ({type(exc).__name__}: "
                            f"{exc.strerror})") from None
    options = {
        "model": loaded.name, "model_fingerprint": loaded.fingerprint, "prompts": str(prompts),
        "prompts_sha256": _file_sha256(Path(prompts)), "vae_fingerprint": _vae_fingerprint(loaded.path),
        "prompt_column": prompt_column, "mitigate": mitigate,
        "c1": float(c1), "mask_summary": True, "mask_eos": bool(mask_eos), "seeds": int(seeds), "steps": int(steps),
        "guidance": float(guidance), "layers": layers, "calibration": cal_summary, "dtype": str(loaded.dtype),
        "scheduler": type(pipe.scheduler).__name__,  # DDIM for every folder made before SD 2.x took its own
    }
    # what the first-step risks are scored with (None: --mitigate always detects nothing), as a run's manifest records
    # it; a calibration whose reference run was scored otherwise is said as run --calibration says it
    used = detection_scored_with(pipe.unet, generation_rows(pipe, seeds, guidance)) if mitigate != "always" else None
    reference = cal.get("reference") if cal is not None else None
    from audit.pipeline import out_lock

    try:
        with out_lock(out, "memaudit generate"):  # one process at a time (two would generate every image twice)
            _claim_folder(out, options, previous)
            if line := settings_warning(reference.get("scored_with") if isinstance(reference, dict) else None, used):
                log(f"memaudit: warning: {line}")
            start = time.perf_counter()
            n_images = _generate_missing(out, rows_in, seeds, progress, lambda i, prompt: _generate_prompt(
                pipe, DetectAndMitigate, i, prompt, out, seeds, steps, guidance, c1, mask_eos, mitigate, threshold,
                layers, torch))
            return _finalize(out, len(rows_in), seeds, options, n_images, time.perf_counter() - start, used)
    except RunFolderBusyError:  # another process holds the folder: exit 75 (retry later), as memaudit run
        raise
    except RunError as exc:  # a path in the way of a write
        raise GenerateError(str(exc)) from None


def _generate_missing(out: Path, rows_in: list, seeds: int, progress, generate_one) -> int:
    """Write the part of every prompt that has none yet (or only a failed generation's placeholder, or a damaged
    part: :func:`_part_ok`), with ``generate_one(i, prompt)`` giving an image prompt's rows; returns the images
    made. One prompt's failure is its rows' reason (``generation_failed``), never a lost row."""
    parts = out / "parts"
    done = {int(p.stem) for p in parts.glob("*.parquet") if p.stem.isdigit() and _part_ok(p, seeds, int(p.stem))}
    n_images = 0
    bar = _progress(progress, len(rows_in), len(done))
    try:
        for i in (i for i in range(len(rows_in)) if i not in done):
            prompt, reason = rows_in[i]
            rows = None
            if reason is None:
                try:
                    rows = generate_one(i, prompt)
                    n_images += sum(r["status"] == "image" for r in rows)
                except Exception as exc:  # noqa: BLE001 - recorded as the prompt's rows, tried again on a rerun
                    reason = f"generation_failed: {type(exc).__name__}: {exc}".replace("\n", " ")[:500]
            if rows is None:
                rows = [_reject(i, prompt, s, reason) for s in range(seeds)]
            failed = reason is not None and reason.startswith("generation_failed")
            _write_table_atomic(rows, parts / (f"{i:08d}.failed.parquet" if failed else f"{i:08d}.parquet"))
            # the other file of the prompt goes: a failed placeholder once it generated, and a damaged part (cut
            # short, or another prompt's copied over it) once it failed again, which _finalize would read first
            (parts / (f"{i:08d}.parquet" if failed else f"{i:08d}.failed.parquet")).unlink(missing_ok=True)
            bar.advance()
    finally:
        bar.close()
    return n_images


# options that name what a content hash or fingerprint beside them identifies: compared through those, so a rerun
# from another folder, or naming the model or prompts by another path, resumes
_SPELLED = {"prompts": "prompts_sha256", "model": "model_fingerprint"}  # (and the VAE: vae_fingerprint)


def _claim_folder(out: Path, options: dict, previous: dict | None) -> None:
    """Under the folder's lock: write ``options`` into a new generation folder's ``generate.json``, or check that
    the folder holds a generation with the same ones (read again: another process may have written it since
    ``check_out_dir``).

    Raises:
        GenerateError: other options, naming what each difference means.
    """
    config_path = out / "generate.json"
    if previous is None:
        if config_path.exists():  # another run made the folder its own since check_out_dir read it
            raise GenerateError(f"--out {out}: another memaudit generate made this folder its own meanwhile; rerun "
                                "to resume it with the same options, or use another --out")
        _write_json_atomic(options, config_path)
        return
    previous = json.loads(config_path.read_text()) if config_path.exists() else previous
    def same_calibration(a, b) -> bool:  # the same file's content under another path resumes too
        return isinstance(a, dict) and isinstance(b, dict) and a.get("sha256") is not None \
            and {**a, "path": None} == {**b, "path": None}

    diff = sorted(k for k in set(options) | set(previous)
                  if options.get(k) != previous.get(k) and not (k in _SPELLED and previous.get(_SPELLED[k])
                                                                == options[_SPELLED[k]])
                  and not (k == "calibration" and same_calibration(options[k], previous.get(k)))
                  and not (k == "vae_fingerprint" and k not in previous))  # a folder made before it was kept
    if diff:
        said = {"prompts_sha256": "prompts_sha256: the prompts file's content changed",
                "model_fingerprint": "model_fingerprint: other model weights",
                "vae_fingerprint": "vae_fingerprint: another VAE",
                "scheduler": f"scheduler: {previous.get('scheduler')} then, {options.get('scheduler')} now"}
        raise GenerateError(f"--out {out} holds a generation with other options "
                            f"({', '.join(said.get(k, k) for k in diff)}); use another --out or the same options "
                            "to resume")


def _part_ok(path: Path, seeds: int, index: int) -> bool:
    """Whether a prompt's part is a whole Parquet file of its ``seeds`` rows, of prompt ``index`` (its footer's
    ``prompt_index`` statistics): one cut short, damaged or copied over from another prompt outside memaudit is
    generated again, not a rerun that fails at the end or lists one prompt twice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.tables import column_ranges

    try:
        meta = pq.read_metadata(path)
        return meta.num_rows == seeds and all(r is not None and r[0] == r[1] == index
                                              for r in column_ranges(meta, "prompt_index"))
    except (OSError, ValueError, pa.ArrowException):
        return False


def _generate_prompt(pipe, detector, i, prompt, out, seeds, steps, guidance, c1, mask_eos, mode, threshold,
                     layers, torch) -> list[dict]:
    import numpy as np

    generators = [torch.Generator("cpu").manual_seed(s) for s in range(seeds)]
    with detector(pipe, threshold=threshold, layers=layers, c1=c1, mask_eos=mask_eos, mode=mode) as dm:
        # as arrays: diffusers' PIL conversion turns NaN pixels into black ones without a word
        images = pipe(prompt, num_images_per_prompt=seeds, generator=generators, num_inference_steps=steps,
                      guidance_scale=guidance, output_type="np").images  # float [seeds, H, W, 3] in [0, 1]
    from audit.tables import atomic_path

    rows, written = [], []
    try:
        for s, image in enumerate(images):
            risk = float(dm.entropy[s]) if dm.entropy is not None else None  # None: always mode, no detection
            decided = risk is not None and math.isfinite(risk)  # a NaN entropy decides nothing (and is mitigated)
            row = {"prompt_index": i, "prompt": prompt, "seed": s, "image_path": None,
                   "risk": risk if decided else None,  # schema: non-finite null
                   "flagged": bool(dm.flagged[s]) if threshold is not None and decided else None,
                   "mitigated": bool(dm.mitigated[s]), "status": "image", "reason": None}
            if not np.isfinite(image).all():  # NaN latents (an infinite guidance, a float16 overflow)
                rows.append(row | {"status": "rejected", "reason": "nonfinite_image"})
                continue
            rel = f"images/{i:08d}_s{s}.png"
            with atomic_path(out / rel) as tmp:
                pipe.image_processor.numpy_to_pil(image[None])[0].save(tmp, format="PNG")  # as output_type="pil"
            written.append(out / rel)
            rows.append(row | {"image_path": rel})
    except BaseException:  # the prompt's rows become rejects: no image of it may stay unlisted
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return rows


def _reject(i: int, prompt, seed: int, reason: str) -> dict:
    return {"prompt_index": i, "prompt": prompt, "seed": seed, "image_path": None, "risk": None, "flagged": None,
            "mitigated": None, "status": "rejected", "reason": reason}


def _finalize(out: Path, n_prompts: int, seeds: int, options: dict, n_images_now: int, seconds: float,
              scored_with: dict | None = None) -> dict:
    """Merge the parts into ``generations.parquet`` (prompt order) and write ``summary.json`` (its ``this_run`` with
    ``scored_with``, what this invocation scores first-step risks with,
    :func:`audit.mitigation.detect.detection_scored_with`, where it detects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def part(i: int) -> Path:  # a prompt's rows, or the placeholder of a generation that failed (tried again)
        done = out / "parts" / f"{i:08d}.parquet"
        return done if done.exists() else out / "parts" / f"{i:08d}.failed.parquet"

    parts = [pq.read_table(part(i), schema=arrow_schema()) for i in range(n_prompts)]
    table = pa.concat_tables(parts) if parts else arrow_schema().empty_table()
    rows = table.to_pylist()
    _write_table_atomic(rows, out / "generations.parquet", metadata={"memaudit.generate": options})
    reasons: dict[str, int] = {}
    for r in rows:
        if r["status"] == "rejected":
            key = r["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    images = sum(r["status"] == "image" for r in rows)
    summary = {
        "prompts": n_prompts, "seeds": seeds, "rows": len(rows), "images": images,
        "rejected": len(rows) - images, "rejected_by_reason": reasons,
        # null where nothing was detected: --mitigate always (no unmitigated first step) or no --calibration
        "flagged": (sum(bool(r["flagged"]) for r in rows)
                    if options["mitigate"] != "always" and options["calibration"] is not None else None),
        "mitigated": sum(bool(r["mitigated"]) for r in rows),
        "this_run": {"images": n_images_now, "seconds": round(seconds, 3),
                     "images_per_second": round(n_images_now / seconds, 4) if seconds > 0 and n_images_now else None,
                     **({"scored_with": scored_with} if scored_with else {})},
    }
    if summary["rows"] != n_prompts * seeds:  # every prompt x seed is one row
        raise RuntimeError(f"generate bug: {summary['rows']} rows for {n_prompts} prompts x {seeds} seeds")
    _write_json_atomic(summary, out / "summary.json")
    return summary


class _progress:
    """A rich progress bar over prompts on stderr (a no-op when disabled)."""

    def __init__(self, enabled: bool | None, total: int, completed: int):
        from rich.console import Console

        from audit.runner import live_terminal

        console = Console(stderr=True)
        self.bar = None
        if live_terminal(console) if enabled is None else enabled:  # None: only on a terminal, as `run`
            from rich.progress import Progress

            self.bar = Progress(console=console, transient=False)
            self.task = self.bar.add_task("generate", total=total, completed=completed)
            self.bar.start()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the command ------------------------------------------------------------------------------------
def generate(
    prompts: Path = typer.Argument(..., metavar="PROMPTS", help="Prompts: .txt (one a line), or .parquet/.csv/.jsonl with a prompt column."),
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers folder (with vae/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (resumable: rerun the same command)."),
    mitigate: str = typer.Option("off", "--mitigate", help="off | always | flagged (flagged needs --calibration)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="`memaudit calibrate` file for this model: "
                                               "flags (risk > threshold) and the detection layers."),
    seeds: int = typer.Option(1, "--seeds", help=f"Images per prompt, seeds 0..N-1 (N from 1 to {MAX_SEEDS:,})."),
    steps: int = typer.Option(50, "--steps", help="Sampling steps (the calibration's num_inference_steps)."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    c1: float = typer.Option(1.25, "--c1",
                             help="BOS logit factor of the mitigation (> 0, at most 100; Ren et al.: 1.25)."),
    mask_eos: bool = typer.Option(False, "--mask-eos", help="Also mask the first EOS (the summary tokens always are)."),
    prompt_column: str = typer.Option("prompt", "--prompt-column", help="Prompt column of a table input."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, float16 or bfloat16."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: "
                                            "only on a terminal)."),
) -> None:
    """Generate images (PNG) and generations.parquet (prompt, seed, image path, risk, flagged, mitigated),
    with first-step detection at no extra cost and optional mitigation (Ren et al., ECCV 2024). Ctrl-C or
    SIGTERM stops it keeping every finished prompt: rerun the same command to resume."""
    from audit.faults import Terminated, terminate_as_interrupt

    terminate_as_interrupt()
    try:
        summary = run_generate(prompts, model, out, mitigate=mitigate, calibration=calibration, seeds=seeds,
                               steps=steps, guidance=guidance, c1=c1, mask_eos=mask_eos, device=device, dtype=dtype,
                               prompt_column=prompt_column, progress=progress)
    except KeyboardInterrupt as exc:  # the parts written so far are the resume points
        what, code = (f"terminated ({exc.signame})", exc.exit_code) if isinstance(exc, Terminated) \
            else ("interrupted", 130)
        typer.echo(visible(f"memaudit: {what}; the finished prompts are kept in {out}/parts: rerun the same "
                           "command to resume"), err=True)
        raise typer.Exit(code) from None
    except OSError as exc:  # a full disk or a read-only folder while writing: the finished prompts are kept
        from audit.cli.common import _written_name
        from audit.faults import disk_fix, disk_problem

        parts = Path(out) / "parts"
        kept = parts.is_dir() and any(parts.glob("*.parquet"))  # else it failed before a prompt was finished
        written = getattr(exc, "memaudit_path", None) or exc.filename
        if what := disk_problem(exc):  # the output's disk, named by its option as run's start check names it
            # ("--out X: cannot write in X (on a read-only file system)"); it said "x: Read-only file system"
            fix = disk_fix(what).removesuffix(" (or write elsewhere)")  # elsewhere would not resume the parts
            line = f"--out {out}: {what}{f' writing {_written_name(written)}' if written else ''}: {fix}, then " + (
                f"rerun the same command to resume; the finished prompts are kept in {out}/parts" if kept
                else "rerun the same command")
        else:
            where = f"{written}: " if written else ""
            line = f"{where}{exc.strerror or exc}" + (
                f"; the finished prompts are kept in {out}/parts: fix the cause, then rerun the same command to "
                "resume" if kept else "; fix the cause, then rerun the same command")
        typer.echo(visible(f"memaudit: error: {line}"), err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        from audit.errors import RunFolderBusyError

        if isinstance(exc, RunFolderBusyError):  # another generate writes --out now: retry later, as memaudit run
            typer.echo(visible(f"memaudit: error: {exc}", one_line=True), err=True)
            raise typer.Exit(75) from None
        if _is_usage_error(exc):
            typer.echo(visible(f"memaudit: error: {str(exc).strip(chr(34))}", one_line=True), err=True)
            raise typer.Exit(2) from None
        # anything else as every other command says it (audit.cli.common.guarded): one line and exit 1, the traceback
        # with --debug only (Python's traceback was printed whatever --debug said: "Show full tracebacks instead of
        # one-line errors"), a known error class (a schema, a missing file) exit 2
        from audit.cli.common import guarded

        err = exc  # (bound here: the closure must not depend on the except clause's own name)

        def again():
            raise err

        guarded(again, resumable=False)
    typer.echo(json.dumps(summary))
    if summary["rows"] and summary["images"] and (failed := summary["rejected_by_reason"].get("generation_failed")):
        typer.echo(f"memaudit: warning: {failed} of {summary['rows']} rows failed to generate (generation_failed; "
                   "generations.parquet says why): rerun the same command to try them again", err=True)
    if not summary["rows"]:  # as `memaudit run`: an empty input is not an error, but it is said
        typer.echo(visible(f"memaudit: warning: {prompts} holds no prompts; nothing was generated"), err=True)
    if summary["rows"] and not summary["images"]:  # as `memaudit run`: nothing produced must not look clean
        typer.echo(f"memaudit: error: nothing was generated: all {summary['rows']} rows were rejected "
                   f"({', '.join(f'{r} {n}' for r, n in summary['rejected_by_reason'].items())}); "
                   "generations.parquet says why for each", err=True)
        raise typer.Exit(4)


def _is_usage_error(exc: BaseException) -> bool:
    """Errors that mean 'cannot generate with these options or this model' (one line, exit 2)."""
    names = {"GenerateError", "MitigationError", "ModelError", "CalibrationError"}
    return any(cls.__name__ in names for cls in type(exc).__mro__)


# `memaudit generate --help`: the docstring's paragraph, then the exit codes one a line (typer keeps line breaks there)
GENERATE_HELP = "\n".join([
    " ".join(generate.__doc__.split()),
    "",
    "Exit codes:",
    "0 done (rows that failed to generate are said in a warning; a rerun tries them again);",
    "2 an error said in one line (options, the prompts file, the model, the calibration, a full disk);",
    "4 every row was rejected, no image made (generations.parquet says why for each);",
    "130, 143, 129 interrupted, terminated, hung up (the finished prompts are kept: rerun the same command to resume);",
    "75 --out is being written by another memaudit generate right now (nothing done, retry later);",
    "1 anything unexpected (--debug shows the traceback).",
])


def register(app: typer.Typer) -> None:
    """Add ``generate`` to the memaudit app (``audit.cli.COMMAND_MODULES`` calls this)."""
    app.command("generate", help=GENERATE_HELP, short_help="Generate images and generations.parquet, with first-step "
                "detection and optional mitigation (Ren et al., ECCV 2024).")(generate)
