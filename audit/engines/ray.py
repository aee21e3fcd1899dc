"""The Ray engine: score units on a pool of Ray actors, one per GPU (or N CPU actors), with Ray Data.

The pipeline is a Ray Data dataset over the units of work (the NeMo-Curator pattern: a stage with declared
resources becomes a ``map_batches`` actor pool)::

    groups of units (one block each) -> read stage: tasks, fractional CPU -- prepare_group: read + validate rows
                                     -> score stage: fixed actor pool     -- process_units: tokenize, score, write
                                                                             each unit's shard
                                     -> small stats rows to the driver    -- joined by unit index, never by order

A group is one unit, or several small consecutive units (small files) scored together in full batches
(:func:`audit.unit.group_units`, at most the run's rows divided evenly among the actors, so each gets work).

* One actor per GPU (``num_gpus=1``) when Ray sees GPUs, else ``--workers`` CPU actors (default: the CPUs
  Ray sees) with a fractional ``num_cpus``, so that the read tasks still fit (on 2 cores, two actors asking
  for 1 CPU each starve the read stage and the pipeline deadlocks). The model is loaded once per actor.
* Reading runs in Ray Data tasks and overlaps the model work; each actor writes its own shards (the
  ``--out`` folder must be on storage every node sees); the driver only receives per-unit stats dicts.
* Faults: a unit that raises is retried in the actor, and after :data:`UNIT_RETRIES` retries fails the run
  with a message naming it. A worker process that dies is replaced by Ray and its unit retried (Ray Data's
  actor defaults: ``max_restarts=-1``, ``max_task_retries=-1``); the :class:`ProgressTracker` counts the
  attempts, so a unit that keeps killing its worker is refused after the same bound. A run with no
  progress for ``--stall-timeout`` seconds fails with a message. Finished units always stay.
* ``import ray`` happens inside functions only: ``memaudit --help`` never imports it.

Owns where units run on Ray and the Ray-specific fault handling (dead workers, the progress tracker). Must
not import the driver or the merge; the unit function is :func:`audit.unit.process_units`, as locally.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
import json
import logging
import os
from pathlib import Path
import pickle
import queue
import re
import sys
import threading
import time

from audit.faults import (DEFAULT_UNIT_RETRIES, StallWatchdog, describe_unit, run_unit_with_retries, sigint_raises,
                          terminate_as_interrupt)
from audit.errors import RunError, SourceError
from audit.config import RunConfig
from audit.unit import UnitGroup, as_group, prepare_group, process_units, unit_done
from audit.build import memaudit_build

IN_PROCESS = False  # each actor loads the model; the driver reads only its identity

# Called as ``hook(group)`` in the actor before each attempt at a group of units (a UnitGroup; its ``index`` is its
# first unit's; tests inject faults with it).
UNIT_HOOK: Callable[[UnitGroup], None] | None = None
UNIT_RETRIES = DEFAULT_UNIT_RETRIES  # attempts at a group after the first, deaths of its worker included
READ_TASK_CPUS = 0.25
# What the last run_ray in this process saw (benchmarks read it): actors, the largest peak RSS of a scoring
# worker in MiB, seconds until a first actor started a unit (actor start and model load) and in all.
LAST_RUN: dict = {}  # the last run's timings: workers, first_unit_s, wall_s, worker_peak_rss_mib, actor_start
POLL_S = 0.5


def _log(msg: str) -> None:
    """A run's one-line message where no ``log`` was given: to stderr, as the command line prints them."""
    print(msg, file=sys.stderr, flush=True)


_OWNED = {"started": False}  # whether this process started the Ray instance it is connected to


def connect(address: str | None) -> bool:
    """Connect to Ray; returns True when this call started a local instance (then shut it down after; also
    recorded in :data:`_OWNED`, so :func:`run_ray` shuts down one that :func:`probe_dtype` started).

    ``address`` None: reuse an already initialized Ray, or join the cluster of ``RAY_ADDRESS`` (set inside
    a Ray job), else start a local one (no dashboard, no usage stats). ``"auto"``, ``"host:port"`` or
    ``"ray://host:10001"``: join that cluster.

    Raises:
        RunError: the cluster at ``address`` cannot be joined (nothing answers at a ``host:port``, or
            ``ray.init`` fails), with Ray's reason.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # no implicit ray.init: after a failed run's shutdown, Ray Data's result thread would otherwise start a second
    # local Ray from a non-main thread as the process exits (read when ray is first imported)
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    quiet_ray()
    import ray

    if ray.is_initialized():
        return False
    # ERROR: Ray's own warnings (token auth notice, progress bars off) are not the user's business; its errors are.
    # The actors' own output stays in Ray's worker logs unless ray_logs() (--debug)
    common = {"ignore_reinit_error": True, "logging_level": "ERROR", "configure_logging": True,
              "log_to_driver": ray_logs()}
    if address or os.environ.get("RAY_ADDRESS"):
        where = "--address" if address else "RAY_ADDRESS (from the environment; --address overrides it)"
        address = address or os.environ["RAY_ADDRESS"]
        check_reachable(address, where=where)
        try:
            ray.init(address=address, **common)
            terminate_as_interrupt()
        except Exception as exc:  # noqa: BLE001 - one clear line instead of Ray's traceback
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            reason = " ".join(lines[:3]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
            raise RunError(f"{where} {address}: cannot join the Ray cluster ({type(exc).__name__}: "
                           f"{reason})") from exc
        return False
    ray.init(include_dashboard=False, **common)
    terminate_as_interrupt()
    _OWNED["started"] = True
    return True


# the HTTP/2 client preface and an empty SETTINGS frame: a GCS (gRPC over HTTP/2) answers with its SETTINGS frame
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def check_reachable(address: str, timeout: float = 5.0, where: str = "--address") -> None:
    """Fail at once when a ``HOST:PORT`` address (a cluster's GCS) does not accept connections, or answers the
    HTTP/2 preface with text (a web server: the dashboard's port 8265, or another service): ``ray.init`` would
    retry for many minutes, printing a warning every few seconds (still running after 411 s against a plain HTTP
    server). The GCS speaks gRPC, whose reply is a binary SETTINGS frame; a reply that is not text, or none, is
    left to Ray. ``auto`` and ``ray://`` addresses are left to Ray (they fail fast on their own). ``where`` names
    the address in the message (``RAY_ADDRESS`` when it came from the environment).

    Raises:
        RunError: naming the address and why (a port that is not a number, the socket error, the text reply).
    """
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RunError(f"{where} {address}: the port {port!r} is not a number from 1 to 65535 (HOST:PORT, e.g. "
                       "HEAD_IP:6379)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            try:
                sock.sendall(_HTTP2_PREFACE)
                reply = sock.recv(64)
            except OSError:
                reply = b""
    except OSError as exc:
        raise RunError(f"{where} {address}: cannot join the Ray cluster (nothing answers there within "
                       f"{timeout:g} s: {exc}); start it with `ray start --head`, or check the host and port") from None
    if reply and 0x21 <= reply[0] <= 0x7E:  # text: "HTTP/1.1 400", "<!DOCTYPE", "-ERR", "SSH-2.0"
        shown = reply.split(b"\n")[0].decode("ascii", "replace").strip()[:40]
        raise RunError(f"{where} {address}: something answers there, but not a Ray cluster's GCS (it replied "
                       f"{shown!r}...): the dashboard (8265) or another service? The GCS port is the one `ray start "
                       "--head --port` opened (6379 by default)")


def ray_logs() -> bool:
    """Whether Ray's own error output reaches the terminal: the actors' output (``log_to_driver``) and Ray Data's
    error logs. Off unless ``MEMAUDIT_RAY_LOGS=1`` (which ``--debug`` sets): a model that failed to load in the
    actors printed about 180 lines of chained tracebacks, twice, above memaudit's one-line error, which names the
    same error. They stay in Ray's logs (``logs/`` of the Ray session folder)."""
    return os.environ.get("MEMAUDIT_RAY_LOGS", "0") not in ("", "0")


_RAY_DATA_WARNINGS = r"ray\.data\..*"  # the modules whose UserWarnings quiet_ray ignores


def quiet_ray() -> None:
    """Silence what Ray prints around memaudit's own lines and is not the user's concern: the token-auth notice,
    Ray Data's "progress bars disabled" and its concurrency hints (Python warnings). Ray's errors are kept
    (``logging_level`` ERROR; Ray Data's and the actors' only with :func:`ray_logs`, as memaudit's own error line
    names the cause), and a failing unit still fails the run with a message naming it. (Ray's C++
    lines, e.g. ``core_worker.cc``'s note on actor constructor arguments, are not silenced:
    ``RAY_BACKEND_LOG_LEVEL`` would make every Ray process print a line saying so.)"""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=_RAY_DATA_WARNINGS)
    for name in ("ray.data", "ray._private.authentication"):
        logging.getLogger(name).setLevel(logging.ERROR)


# connect's os.environ.setdefault, and what its ray.init sets in the driver's environment: PYTHONBREAKPOINT (Ray's
# remote debugger: a notebook's breakpoint() after audit.run(engine="ray") started ray_debugpy instead of pdb) and
# RAY_AUTH_MODE
_ENV_SET = ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_AUTO_CONNECT", "PYTHONBREAKPOINT", "RAY_AUTH_MODE")
_QUIETED = ("ray.data", "ray._private.authentication")  # the loggers quiet_ray and _run set a level on


@contextmanager
def settings_kept():
    """For a library call (:func:`audit.run`, :func:`audit.score` with ``engine="ray"``): what the Ray engine sets in
    the process for its run, put back as the caller had it on exit, whatever happened inside: the environment
    variables :func:`connect` and its ``ray.init`` set (``RAY_USAGE_STATS_ENABLED``, ``RAY_ENABLE_AUTO_CONNECT``,
    ``PYTHONBREAKPOINT``, ``RAY_AUTH_MODE``: :data:`_ENV_SET`), the warnings filter
    :func:`quiet_ray` adds, the levels of the loggers it and the run set (``ray.data``,
    ``ray._private.authentication``) and Ray Data's progress-bar settings (``DataContext``). They stayed for the rest
    of the process: a service's own Ray Data jobs lost their progress bars and warnings, against the README's
    "leaves logging levels, warnings filters and the environment as it found them". What importing Ray does, and
    Ray's C++ lines, are not memaudit's to undo."""
    import sys
    import warnings

    env = {name: os.environ.get(name) for name in _ENV_SET}
    levels = {name: logging.getLogger(name).level for name in _QUIETED}
    filters = list(warnings.filters)

    def data_context():
        module = sys.modules.get("ray.data")  # never imported here: only what the run imported is put back
        return module.DataContext.get_current() if module is not None else None

    progress = (ctx.enable_progress_bars, ctx.print_on_execution_start) if (ctx := data_context()) else None
    try:
        yield
    finally:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        warnings.filters[:] = [f for f in warnings.filters if f in filters or f[2] is not UserWarning or
                               getattr(f[3], "pattern", None) != _RAY_DATA_WARNINGS]
        if mutated := getattr(warnings, "_filters_mutated", None):  # as filterwarnings does: seen at once
            mutated()
        if (ctx := data_context()) is not None:
            if progress is None:  # Ray Data's defaults, as a process that never ran memaudit has them
                progress = (type(ctx)().enable_progress_bars, type(ctx)().print_on_execution_start)
            ctx.enable_progress_bars, ctx.print_on_execution_start = progress


def local_resources() -> dict | None:
    """The ``{"CPU": n, "GPU": m}`` that :func:`connect` would give a local Ray it starts (no ``--address``, no
    ``RAY_ADDRESS``, no Ray initialized in this process), resolved as ``ray.init`` resolves its node's resources
    (Ray's ``ResourceAndLabelSpec.resolve``: the CPUs this process may use, cgroup limits and
    ``RAY_OVERRIDE_RESOURCES`` included, and the GPUs Ray's accelerator managers detect), without starting Ray: a
    dry run counted its workers by starting one (about 10 s). None where that is not this case, or where this Ray
    version lacks the resolver (the caller then starts Ray)."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    quiet_ray()
    import ray

    if ray.is_initialized():
        return None
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        spec = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1").to_resource_dict()
        return {"CPU": float(spec["CPU"]), "GPU": float(spec.get("GPU", 0))}
    except Exception:  # noqa: BLE001 - a private API of Ray: any change means starting Ray to count, as before
        return None


def worker_count(cfg: RunConfig) -> int:
    """How many scoring actors the run will have (:func:`plan_resources`). The driver sizes units with it so that
    every actor gets work. For a local Ray not yet started, from :func:`local_resources` (Ray is started when the
    run scores); else it connects to Ray and reads ``cluster_resources()``.

    Raises:
        audit.errors.RunError: the Ray cluster cannot be joined (:func:`connect`).
    """
    if cfg.address is None and (local := local_resources()) is not None:
        return plan_resources(local, cfg.workers)["workers"]
    connect(cfg.address)
    import ray

    return plan_resources(ray.cluster_resources(), cfg.workers)["workers"]


class ProgressTracker:
    """A tiny Ray actor (no CPU) that counts rows done and attempts per group of units (keyed by the group's
    first unit index, :attr:`audit.unit.UnitGroup.index`).

    Scoring actors report each scored batch (fire and forget) and each group attempt (synchronously, so a
    worker that dies right after is still counted); the driver polls :meth:`snapshot`.
    """

    def __init__(self):
        self.rows: dict[int, int] = {}
        self.attempts: dict[int, int] = {}
        self.events = 0
        self.actors: list[dict] = []

    def actor_ready(self, timings: dict) -> None:
        """A scoring actor finished starting: ``{"spawn_s", "import_s", "load_s", "scorer_s"}`` (seconds)."""
        self.actors.append(timings)

    def started(self, unit: int) -> int:
        """A new attempt at group ``unit``: its row count restarts from 0; returns the attempt number (1-based)."""
        self.rows[unit] = 0
        self.attempts[unit] = self.attempts.get(unit, 0) + 1
        self.events += 1
        return self.attempts[unit]

    def add(self, unit: int, rows: int) -> None:
        """``rows`` more input rows of group ``unit`` are done."""
        self.rows[unit] = self.rows.get(unit, 0) + rows
        self.events += 1

    def snapshot(self) -> dict:
        """``{"rows": total rows done, "events": a counter that moves on any progress, "attempts": {...}}``."""
        return {"rows": sum(self.rows.values()), "events": self.events, "attempts": dict(self.attempts),
                "actors": list(self.actors)}


def _read_units(batch: dict, cfg: RunConfig) -> dict:
    """Ray Data read stage: read and validate each group of units of the batch (:func:`audit.unit.prepare_group`);
    ``{"group": JSON groups [n]}`` -> ``{"group": [n], "prepared": pickled lists of prepared rows [n]}``, empty
    bytes where the read failed."""
    import numpy as np

    groups = [str(g) for g in batch["group"]]
    prepared = []
    for g in groups:
        try:
            prepared.append(pickle.dumps(prepare_group(UnitGroup.from_dict(json.loads(g)), cfg), protocol=5))
        except Exception:  # noqa: BLE001 - the scoring actor reads it again and reports the error, named
            prepared.append(b"")
    return {"group": np.array(groups, dtype=object), "prepared": np.array(prepared, dtype=object)}


def check_same_build(driver_build: str) -> None:
    """Refuse to score on a worker whose memaudit code differs from the driver's: a head node running a clone and
    workers an image built from another commit (or another wheel) would each score with their own code, and the run
    would record only the driver's build.

    Raises:
        audit.errors.RunError: naming both builds and where this worker's memaudit is installed.
    """
    if (own := memaudit_build()) != driver_build:
        import audit

        raise RunError(f"memaudit on this worker is build {own} (version {audit.__version__}, "
                       f"{Path(audit.__file__).parent}), the driver runs build {driver_build}: every node must run "
                       "the same memaudit code (install the same wheel or commit on every node)")


class UnitScorer:
    """Ray Data actor: loads the model once, then scores whole groups of units with
    :func:`audit.unit.process_units`.

    Each input row is a group of units (JSON, :meth:`audit.unit.UnitGroup.to_dict`) and its prepared rows (a
    pickled list, empty when the read failed); each output row is one unit's ``{"unit": index, "stats": JSON of
    UnitStats, "error": "", "peak_rss_mib": the actor's peak resident memory in MiB}``; a group that failed gives
    one row, ``{"unit": the group's first unit index, "stats": "", "error": the message}``.

    Raises:
        audit.errors.RunError: (at construction) this worker resolves ``--dtype auto`` to another dtype than the
            run, sees other weights than the driver (fingerprint), or runs other memaudit code than the driver
            (``build``: :func:`audit.build.memaudit_build`, the driver's), checked before anything loads.
        audit.errors.ModelError: (at construction) the model cannot be loaded on this worker.
    """

    def __init__(self, model_arg: str, cfg: RunConfig, score_config, fingerprint: str, shard_dir: str,
                 tracker, threads: int | None, retries: int, hook: Callable[[UnitGroup], None] | None,
                 launched_at: float = 0.0, build: str | None = None):
        # the actor's start, broken down for the driver (LAST_RUN["actor_start"]): spawn (the driver building the
        # dataset -> this process running __init__; wall clocks, so approximate across nodes), imports, load
        spawn_s = time.time() - launched_at if launched_at else float("nan")
        t_start = time.perf_counter()
        if build is not None:
            check_same_build(build)
        import torch

        from audit.models import load_model
        from audit.scorers import Scorer

        t_imported = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        gpu = bool(torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") != "")
        device = "cuda" if gpu and (cfg.device == "auto" or cfg.device.startswith("cuda")) else cfg.device
        if device.startswith("cuda") and not gpu:
            device = "cpu" if cfg.device == "auto" else device
        if cfg.dtype == "auto":  # resolved on this worker's own device; the run records one dtype for all
            from audit.models import resolve_device, resolve_dtype

            own = str(resolve_dtype("auto", resolve_device(device))).replace("torch.", "")
            if own != score_config.dtype:
                raise RunError(f"--dtype auto is {own} on this worker ({device}) but {score_config.dtype} for the "
                               "run: the cluster mixes devices; pass --dtype explicitly")
        model = load_model(model_arg, device, score_config.dtype)
        t_loaded = time.perf_counter()
        if model.fingerprint != fingerprint:
            raise RunError(f"--model {model_arg} on this worker has fingerprint {model.fingerprint}, the driver "
                           f"loaded {fingerprint}: every node must see the same weights")
        self.scorer = Scorer(model, score_config, compile=cfg.compile)
        tracker.actor_ready.remote({"spawn_s": round(spawn_s, 3), "import_s": round(t_imported - t_start, 3),
                                    "load_s": round(t_loaded - t_imported, 3),
                                    "scorer_s": round(time.perf_counter() - t_loaded, 3)})
        self.cfg = cfg
        self.shard_dir = Path(shard_dir)
        self.tracker = tracker
        self.retries = retries
        self.hook = hook

    def _one(self, group: UnitGroup, blob: bytes) -> tuple[list, str]:
        """Score one group (its prepared rows pickled in ``blob``, or empty to read them here): ``(its units'
        stats as JSON, "")``, or ``([], the error message)`` once its attempts are spent."""
        import ray

        first = [pickle.loads(blob) if blob else None]

        def attempt():
            n = ray.get(self.tracker.started.remote(group.index))
            if n > self.retries + 1:  # the earlier attempts killed their worker (Ray restarted it, retried)
                raise RunError(f"{describe_unit(group)}: its scoring worker died on each of {n - 1} attempts; "
                               "finished units are kept: rerun the same command to resume")
            if self.hook is not None:
                self.hook(group)
            prepared, first[0] = first[0], None  # process_units consumes it: a retry reads the group again
            stats = process_units(group, self.scorer, self.cfg, self.shard_dir,
                                  progress=lambda n: self.tracker.add.remote(group.index, n), prepared=prepared)
            return [json.dumps(asdict(s)) for s in stats]

        try:
            return run_unit_with_retries(attempt, group, self.retries), ""
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which fails the run naming the unit
            msg = str(exc) if isinstance(exc, (RunError, SourceError)) else \
                f"{describe_unit(group)}: {type(exc).__name__}: {exc}"
            return [], msg

    def __call__(self, batch: dict) -> dict:
        """Score a Ray Data batch ``{"group": JSON groups of units [n], "prepared": pickled prepared rows [n]}``;
        returns one row per unit, ``{"unit": int64, "stats": object, "error": object, "peak_rss_mib": float64}``.
        A group's failure is one row with its ``error``, never raised (the driver fails the run naming it)."""
        import numpy as np

        idx, stats, errors = [], [], []
        for g, blob in zip(batch["group"], batch["prepared"]):
            group = UnitGroup.from_dict(json.loads(str(g)))
            done, error = self._one(group, bytes(blob))
            if error:
                idx.append(group.index)
                stats.append("")
                errors.append(error)
            for unit, s in zip(group.units, done):
                idx.append(unit.index)
                stats.append(s)
                errors.append("")
        rss = peak_rss_mib()
        return {"unit": np.array(idx, dtype=np.int64), "stats": np.array(stats, dtype=object),
                "error": np.array(errors, dtype=object), "peak_rss_mib": np.full(len(idx), rss)}


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (2**20 bytes): ``VmHWM`` of ``/proc/self/status`` on
    Linux, else ``ru_maxrss`` (KiB on Linux, bytes on macOS); NaN where neither exists. Never raises.

    Not ``ru_maxrss`` first: on Linux it is the largest peak among the address spaces the process has had,
    and its address space before ``exec`` was its parent's (a fork, or the parent's own with vfork), so a
    process started by a 1.5 GiB parent reports at least 1.5 GiB whatever it used itself (kernel
    ``exec_mmap`` keeps the old space's high-water mark in the process's ``maxrss``). ``VmHWM`` is the peak of
    the address space the process has now, its own since ``exec``. Benchmarks that start each arm in a child
    process read this, as does each Ray scoring actor for the benchmark's worker peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024
    except (ImportError, OSError):  # pragma: no cover - not POSIX
        return float("nan")


def plan_resources(cluster: dict, workers: int | None) -> dict:
    """Actors and their resources from Ray's ``cluster_resources()``.

    With GPUs: one actor per GPU (or ``workers`` of them), ``num_gpus=1``. Without: ``workers`` CPU actors
    (default: the CPUs Ray sees; more CPU actors than CPUs are cut to the CPUs, ``capped_from`` says from how
    many). Actors ask for at most ``0.75 * CPUs / actors`` CPUs (at most 1), so the
    read tasks always find room; CPU actors split this machine's cores for torch threads (at most the
    driver's ``OMP_NUM_THREADS`` when set).

    Raises:
        RunError: ``workers`` below 1.
    """
    cpus = float(cluster.get("CPU", 1.0))
    gpus = int(cluster.get("GPU", 0))
    if workers is not None and workers < 1:
        raise RunError("--workers must be at least 1")
    n = workers or (gpus if gpus else max(1, int(cpus)))
    capped = None
    if not gpus and n > max(1, int(cpus)):  # CPU actors beyond the CPUs only share them (100 on 2 cores stalled)
        capped, n = n, max(1, int(cpus))
    actor_cpus = round(max(0.01, min(1.0, 0.75 * cpus / n)), 2)
    threads = None if gpus else max(1, (os.cpu_count() or 1) // n)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if threads and cap.isdigit() and int(cap) > 0:  # the driver's own thread limit also bounds the actors
        threads = min(threads, int(cap))
    return {"workers": n, "num_gpus": 1 if gpus else 0, "num_cpus": actor_cpus, "threads": threads,
            "capped_from": capped}


def run_ray(units: list, cfg: RunConfig, shard_dir: Path, progress: Callable[[int], None], *,
            model_arg: str, score_config, fingerprint: str | None = None,
            log: Callable[[str], None] | None = None) -> list[dict]:
    """Score ``units`` on Ray (see the module docstring); returns their stats dicts, sorted by unit index.

    Args:
        units: units still to do (finished ones were skipped by the caller), each a :class:`audit.sources.Unit`
            or a :class:`audit.unit.UnitGroup` of units scored together.
        cfg: the run's configuration (``workers``, ``address``, ``stall_timeout`` are read here).
        shard_dir: where the actors write the shards (shared storage on a multi-node cluster).
        progress: called with the number of input rows done since the last call.
        model_arg: the model as each actor loads it (hub id or a folder every node sees).
        score_config: the driver's :class:`audit.scorers.ScoreConfig` (the actors use its dtype too).
        fingerprint: the driver model's weight fingerprint; actors refuse a model that differs.
        log: the run's one-line messages (the actors and units planned), as ``memaudit: ray: ...``; None: stderr.

    Raises:
        RunError: a group of units failed after its retries, a worker kept dying on one, the run made no progress
            for ``cfg.stall_timeout`` seconds, or the cluster cannot be joined.
    """
    if not units:  # all resumed; shut down a Ray that the driver's probes started
        release()
        return []
    cfg = absolute_cache(cfg)
    shard_dir, model_arg = Path(shard_dir).absolute(), absolute_model(model_arg)  # as the cache: the driver's
    connect(cfg.address)
    import ray

    try:
        return _run(ray, units, cfg, shard_dir, progress, model_arg, score_config, fingerprint, log or _log)
    finally:
        release()


def release() -> None:
    """Shut down the local Ray that this process started (:func:`connect`, from :func:`worker_count` or
    :func:`probe_dtype`), if any; a cluster joined by address, or a Ray initialized by the caller, is left as it is.
    Called when a run ends and after ``memaudit run --dry-run`` counted the workers."""
    if _OWNED["started"]:
        import ray

        _OWNED["started"] = False
        ray.shutdown()


def absolute_cache(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its ``--cache`` folder made absolute against the driver's working folder (``~`` expanded).

    The actors run in the Ray workers' working folder, not the driver's: where ``ray start`` ran, or another pod.
    A relative ``--cache`` was read and written there (``/tmp/head/score-cache`` for a run started in ``/srv/jobs``),
    so the run's own cache folder got nothing, its hits were another folder's, and the driver's end-of-run
    compaction found no folder ("is not a folder (any more)")."""
    if not cfg.cache:
        return cfg
    import dataclasses

    from audit.cache import cache_dir

    return dataclasses.replace(cfg, cache=str(cache_dir(cfg.cache).absolute()))


def absolute_model(model_arg: str) -> str:
    """``model_arg`` made absolute (``~`` expanded) when it names a folder on the driver; a hub id is left as is.

    With a relative ``--model`` the actors, in the Ray workers' working folder, said "--model m1: no such folder",
    and with a relative ``--out`` "no such folder runs/x/shards" (:func:`run_ray` makes the shard folder absolute
    too), though both exist where the job was started."""
    path = os.path.expanduser(model_arg)
    return os.path.abspath(path) if os.path.isdir(path) else model_arg


def _run(ray, units, cfg, shard_dir, progress, model_arg, score_config, fingerprint, log=None) -> list[dict]:
    from ray.data import DataContext

    groups = [as_group(w) for w in units]
    log = log or _log

    if fingerprint is None:
        from audit.models import fingerprint_files, resolve_model_dir

        fingerprint = fingerprint_files(resolve_model_dir(model_arg)[1])
    cluster = ray.cluster_resources()
    deadline = time.monotonic() + (cfg.stall_timeout or 900)
    while not cluster.get("GPU") and not cluster.get("CPU"):  # e.g. a KubeRay head with num-cpus 0, workers joining
        if time.monotonic() > deadline:
            raise RunError("the Ray cluster has no CPU or GPU for scoring actors (only nodes with num-cpus 0?)")
        time.sleep(2)
        cluster = ray.cluster_resources()
    res = plan_resources(cluster, cfg.workers)
    if res["capped_from"]:
        log(f"memaudit: ray: --workers {res['capped_from']} is more CPU actors than the cluster's "
            f"{int(cluster.get('CPU', 1))} CPUs; using {res['workers']}")
    log(f"memaudit: ray: {res['workers']} scoring actor(s), {res['num_gpus']} GPU and {res['num_cpus']} CPU each, "
        f"{sum(len(g.units) for g in groups)} unit(s) in {len(groups)} group(s)")
    # our own progress bar says how far the run is; a failure is memaudit's own error line, naming its cause
    logging.getLogger("ray.data").setLevel(logging.ERROR if ray_logs() else logging.CRITICAL)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    tracker = ray.remote(num_cpus=0)(ProgressTracker).remote()
    try:
        return _execute(ray, groups, cfg, shard_dir, progress, model_arg, score_config, fingerprint, res, tracker)
    finally:
        ray.kill(tracker)


def _execute(ray, groups, cfg, shard_dir, progress, model_arg, score_config, fingerprint, res, tracker):
    """Build the dataset over ``groups`` (:class:`audit.unit.UnitGroup`), drive it, watch progress and stalls;
    returns the units' stats by index."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    retries = UNIT_RETRIES
    launched_at = time.time()
    ds = ray.data.from_items([{"group": json.dumps(g.to_dict())} for g in groups], override_num_blocks=len(groups))
    ds = ds.map_batches(_read_units, batch_size=1, fn_kwargs={"cfg": cfg}, num_cpus=READ_TASK_CPUS,
                        compute=TaskPoolStrategy(size=res["workers"] + 1))
    ds = ds.map_batches(
        UnitScorer, batch_size=1,
        compute=ActorPoolStrategy(size=res["workers"], max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs={"model_arg": model_arg, "cfg": cfg, "score_config": score_config,
                               "fingerprint": fingerprint, "shard_dir": str(shard_dir), "tracker": tracker,
                               "threads": res["threads"], "retries": retries, "hook": UNIT_HOOK,
                               "launched_at": launched_at, "build": memaudit_build()},
        num_cpus=res["num_cpus"], num_gpus=res["num_gpus"] or None,
    )  # Ray Data's actor defaults replace a dead worker and retry its task; the tracker bounds the attempts
    results: queue.Queue = queue.Queue()
    stop = threading.Event()
    _record_executor(ds)

    def consume():
        try:
            for row in ds.iter_rows():
                results.put(("row", row))
                if stop.is_set():
                    break
            results.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
            results.put(("exc", exc))

    thread = threading.Thread(target=consume, name="memaudit-ray-results", daemon=True)
    thread.start()
    try:
        return _drive(ray, groups, cfg, shard_dir, progress, res, tracker, retries, results, stop)
    finally:
        if thread.is_alive():
            _stop_stream(ds, thread, stop)


def _record_executor(ds) -> None:
    """Keep the streaming executor ``ds`` creates when iterated (``ds._memaudit_executors``): Ray Data stores it on
    ``ds._current_executor`` only once the first result has come back, so a run that fails before any unit is done
    (a stall on the first unit) had no executor to shut down and waited out :func:`_stop_stream`'s timeout with the
    results thread still inside the iterator. A no-op on a Ray without ``Dataset._create_executor``."""
    create = getattr(ds, "_create_executor", None)
    if create is None:
        return
    ds._memaudit_executors = []

    def recorded():
        executor = create()
        ds._memaudit_executors.append(executor)
        return executor

    ds._create_executor = recorded


def _stop_stream(ds, thread: threading.Thread, stop: threading.Event, timeout: float = 30.0) -> None:
    """End the results thread before the caller may shut Ray down: shut Ray Data's streaming executor down from
    this thread (``ds._current_executor``, as ``Dataset._synchronize_progress_bar`` does, or the one
    :func:`_record_executor` kept before any result came back) and wait for the thread to leave
    ``ds.iter_rows()``. A run that raised (a unit that kept failing, a stall) while that thread was still inside
    the iterator had Ray shut down under it; the iterator's own clean-up then called into the stopped core
    worker, which ended the process: exit 1 with no error line, and through the API the caller's ``except
    RunError`` never ran (4 of 7 tries, 2 CPU actors). Gives up after ``timeout`` seconds."""
    stop.set()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        for executor in [getattr(ds, "_current_executor", None), *getattr(ds, "_memaudit_executors", [])]:
            try:
                if executor is not None:  # (the same executor twice: its shutdown is idempotent)
                    executor.shutdown(force=True)
            except Exception:  # noqa: BLE001 - already shut down, or shutting down in the other thread
                pass
        thread.join(0.5)


def _drive(ray, groups, cfg, shard_dir, progress, res, tracker, retries, results, stop):
    """The driver's loop of :func:`_execute`: take the results thread's rows, watch progress and stalls."""
    by_unit = {u.index: u for g in groups for u in g.units}
    by_group = {g.index: g for g in groups}
    stats: dict[int, dict] = {}
    shown = 0
    last_events = -1
    watchdog = StallWatchdog(cfg.stall_timeout, "the Ray run")  # polled here: this loop never blocks
    t_start = time.monotonic()
    LAST_RUN.clear()
    LAST_RUN.update(workers=res["workers"], worker_peak_rss_mib=0.0)
    snap = {"rows": 0, "events": 0, "attempts": {}, "actors": []}
    while True:
        try:
            kind, item = results.get(timeout=POLL_S)
        except queue.Empty:
            kind, item = None, None
        if kind == "row":
            if item["error"]:
                stop.set()
                raise RunError(str(item["error"]))
            stats[int(item["unit"])] = json.loads(item["stats"])
            watchdog.beat()
            LAST_RUN["worker_peak_rss_mib"] = max(LAST_RUN["worker_peak_rss_mib"], float(item["peak_rss_mib"]))
        elif kind == "exc":
            raise RunError(_explain_failure(item, by_group, stats, _snapshot(ray, tracker) or snap, retries,
                                            shard_dir)) from item
        elif kind == "end":
            break
        snap = _snapshot(ray, tracker) or snap
        if snap["events"] != last_events:
            last_events = snap["events"]
            watchdog.beat()
        if snap["attempts"] and "first_unit_s" not in LAST_RUN:  # a first actor is up with its model loaded
            LAST_RUN["first_unit_s"] = time.monotonic() - t_start
        done_rows = max(snap["rows"], sum(s["rows_read"] for s in stats.values()))
        if done_rows > shown:
            progress(done_rows - shown)
            shown = done_rows
        if watchdog.stalled():
            stop.set()
            pending = [describe_unit(by_unit[i]) for i in sorted(by_unit) if i not in stats][:3]
            raise RunError(watchdog.message(f"waiting on {', '.join(pending)}"
                                            f"{' ...' if len(by_unit) - len(stats) > 3 else ''}"))
    missing = [i for i in by_unit if i not in stats]
    if missing:
        raise RunError(f"the Ray run ended without {len(missing)} unit(s), first "
                       f"{describe_unit(by_unit[min(missing)])}; rerun the same command to resume")
    total = sum(s["rows_read"] for s in stats.values())
    LAST_RUN["wall_s"] = time.monotonic() - t_start
    LAST_RUN["actor_start"] = (_snapshot(ray, tracker) or snap)["actors"]  # per actor start: import / load
    if total > shown:
        progress(total - shown)
    return [stats[i] for i in sorted(stats)]


def _snapshot(ray, tracker) -> dict | None:
    try:
        return ray.get(tracker.snapshot.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - progress display only
        return None


def _explain_failure(exc: BaseException, by_group: dict, stats: dict, snap: dict, retries: int,
                     shard_dir: Path) -> str:
    """One message for a failed Ray Data execution, naming the group(s) of units (``by_group``: by their first
    unit index, the tracker's key) whose workers kept dying."""
    attempts = {int(k): v for k, v in snap.get("attempts", {}).items()}
    suspects = [i for i, n in sorted(attempts.items(), key=lambda kv: -kv[1])
                if i in by_group and n > retries
                and any(u.index not in stats and not unit_done(shard_dir, u) for u in by_group[i].units)]
    first = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {first[-1][:300] if first else ''}"
    # a scoring actor that cannot start (the model does not load there): a rerun cannot help
    if start_error := re.search(r"audit\.errors\.(?:ModelError|RunError): (.*)", str(exc)):
        return f"the scoring workers could not start: {start_error.group(1)[:500]} (finished units are kept)"
    if suspects:
        names = ", ".join(describe_unit(by_group[i]) for i in suspects[:3])
        return (f"{names}: its scoring worker died on each of {attempts[suspects[0]]} attempts ({detail}); "
                "finished units are kept: rerun the same command to resume")
    return f"the Ray run failed ({detail}); finished units are kept: rerun the same command to resume"


def probe_dtype(cfg: RunConfig) -> str | None:
    """``--dtype auto`` as a GPU worker of the cluster resolves it (bfloat16 or float16), or None when the
    driver may resolve it itself (an explicit dtype, ``--device cpu``, or no GPU in the cluster). Called by
    the driver before the run's score configuration is recorded; connects to Ray (see :func:`connect`).

    Raises:
        audit.errors.RunError: the Ray cluster cannot be joined (:func:`connect`).
    """
    if cfg.dtype != "auto" or not (cfg.device == "auto" or cfg.device.startswith("cuda")):
        return None
    connect(cfg.address)
    import ray

    if not ray.cluster_resources().get("GPU"):
        return None
    # a stall_timeout of 0 means never, as None does: ray.get's timeout=0 gives up unless the result is already there
    return ray.get(ray.remote(num_gpus=1, num_cpus=0)(_resolve_auto_dtype).remote(), timeout=cfg.stall_timeout or None)


def _resolve_auto_dtype() -> str:
    """``--dtype auto`` resolved on this Ray worker's GPU."""
    from audit.models import resolve_device, resolve_dtype

    return str(resolve_dtype("auto", resolve_device("cuda"))).replace("torch.", "")


def run(job) -> list[dict]:
    """The engine interface (:mod:`audit.engines`): :func:`run_ray` on an :class:`audit.engines.EngineJob`. SIGINT
    stops it as it stops the local engine, also when the process inherited it ignored (:func:`sigint_raises`)."""
    with sigint_raises():
        return run_ray(job.units, job.cfg, job.shard_dir, job.progress, model_arg=job.model_arg,
                       score_config=job.score_config, fingerprint=job.fingerprint, log=job.log)
