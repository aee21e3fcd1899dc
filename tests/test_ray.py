"""The Ray engine on one local Ray instance started once per test session.

Parity with the local engine on the real prompt lists, resume after SIGKILL, a scoring worker that dies
(replaced, unit retried; then an idempotent rerun), a unit that keeps killing its worker (the run fails
naming it), a stalled run, and refusal of a mismatched rerun. A unit that keeps raising goes through the
same retry function as on the local engine (tests/test_resume.py). Faults are injected with
``audit.engines.ray.UNIT_HOOK``, a callable shipped to the actors (this module is pickled by value so the
actors need not import it).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

from audit.pipeline import RunError  # noqa: E402
from helpers import WORDS, prompts_file, run_audit  # noqa: F401

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_LISTS = (SHARED_DATA / "sd1_memorized_345.txt", SHARED_DATA / "nonmemorized_500.txt")


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """One local Ray for the session's Ray tests (this module is the only one that starts Ray, so it starts
    once per session): 4 logical CPUs, no dashboard, no usage stats, temp dir under pytest's, and no Ray output
    relayed to this process (``log_to_driver=False``). Yields the GCS address, which subprocesses join with
    ``--address``; shut down when this module's tests are done.

    Session-scoped, Ray stayed up through every later test module, and with ``log_to_driver`` its log monitor
    printed the raylet's ``raylet.err`` lines into whatever captured the driver's output: on a disk over 95%
    full, the raylet's "file_system_monitor.cc: ... is over 95% full" every 10 s landed inside a later report
    test's CliRunner output (CI, 2026-12-06)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp, own = tmp_path_factory.mktemp("ray"), None
    # Ray's sockets live at TMP/session_<time>_<pid>/sockets/plasma_store, and a Unix socket's path holds at most 107
    # bytes: under pytest-xdist's /tmp/pytest-of-root/pytest-1345/popen-gw0/ray0 every test here failed to start Ray
    # (a CI machine counts pytest-0; a long-lived one reached 1345). A deep temp dir is replaced by a short one.
    if len(os.fsencode(tmp)) > 40:
        import tempfile

        tmp = own = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp" if os.path.isdir("/tmp") else None))
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(tmp), logging_level="WARNING",
             log_to_driver=False, ignore_reinit_error=True)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


def _prompts_file(path: Path, n: int) -> Path:
    return prompts_file(path, n, seed=0)


_run = run_audit


def _table(out: Path):
    import polars as pl

    return pl.read_parquet(out / "risk.parquet").sort("prompt_id")


def _same_scores(a, b) -> None:
    assert a.height == b.height
    assert a["prompt_id"].n_unique() == a.height, "duplicated rows"
    assert a["prompt_id"].to_list() == b["prompt_id"].to_list()
    assert (a["risk"] - b["risk"]).abs().max() <= 1e-6
    assert (a["bos_mass"] - b["bos_mass"]).abs().max() <= 1e-6


# ---------------------------------------------------------------- fault hooks (run inside the actors)

def _die_once(marker: str, index: int, unit) -> None:
    if unit.index == index and os.path.exists(marker):
        os.remove(marker)
        os._exit(1)


def _die_always(index: int, unit) -> None:
    if unit.index == index:
        os._exit(1)


def _disk_full(index: int, log: str, unit) -> None:
    if unit.index == index:
        with open(log, "a") as fh:
            fh.write("attempt\n")
        raise OSError("Detail: [errno 28] No space left on device")


def _sleep(index: int, seconds: float, unit) -> None:
    if unit.index == index:
        time.sleep(seconds)


@pytest.fixture
def hook(monkeypatch):
    """Set ``audit.engines.ray.UNIT_HOOK`` for one test."""
    import audit.engines.ray

    return lambda fn: monkeypatch.setattr(audit.engines.ray, "UNIT_HOOK", fn)


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, tiny_model_dir, ray_address):
    """The real prompt lists, and a folder of six one-prompt files (units 5-10, scored in one group with unit 4),
    through the local engine, and through the Ray engine with 2 workers while the worker holding unit 1 dies once
    (one expensive Ray run shared by the tests below)."""
    import audit.engines.ray

    if missing := [str(f) for f in REAL_LISTS if not f.exists()]:
        pytest.fail(f"{', '.join(missing)} missing: the tests read the shared prompt lists from ../shared/data")
    tmp = tmp_path_factory.mktemp("real")
    small = tmp / "small"
    small.mkdir()
    for i in range(6):
        prompts_file(small / f"part-{i}.txt", 1, seed=100 + i)
    inputs = (*REAL_LISTS, small)
    local_out, local_manifest = _run(inputs, tiny_model_dir, tmp / "local", unit_rows=200)
    marker = tmp / "die-once"
    marker.touch()
    audit.engines.ray.UNIT_HOOK = functools.partial(_die_once, str(marker), 1)
    try:
        ray_out, ray_manifest = _run(inputs, tiny_model_dir, tmp / "ray", unit_rows=200, engine="ray", workers=2)
    finally:
        audit.engines.ray.UNIT_HOOK = None
    return {"local": local_out, "ray": ray_out, "ray_manifest": ray_manifest, "marker": marker, "inputs": inputs,
            "ray_timings": dict(audit.engines.ray.LAST_RUN)}


@pytest.mark.slow
def test_parity_with_local_engine_on_real_prompt_lists(real_runs):
    manifest = real_runs["ray_manifest"]
    assert manifest["counts"]["scored"] == 851 and manifest["counts"]["rejected"] == 0
    assert manifest["engine"] == "ray" and manifest["units"]["total"] == 11
    _same_scores(_table(real_runs["ray"]), _table(real_runs["local"]))
    small = json.loads((real_runs["ray"] / "shards" / "unit-000007.done.json").read_text())  # part-2.txt's unit
    assert small["unit"]["url"].endswith("part-2.txt") and small["stats"]["scored"] == 1


def test_every_actor_start_is_broken_down_into_import_and_model_load(real_runs):
    """Issue 16: each scoring actor reports how its start splits (spawn from the dataset's launch, imports,
    model load, scorer set-up); the worker that died was replaced, so 2 workers started at least 3 times. The
    first actors' spawn, imports and load fit in the time to the first unit."""
    timings = real_runs["ray_timings"]
    starts = timings["actor_start"]
    assert len(starts) >= 3
    for t in starts:
        assert set(t) == {"spawn_s", "import_s", "load_s", "scorer_s"} and min(t.values()) >= 0
    ready = min(t["spawn_s"] + t["import_s"] + t["load_s"] + t["scorer_s"] for t in starts)
    assert 0 < ready <= timings["first_unit_s"] + 0.5


def test_worker_that_dies_is_replaced_and_its_unit_retried(real_runs):
    assert not real_runs["marker"].exists(), "the worker holding unit 1 never died"
    assert real_runs["ray_manifest"]["counts"]["rows_read"] == 851
    assert _table(real_runs["ray"])["prompt_id"].n_unique() == 851


def test_rerun_skips_finished_units_and_mismatched_rerun_is_refused(real_runs, tiny_model_dir):
    out = real_runs["ray"]
    first = _table(out)
    _, again = _run(real_runs["inputs"], tiny_model_dir, out, unit_rows=200, engine="ray", workers=2)
    assert again["units"]["resumed"] == 11 and _table(out).equals(first)
    before = (out / "risk.parquet").read_bytes()
    with pytest.raises(RunError, match="different run.*unit_rows"):
        _run(real_runs["inputs"], tiny_model_dir, out, unit_rows=100, engine="ray", workers=2)
    assert (out / "risk.parquet").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["unit_rows"] == 200


@pytest.mark.slow
def test_sigkill_midway_then_rerun_loses_and_duplicates_nothing(tmp_path, tiny_model_dir, ray_address):
    src = _prompts_file(tmp_path / "p.txt", 120)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "audit.cli", "run", str(src), "--model", str(tiny_model_dir), "--out", str(out),
           "--unit-rows", "10", "--batch-size", "5", "--engine", "ray", "--workers", "1", "--address",
           ray_address, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 400  # a loaded 2-core machine can take minutes to start an actor
    try:
        while len(list((out / "shards").glob("*.done.json"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no unit finished in 400 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_at_kill = len(list((out / "shards").glob("*.done.json")))
    assert 2 <= done_at_kill < 12, "the run was not killed midway"
    # resumed with the local engine (a run folder is engine-neutral; this also saves an actor start)
    _, manifest = _run([src], tiny_model_dir, out, unit_rows=10, batch_size=5)
    assert manifest["units"]["resumed"] >= 2
    counts = manifest["counts"]
    assert counts["rows_read"] == counts["scored"] == 120 and counts["rejected"] == 0
    ids = _table(out)["prompt_id"].to_list()
    assert sorted(ids) == sorted(f"{src}#{row}" for row in range(120)), "rows lost or duplicated"


@pytest.mark.slow
def test_unit_that_keeps_killing_its_worker_fails_the_run_naming_it(tmp_path, tiny_model_dir, ray_address, hook,
                                                                    monkeypatch):
    src = _prompts_file(tmp_path / "p.txt", 30)
    import audit.engines.ray

    monkeypatch.setattr(audit.engines.ray, "UNIT_RETRIES", 1)
    hook(functools.partial(_die_always, 1))
    with pytest.raises(RunError, match=r"unit 1 \(.*p\.txt rows 10-20\).*died on each of 2 attempts"):
        _run([src], tiny_model_dir, tmp_path / "out", unit_rows=10, engine="ray", workers=1)
    done = sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.done.json"))
    assert "unit-000001.done.json" not in done


def test_a_full_disk_in_an_actor_fails_the_run_at_the_first_attempt(tmp_path, tiny_model_dir, ray_address, hook):
    """As in the local engine (audit.faults.disk_problem): no retry in the actor, and the driver's one line says
    what is wrong with the disk and which unit it was."""
    src = _prompts_file(tmp_path / "p.txt", 20)
    log = tmp_path / "attempts.log"
    hook(functools.partial(_disk_full, 1, str(log)))
    with pytest.raises(RunError, match=r"^unit 1 \(.*p\.txt rows 10-20\) could not be written, no space left on the "
                                       r"device \(OSError: .*\); free space"):
        _run([src], tiny_model_dir, tmp_path / "out", unit_rows=10, engine="ray", workers=1)
    assert log.read_text() == "attempt\n"


@pytest.mark.slow
def test_model_the_actors_cannot_load_fails_in_a_few_lines(tmp_path, tiny_model_dir, ray_address, monkeypatch):
    """Weights that only the actors read (the driver reads the configs) fail the run with memaudit's one line
    naming the load error; the actors' and Ray Data's chained tracebacks (about 180 lines) stay in Ray's logs
    unless MEMAUDIT_RAY_LOGS=1 (--debug)."""
    from audit.engines.ray import ray_logs

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = next((model / "unet").glob("*.safetensors"))
    # a tensor renamed in the header (same length, so the header still covers the file): the driver's checks of
    # file names and headers (check_weight_files) pass it; a file cut short they refuse before any actor starts
    data = weights.read_bytes()
    assert data.count(b'"conv_in.weight"') == 1
    weights.write_bytes(data.replace(b'"conv_in.weight"', b'"conv_ix.weight"'))
    src = _prompts_file(tmp_path / "p.txt", 4)
    monkeypatch.delenv("MEMAUDIT_RAY_LOGS", raising=False)
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(src), "--model", str(model), "--out",
                           str(tmp_path / "out"), "--engine", "ray", "--workers", "1", "--address", ray_address,
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    lines = proc.stderr.splitlines()
    # (the actors' load error, the missing tensor named)
    assert proc.returncode == 2 and re.search(r"memaudit: error: the scoring workers could not start: --model "
                                              r".*: unet/ weights lack 1 tensor\(s\) that unet/config\.json "
                                              r"describes, the first conv_in\.weight", lines[-1]), proc.stderr[-3000:]
    # (Ray's driver prints the raylet's own error channel on stdout, "(raylet) Task ... get_location failed", at
    # times with the actor's traceback: not something a Ray option turns off)
    assert "Traceback" not in proc.stderr and len(lines) < 8, proc.stderr[-3000:]
    assert not ray_logs()
    monkeypatch.setenv("MEMAUDIT_RAY_LOGS", "1")
    assert ray_logs()


def test_stalled_run_fails_with_a_message(tmp_path, tiny_model_dir, ray_address, hook):
    """The run fails with its message, and Ray Data's stream is stopped before the error leaves the engine: a
    run that raised while its results thread was still inside ds.iter_rows() had Ray shut down under that thread
    (when memaudit started Ray), and Ray's core worker then ended the process, exit 1 with no error line (4 of 7
    tries of a unit that kept failing, 2 CPU actors)."""
    import threading

    src = _prompts_file(tmp_path / "p.txt", 20)
    hook(functools.partial(_sleep, 0, 90.0))  # no unit comes back before the stall: Ray Data had stored no executor
    t0 = time.monotonic()
    with pytest.raises(RunError, match="no progress for 4 s.*stall-timeout"):
        _run([src], tiny_model_dir, tmp_path / "out", unit_rows=10, engine="ray", workers=1, stall_timeout=4)
    assert time.monotonic() - t0 < 60
    assert not [t for t in threading.enumerate() if t.name == "memaudit-ray-results" and t.is_alive()]


def test_resource_plan_one_actor_per_gpu_else_fractional_cpu_actors():
    from audit.engines.ray import plan_resources

    gpu = plan_resources({"CPU": 32.0, "GPU": 4.0}, None)
    assert (gpu["workers"], gpu["num_gpus"], gpu["num_cpus"]) == (4, 1, 1.0)
    cpu = plan_resources({"CPU": 2.0}, 2)  # two actors on two cores leave room for the read tasks
    assert (cpu["workers"], cpu["num_gpus"], cpu["num_cpus"]) == (2, 0, 0.75)
    assert plan_resources({"CPU": 4.0}, None)["workers"] == 4
    with pytest.raises(RunError, match="--workers"):
        plan_resources({"CPU": 2.0}, 0)
    many = plan_resources({"CPU": 2.0}, 100)  # 100 CPU actors on 2 cores stalled the run: cut to the CPUs
    assert (many["workers"], many["capped_from"], many["num_cpus"]) == (2, 100, 0.75)
    assert plan_resources({"CPU": 2.0, "GPU": 1.0}, 3)["capped_from"] is None  # GPU actors wait for their GPU


def test_a_bogus_address_fails_at_once():
    """`--address 127.0.0.1:1` made ray.init retry for 14 minutes, printing a warning every few seconds."""
    import time

    from audit.engines.ray import check_reachable

    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"--address 127.0.0.1:1: cannot join the Ray cluster \(nothing answers"):
        check_reachable("127.0.0.1:1", timeout=2)
    assert time.monotonic() - t0 < 2.5
    for address in ("auto", "ray://nowhere:10001"):  # left to Ray, which fails fast on these
        check_reachable(address)
    with pytest.raises(RunError, match=r"--address 127.0.0.1:notaport: the port 'notaport' is not a number"):
        check_reachable("127.0.0.1:notaport")
    with pytest.raises(RunError, match=r"^RAY_ADDRESS \(from the environment.*\) h:0: the port '0'"):
        check_reachable("h:0", where="RAY_ADDRESS (from the environment; --address overrides it)")


def test_an_address_where_a_web_server_answers_fails_at_once():
    """`--address HEAD:8265` (the dashboard's port) or any port where something that is not a GCS listens: ray.init
    was still retrying after 411 s. A GCS answers the HTTP/2 preface with a binary SETTINGS frame; a text reply
    fails at once, and a binary one is left to Ray."""
    import socket
    import threading

    from audit.engines.ray import check_reachable

    def serve(reply: bytes):
        srv = socket.create_server(("127.0.0.1", 0))

        def answer():
            conn, _ = srv.accept()
            with conn:
                conn.recv(64)
                conn.sendall(reply)
            srv.close()

        threading.Thread(target=answer, daemon=True).start()
        return f"127.0.0.1:{srv.getsockname()[1]}"

    address = serve(b"HTTP/1.0 400 Bad request\r\n\r\n")
    with pytest.raises(RunError, match=rf"--address {address}: something answers there, but not a Ray cluster's "
                                       r"GCS \(it replied 'HTTP/1.0 400 Bad request'...\): the dashboard \(8265\)"):
        check_reachable(address)
    check_reachable(serve(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00"))  # a GCS's SETTINGS frame: on to ray.init


def test_peak_rss_is_the_process_own_not_its_parents():
    """A child of a parent that peaked at 768 MiB: ``ru_maxrss`` reports at least the parent's 768 MiB (exec keeps
    the old address space's high-water mark), :func:`peak_rss_mib` the child's own peak: its 256 MiB buffer plus
    the interpreter and the imports, well under the parent's."""
    child = ("import resource; from audit.engines.ray import peak_rss_mib; b = bytearray(256 * 2**20); "
             "b[::4096] = b'x' * len(b[::4096]); print(peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF)"
             ".ru_maxrss / 1024)")
    parent = ("import subprocess, sys; b = bytearray(768 * 2**20); b[::4096] = b'x' * len(b[::4096]); del b; "
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, "
              "check=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True, timeout=120)
    own, maxrss = map(float, out.stdout.split())
    assert maxrss >= 768
    assert 256 <= own < 256 + 200


def test_a_layer_the_model_lacks_is_refused_before_the_workers_start(tmp_path, tiny_model_dir, ray_address,
                                                                      tiny_model):
    """`--engine ray --layers nope` started the workers, each of whose scorers refused the layer once its model had
    loaded: Ray's actor tracebacks on the terminal (without --debug), then "the Ray run failed (ActorDiedError:
    KeyError: ..." cut at 300 characters. The driver, which reads the model's config for its identity, now refuses
    the layer first, with the local run's own line (the layers listed in full), and makes no run folder."""
    from audit.models import adapter_of

    known = adapter_of(tiny_model).cross_attention_layers(tiny_model.unet)
    src = _prompts_file(tmp_path / "p.txt", 4)
    with pytest.raises(KeyError) as err:
        _run([src], tiny_model_dir, tmp_path / "out", engine="ray", workers=1, address=ray_address,
             layers=("nope", known[0]), device="cpu")
    assert err.value.args[0] == (f"--layers nope,{known[0]}: not a cross-attention layer of this UNet: nope. "
                                 f"Cross-attention layers: {', '.join(known)}")
    assert not (tmp_path / "out").exists()


def test_the_dry_run_predicts_the_workers_units_and_groups_a_ray_run_makes(tmp_path, tiny_model_dir, ray_address):
    """`memaudit run --dry-run --engine ray` said only that the run 'may' cut smaller units; it now prints the split,
    computed by the run's own functions (the engine's worker_count, _units_for_workers, group_rows, group_units).
    10 rows in 2 files for 3 workers: units of ceil(10 / 3) = 4 rows (4, 4, 1 and the one-row file), grouped by at
    most 4 rows: (4), (4), (1, 1)."""
    import audit.engines.ray
    from audit.cli import dry_run_lines
    from audit.pipeline import RunConfig
    from audit.runner import dry_run, execute

    prompts_file(tmp_path / "a.txt", 9, seed=1)
    prompts_file(tmp_path / "b.txt", 1, seed=2)
    cfg = RunConfig(inputs=(str(tmp_path / "a.txt"), str(tmp_path / "b.txt")), model=str(tiny_model_dir),
                    out=str(tmp_path / "out"), engine="ray", workers=3, device="cpu")
    said: list[str] = []
    summary = dry_run(cfg, log=said.append)
    assert summary["split"] == {"engine": "ray", "workers": 3, "workers_asked": 3, "unit_rows": 4, "units": 4, "group_rows": 4, "groups": 3}
    assert summary["units"] == 4 and said == ["memaudit: 10 rows for 3 workers: units of 4 rows (--unit-rows 20000), "
                                              "so that every worker gets work"]
    assert ("--engine ray: 3 workers; units of at most 4 rows, scored in 3 groups of at most 4 rows (the split the "
            "run makes)") in dry_run_lines(summary)
    import ray

    assert ray.is_initialized()  # the module's Ray, joined and left running (only a Ray the dry run started stops)
    logged: list[str] = []
    out, manifest = execute(cfg, progress=False, log=logged.append)
    identity = json.loads((out / "run.json").read_text())
    assert (identity["unit_rows"], identity["group_rows"], manifest["units"]["total"]) == (4, 4, 4)
    assert audit.engines.ray.LAST_RUN["workers"] == 3
    actors = [m for m in logged if "scoring actor" in m]
    assert len(actors) == 1 and actors[0].startswith("memaudit: ray: 3 scoring actor(s), ")
    assert actors[0].endswith(" 4 unit(s) in 3 group(s)")
    # the finished folder: its recorded split, whatever the workers now (not counted: no Ray needed to say it)
    again = dry_run(cfg, log=lambda m: None)["split"]
    assert again == {"engine": "ray", "workers": None, "workers_asked": 3, "unit_rows": 4, "units": 4, "group_rows": 4, "groups": 3}
