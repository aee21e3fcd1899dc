"""The Ray engine's behaviours that a mutation review of audit/engines/ray.py and audit/engines/__init__.py found
unpinned. No Ray is started: Ray's module functions are replaced by fakes, and the engine's actor classes and
driver loop run in this process (a tracker "handle" whose ``method.remote(...)`` calls the method now, a fake
``ray.get`` that returns its argument, and a stand-in for Ray Data's dataset that runs the stages in order).
Every expected value is written out by hand from docs/ray.md and the docstrings.
"""

from __future__ import annotations

from dataclasses import asdict
import functools
import json
import logging
import os
from pathlib import Path
import pickle
import queue
import signal
import threading
import time
from types import SimpleNamespace
import warnings

import numpy as np
import pytest

import audit.engines.ray as r
from audit.config import RunConfig
from audit.errors import IncompleteCaptureError, RunError, SourceError
from audit.faults import StallWatchdog
from audit.sources import Unit
from audit.unit import UnitGroup, UnitStats, as_group


# ---------------------------------------------------------------- fakes

class Handle:
    """A Ray actor handle as the engine uses it: ``handle.method.remote(*args)`` runs the method now."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        return SimpleNamespace(remote=getattr(self.obj, name))


@pytest.fixture
def ray_mod(monkeypatch):
    """The real ``ray`` module with ``ray.get`` returning its argument (the handles above answer at once), the
    SIGTERM handler that connect() installs restored, and _OWNED restored."""
    import ray

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setitem(r._OWNED, "started", False)
    before = signal.getsignal(signal.SIGTERM)
    yield ray
    signal.signal(signal.SIGTERM, before)


def _unit(index: int, start: int = 0, stop: int = 3, url: str = "/d/p.txt") -> Unit:
    return Unit(index, url, "txt", start, stop)


# ---------------------------------------------------------------- audit.engines

def test_get_engine_names_each_module_and_lists_the_engines_when_unknown():
    from audit.engines import ENGINES, EngineJob, get_engine

    assert get_engine("ray").__name__ == "audit.engines.ray" and get_engine("ray").IN_PROCESS is False
    assert get_engine("local").__name__ == "audit.engines.local" and get_engine("local").IN_PROCESS is True
    assert list(ENGINES) == ["local", "ray"]
    with pytest.raises(RunError, match=r"^--engine dask: choose one of local, ray$"):
        get_engine("dask")
    assert EngineJob([], None, Path("."), print, "m", None, "f").scorer is None


# ---------------------------------------------------------------- connect

@pytest.fixture
def fake_init(ray_mod, monkeypatch):
    """connect() with Ray not initialized and ray.init recording its keyword arguments (or raising
    ``raises[0]``); Ray's environment defaults and the two loggers quiet_ray sets are restored after."""
    for var in ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_AUTO_CONNECT", "RAY_ADDRESS", "MEMAUDIT_RAY_LOGS"):
        monkeypatch.delenv(var, raising=False)
    for name in ("ray.data", "ray._private.authentication"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    calls: list[dict] = []
    raises: list[BaseException] = []

    def init(**kw):
        calls.append(kw)
        if raises:
            raise raises[0]

    monkeypatch.setattr(ray_mod, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_mod, "init", init)
    return SimpleNamespace(calls=calls, raises=raises, monkeypatch=monkeypatch)


def test_connect_starts_a_quiet_local_ray_without_dashboard_and_owns_it(fake_init):
    assert r.connect(None) is True and r._OWNED["started"] is True
    assert fake_init.calls == [{"include_dashboard": False, "ignore_reinit_error": True, "logging_level": "ERROR",
                                "configure_logging": True, "log_to_driver": False}]
    # usage stats off, and no implicit ray.init from Ray Data's thread (read when ray is imported)
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0" and os.environ["RAY_ENABLE_AUTO_CONNECT"] == "0"
    assert logging.getLogger("ray.data").level == logging.ERROR  # quiet_ray() ran
    fake_init.monkeypatch.setenv("MEMAUDIT_RAY_LOGS", "1")  # --debug: the actors' output reaches the terminal
    r.connect(None)
    assert fake_init.calls[-1]["log_to_driver"] is True


def test_connect_reuses_an_initialized_ray_and_does_not_own_it(fake_init, ray_mod):
    fake_init.monkeypatch.setattr(ray_mod, "is_initialized", lambda: True)
    assert r.connect("auto") is False and fake_init.calls == [] and r._OWNED["started"] is False


def test_connect_joins_an_address_without_owning_it(fake_init):
    assert r.connect("auto") is False and r._OWNED["started"] is False
    assert fake_init.calls == [{"address": "auto", "ignore_reinit_error": True, "logging_level": "ERROR",
                                "configure_logging": True, "log_to_driver": False}]


def test_connect_failure_says_rays_reason_in_one_line(fake_init):
    """A first line ending with ':' is followed by its next two lines; otherwise the first line alone."""
    fake_init.raises.append(ConnectionError("Could not find any running Ray instance:\n  check the address\n"
                                            "  is the head up\n  fourth line\n"))
    with pytest.raises(RunError, match=r"^--address auto: cannot join the Ray cluster \(ConnectionError: Could not "
                                       r"find any running Ray instance: check the address is the head up\)$"):
        r.connect("auto")
    fake_init.raises[0] = ValueError("bad version\nsecond line")
    with pytest.raises(RunError, match=r"^--address auto: cannot join the Ray cluster \(ValueError: bad version\)$"):
        r.connect("auto")


# ---------------------------------------------------------------- check_reachable

class FakeSocket:
    def __init__(self, reply):
        self.reply, self.sent = reply, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def sendall(self, data):
        self.sent.append(data)

    def recv(self, n):
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply[:n]


@pytest.fixture
def sockets(monkeypatch):
    """socket.create_connection answering with ``replies[0]`` (bytes, or an exception recv raises); records the
    calls. A reply given as ``OSError`` at index 'connect' fails the connection itself."""
    import socket

    state = SimpleNamespace(calls=[], reply=b"\x00\x00\x00\x04", connect_error=None, sock=None)

    def create_connection(addr, timeout=None):
        state.calls.append((addr, timeout))
        if state.connect_error:
            raise state.connect_error
        state.sock = FakeSocket(state.reply)
        return state.sock

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return state


def test_check_reachable_leaves_a_bare_host_to_ray_and_reads_ipv6_ports(sockets):
    r.check_reachable("headnode")  # no port: not HOST:PORT, left to Ray
    assert sockets.calls == []
    with pytest.raises(RunError, match=r"^--address \[::1\]:notaport: the port 'notaport' is not a number"):
        r.check_reachable("[::1]:notaport")
    r.check_reachable("[::1]:6379")  # a binary (SETTINGS frame) reply: on to ray.init
    assert sockets.calls == [(("::1", 6379), 5.0)]
    # the HTTP/2 client connection preface (RFC 7540 3.5) and an empty SETTINGS frame (length 0, type 4)
    assert sockets.sock.sent == [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"]


def test_check_reachable_says_nothing_answers_within_the_default_5_s(sockets):
    sockets.connect_error = ConnectionRefusedError("[Errno 111] Connection refused")
    with pytest.raises(RunError, match=r"^--address h:7: cannot join the Ray cluster \(nothing answers there within "
                                       r"5 s: \[Errno 111\] Connection refused\); start it with `ray start --head`"):
        r.check_reachable("h:7")


@pytest.mark.parametrize("reply", [b"", ConnectionResetError("reset by peer"), b" text after a space",
                                   b"\x7f\x00", b"\x00\x00\x18\x04"])
def test_check_reachable_leaves_no_reply_a_reset_or_a_non_text_reply_to_ray(sockets, reply):
    sockets.reply = reply
    r.check_reachable("h:6379")


@pytest.mark.parametrize("reply, shown", [
    (b"!", "!"), (b"~x", "~x"),  # the ends of printable ASCII (0x21, 0x7E) are text
    (b"SSH-2.0-OpenSSH_9.6\r\nmore", "SSH-2.0-OpenSSH_9.6"),  # the first line only
    (b"-ERR wrong number of arguments for 'get' command\r\n", "-ERR wrong number of arguments for 'get'"),  # 40 chars
])
def test_check_reachable_refuses_a_text_reply_showing_its_first_40_characters(sockets, reply, shown):
    sockets.reply = reply
    with pytest.raises(RunError) as err:
        r.check_reachable("h:8265")
    assert str(err.value).startswith(f"--address h:8265: something answers there, but not a Ray cluster's GCS (it "
                                     f"replied {shown!r}...)")


# ---------------------------------------------------------------- ray_logs, quiet_ray

@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_ray_logs_only_when_memaudit_ray_logs_is_set_to_something_but_0(monkeypatch, value, on):
    monkeypatch.delenv("MEMAUDIT_RAY_LOGS", raising=False)
    if value is not None:
        monkeypatch.setenv("MEMAUDIT_RAY_LOGS", value)
    assert r.ray_logs() is on


def test_quiet_ray_silences_ray_data_user_warnings_and_two_loggers_only(monkeypatch):
    for name in ("ray.data", "ray._private.authentication"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r.quiet_ray()
        warnings.warn_explicit("hint", UserWarning, "plan.py", 1, module="ray.data._internal.plan")
        warnings.warn_explicit("ours", UserWarning, "unit.py", 1, module="audit.unit")
        warnings.warn_explicit("old", DeprecationWarning, "context.py", 1, module="ray.data.context")
    assert sorted(str(w.message) for w in seen) == ["old", "ours"]
    assert logging.getLogger("ray.data").level == logging.ERROR
    assert logging.getLogger("ray._private.authentication").level == logging.ERROR


# ---------------------------------------------------------------- worker_count, plan_resources

def test_worker_count_joins_the_given_address_and_sizes_the_pool_with_workers(monkeypatch, ray_mod):
    joined = []
    monkeypatch.setattr(r, "connect", joined.append)
    monkeypatch.setattr(ray_mod, "cluster_resources", lambda: {"CPU": 3.0})
    assert r.worker_count(RunConfig(inputs=("x",), address="h:1")) == 3
    assert r.worker_count(RunConfig(inputs=("x",), address="h:1", workers=2)) == 2
    assert joined == ["h:1", "h:1"]


def test_plan_resources_edges(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(r.os, "cpu_count", lambda: 2)
    # no CPU key: 1 CPU; 0.75 / 4 = 0.1875 -> 0.19
    assert r.plan_resources({"GPU": 4.0}, None)["num_cpus"] == 0.19
    # a fraction of a GPU is no GPU: CPU actors
    half = r.plan_resources({"CPU": 2.0, "GPU": 0.5}, None)
    assert (half["workers"], half["num_gpus"], half["threads"]) == (2, 0, 1)
    # half a CPU: still one actor, 0.375 CPU -> 0.38; --workers 3 is cut to that one
    half_cpu = r.plan_resources({"CPU": 0.5}, None)
    assert (half_cpu["workers"], half_cpu["num_cpus"]) == (1, 0.38)
    assert (r.plan_resources({"CPU": 0.5}, 3)["workers"], r.plan_resources({"CPU": 0.5}, 3)["capped_from"]) == (1, 3)
    assert r.plan_resources({"CPU": 1.0, "GPU": 100.0}, None)["num_cpus"] == 0.01  # 0.0075, at least 0.01
    assert r.plan_resources({"CPU": 2.0, "GPU": 7.0}, None)["num_cpus"] == 0.21  # 1.5 / 7 = 0.214...
    # 16 actors on a cluster of 16 CPUs, driven from a 2-core machine: one thread each, not 2 // 16 = 0
    assert r.plan_resources({"CPU": 16.0}, None)["threads"] == 1
    monkeypatch.setattr(r.os, "cpu_count", lambda: None)  # unknown: one core
    assert r.plan_resources({"CPU": 1.0}, None)["threads"] == 1


# ---------------------------------------------------------------- ProgressTracker

def test_progress_tracker_counts_rows_per_attempt_and_attempts_per_unit():
    t = r.ProgressTracker()
    assert t.started(0) == 1
    t.add(0, 5)
    t.add(0, 2)
    assert t.snapshot() == {"rows": 7, "events": 3, "attempts": {0: 1}, "actors": []}
    assert t.started(0) == 2  # a new attempt: unit 0's rows restart from 0
    t.add(0, 4)
    assert t.started(1) == 1
    t.add(1, 3)
    t.actor_ready({"spawn_s": 1.0})
    assert t.snapshot() == {"rows": 7, "events": 7, "attempts": {0: 2, 1: 1}, "actors": [{"spawn_s": 1.0}]}


# ---------------------------------------------------------------- _read_units

def test_read_units_prepares_each_group_and_leaves_an_unreadable_one_to_the_actor(tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("a red cat\na blue dog\na green fox\n")
    good = UnitGroup((Unit(0, str(src), "txt", 0, 1), Unit(1, str(src), "txt", 1, 3, byte_offset=10)), 3)
    missing = UnitGroup((Unit(2, str(tmp_path / "gone.txt"), "txt", 0, 2),), 2)
    groups = [json.dumps(good.to_dict()), json.dumps(missing.to_dict())]
    out = r._read_units({"group": np.array(groups, dtype=object)}, RunConfig(inputs=(str(src),)))
    assert list(out["group"]) == groups
    first, second = pickle.loads(out["prepared"][0])  # one prepared unit each, in the group's order
    assert first.prompts == ["a red cat"] and first.rows_read == 1
    assert second.prompts == ["a blue dog", "a green fox"] and second.rows == [1, 2]
    assert out["prepared"][1] == b""


# ---------------------------------------------------------------- UnitScorer, in this process

@pytest.fixture
def actor(ray_mod, monkeypatch):
    """UnitScorer's collaborators replaced: load_model and Scorer record their arguments, torch's thread count is
    recorded (not changed), process_units is ``state.process`` (default: a UnitStats of each unit's rows, calling
    progress with the group's; a UnitStats it returns stands for a list of one). ``make(**kw)`` builds a UnitScorer
    with a ProgressTracker handle."""
    import torch

    import audit.models
    import audit.scorers

    state = SimpleNamespace(loads=[], scorers=[], threads=[], calls=[], tracker=r.ProgressTracker(), process=None)

    def load_model(model_arg, device, dtype):
        state.loads.append((model_arg, device, dtype))
        return SimpleNamespace(fingerprint="fp")

    def process_units(group, scorer, cfg, shard_dir, progress=None, prepared=None):
        state.calls.append((group.index, prepared, shard_dir))
        if state.process:
            got = state.process(group, progress, prepared)
            return [got] if isinstance(got, UnitStats) else got
        progress(group.rows)
        return [UnitStats(unit=u.index, rows_read=u.rows, scored=u.rows) for u in group.units]

    monkeypatch.setattr(audit.models, "load_model", load_model)
    monkeypatch.setattr(audit.scorers, "Scorer", lambda model, sc, compile=False: state.scorers.append(compile) or "S")
    monkeypatch.setattr(torch, "set_num_threads", state.threads.append)
    monkeypatch.setattr(r, "process_units", process_units)
    monkeypatch.setattr(r, "peak_rss_mib", lambda: 123.5)

    def make(cfg=None, dtype="float32", fingerprint="fp", threads=None, retries=2, hook=None, launched_at=0.0):
        cfg = cfg or RunConfig(inputs=("x",), device="cpu", dtype="float32")
        return r.UnitScorer("m", cfg, SimpleNamespace(dtype=dtype), fingerprint, "/shards", Handle(state.tracker),
                            threads, retries, hook, launched_at=launched_at)

    state.make = make
    return state


def test_actor_loads_on_its_device_with_the_runs_dtype_and_reports_its_start(actor, monkeypatch):
    ticks = iter([10.0, 13.0, 20.0, 21.5] * 2)  # perf_counter: start, imported, loaded, scorer built
    monkeypatch.setattr(r, "time", SimpleNamespace(time=time.time, perf_counter=lambda: next(ticks)))
    actor.make(RunConfig(inputs=("x",), device="cpu", dtype="float32", compile=True), threads=3,
               launched_at=time.time() - 100)
    assert actor.loads == [("m", "cpu", "float32")] and actor.scorers == [True] and actor.threads == [3]
    [start] = actor.tracker.actors
    assert 100 <= start["spawn_s"] < 200
    assert {k: start[k] for k in ("import_s", "load_s", "scorer_s")} == {"import_s": 3.0, "load_s": 7.0,
                                                                          "scorer_s": 1.5}
    actor.make()  # launched_at unknown: spawn_s is NaN; no thread setting (a GPU actor)
    assert np.isnan(actor.tracker.actors[1]["spawn_s"]) and actor.threads == [3]


def test_actor_device_follows_its_gpu_and_the_runs_device(actor, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    actor.make(RunConfig(inputs=("x",), device="auto", dtype="float32"))
    actor.make(RunConfig(inputs=("x",), device="cpu", dtype="float32"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # Ray gave this actor no GPU
    actor.make(RunConfig(inputs=("x",), device="auto", dtype="float32"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    actor.make(RunConfig(inputs=("x",), device="cuda:0", dtype="float32"))  # asked for: not silently the CPU
    assert [d for _, d, _ in actor.loads] == ["cuda", "cpu", "auto", "cuda:0"]


def test_actor_refuses_another_auto_dtype_or_other_weights(actor):
    auto = RunConfig(inputs=("x",), device="cpu", dtype="auto")
    with pytest.raises(RunError, match=r"^--dtype auto is float32 on this worker \(cpu\) but bfloat16 for the run: "
                                       r"the cluster mixes devices; pass --dtype explicitly$"):
        actor.make(auto, dtype="bfloat16")
    actor.make(auto, dtype="float32")  # the same dtype: loads with the run's dtype
    assert actor.loads == [("m", "cpu", "float32")]
    with pytest.raises(RunError, match=r"^--model m on this worker has fingerprint fp, the driver loaded other: "):
        actor.make(fingerprint="other")


def _batch(*pairs):
    return {"group": np.array([json.dumps(as_group(u).to_dict()) for u, _ in pairs], dtype=object),
            "prepared": np.array([blob for _, blob in pairs], dtype=object)}


def test_actor_scores_each_unit_of_a_batch_with_its_prepared_rows(actor):
    hooked = []
    scorer = actor.make(hook=lambda u: hooked.append(u.index))
    u4, u7 = _unit(4, 0, 3), _unit(7, 3, 5)
    out = scorer(_batch((u4, pickle.dumps("P4")), (u7, b"")))
    assert out["unit"].dtype == np.int64 and list(out["unit"]) == [4, 7]
    assert [json.loads(s) for s in out["stats"]] == [asdict(UnitStats(unit=4, rows_read=3, scored=3)),
                                                    asdict(UnitStats(unit=7, rows_read=2, scored=2))]
    assert list(out["error"]) == ["", ""] and list(out["peak_rss_mib"]) == [123.5, 123.5]
    assert actor.calls == [(4, "P4", Path("/shards")), (7, None, Path("/shards"))]  # b"": the unit is read again
    assert hooked == [4, 7]
    assert actor.tracker.snapshot()["rows"] == 5 and actor.tracker.attempts == {4: 1, 7: 1}


def test_actor_scores_a_group_once_and_returns_a_row_per_unit(actor):
    """A group of small units is one process_units call, one attempt and one hook call under its first unit's index;
    each unit gets its own stats row; a failed group is one row under that index."""
    hooked = []
    scorer = actor.make(hook=lambda g: hooked.append([u.index for u in g.units]))
    group = UnitGroup((_unit(4, 0, 1), _unit(5, 1, 2), _unit(9, 2, 4)), 6)  # 6: unit 6-8 were done before
    out = scorer(_batch((group, pickle.dumps(["P4", "P5", "P9"]))))
    assert list(out["unit"]) == [4, 5, 9] and list(out["error"]) == ["", "", ""]
    assert [json.loads(s)["rows_read"] for s in out["stats"]] == [1, 1, 2]
    assert actor.calls == [(4, ["P4", "P5", "P9"], Path("/shards"))] and hooked == [[4, 5, 9]]
    assert actor.tracker.attempts == {4: 1} and actor.tracker.snapshot()["rows"] == 4

    def process(group, progress, prepared):
        raise ValueError("bad")

    actor.process = process
    actor.tracker.attempts.clear()  # (else the group's first attempt above counts as a worker that died)
    out = actor.make(retries=0)(_batch((group, b"")))
    assert list(out["unit"]) == [4] and list(out["stats"]) == [""]
    assert list(out["error"]) == ["units 4-9 (3 of them left, scored together, /d/p.txt rows 0-1 to /d/p.txt rows 2-4) "
                                  "failed "
                                  "1 times, last with ValueError: bad; finished units are kept: rerun the same "
                                  "command to resume"]


def test_actor_retry_reads_the_unit_again_and_counts_the_attempt(actor):
    failed = []

    def process(unit, progress, prepared):
        if not failed:
            failed.append(unit.index)
            raise ValueError("flaky")
        return UnitStats(unit=unit.index, rows_read=3)

    actor.process = process
    out = actor.make(retries=1)(_batch((_unit(4), pickle.dumps("P4"))))
    assert list(out["error"]) == [""] and json.loads(out["stats"][0])["rows_read"] == 3
    assert [p for _, p, _ in actor.calls] == ["P4", None]  # the retry does not reuse the consumed rows
    assert actor.tracker.attempts == {4: 2}


@pytest.mark.parametrize("exc, message", [
    (ValueError("bad"), "unit 4 (/d/p.txt rows 0-3) failed 2 times, last with ValueError: bad; finished units are "
                        "kept: rerun the same command to resume"),
    (SourceError("unit 4: cannot read"), "unit 4: cannot read"),
    (IncompleteCaptureError("no maps"), "unit 4 (/d/p.txt rows 0-3): IncompleteCaptureError: no maps"),
])
def test_actor_reports_a_failed_unit_as_its_error_naming_it(actor, exc, message):
    def process(unit, progress, prepared):
        raise exc

    actor.process = process
    out = actor.make(retries=1)(_batch((_unit(4), b"")))
    assert list(out["stats"]) == [""] and list(out["error"]) == [message]


def test_actor_refuses_a_unit_whose_earlier_attempts_killed_their_workers(actor):
    """retries=2: 3 attempts in all. Two earlier attempts (deaths) leave the third; three leave none."""
    scorer = actor.make(retries=2)
    actor.tracker.attempts[4] = 2
    assert list(scorer(_batch((_unit(4), b"")))["error"]) == [""]
    actor.tracker.attempts[5] = 3
    out = scorer(_batch((_unit(5), b"")))
    assert list(out["error"]) == ["unit 5 (/d/p.txt rows 0-3): its scoring worker died on each of 3 attempts; "
                                  "finished units are kept: rerun the same command to resume"]
    assert [i for i, _, _ in actor.calls] == [4]


# ---------------------------------------------------------------- peak_rss_mib

def test_peak_rss_is_vmhwm_in_mib():
    b = bytearray(64 * 2**20)
    b[::4096] = b"x" * len(b[::4096])
    del b  # the peak stays, the resident set falls
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    assert r.peak_rss_mib() == hwm_kb / 1024


@pytest.mark.parametrize("platform, mib", [("linux", 3 * 2**20 / 1024), ("darwin", 3.0)])
def test_peak_rss_falls_back_to_ru_maxrss_in_the_platforms_unit(monkeypatch, platform, mib):
    import sys

    def no_proc(*a, **kw):
        raise OSError("no /proc")

    monkeypatch.setattr(r, "open", no_proc, raising=False)
    monkeypatch.setattr(r, "sys", SimpleNamespace(platform=platform, stderr=sys.stderr))
    monkeypatch.setitem(sys.modules, "resource", SimpleNamespace(
        RUSAGE_SELF=0, getrusage=lambda who: SimpleNamespace(ru_maxrss=3 * 2**20)))
    assert r.peak_rss_mib() == mib


# ---------------------------------------------------------------- run_ray, run

@pytest.fixture
def ray_calls(ray_mod, monkeypatch):
    """run_ray with connect and _run recorded (``state.connect_owns``: connect starts a Ray) and ray.shutdown
    counted."""
    state = SimpleNamespace(connects=[], runs=[], shutdowns=0, connect_owns=False, run_raises=None)

    def connect(address):
        state.connects.append(address)
        if state.connect_owns:
            r._OWNED["started"] = True

    def run(ray, units, cfg, shard_dir, progress, model_arg, score_config, fingerprint, log=None):
        state.runs.append((shard_dir, model_arg, score_config, fingerprint))
        if state.run_raises:
            raise state.run_raises
        return ["stats"]

    def shutdown():
        state.shutdowns += 1

    monkeypatch.setattr(r, "connect", connect)
    monkeypatch.setattr(r, "_run", run)
    monkeypatch.setattr(ray_mod, "shutdown", shutdown)
    return state


def test_run_ray_with_nothing_to_do_shuts_down_a_ray_the_probes_started(ray_calls):
    cfg = RunConfig(inputs=("x",))
    assert r.run_ray([], cfg, Path("s"), print, model_arg="m", score_config=None) == []
    assert ray_calls.shutdowns == 0 and ray_calls.connects == []
    r._OWNED["started"] = True
    assert r.run_ray([], cfg, Path("s"), print, model_arg="m", score_config=None) == []
    assert ray_calls.shutdowns == 1 and r._OWNED["started"] is False


def test_run_ray_joins_the_address_and_shuts_down_only_its_own_ray_even_on_failure(ray_calls):
    cfg = RunConfig(inputs=("x",), address="h:1")
    assert r.run_ray([_unit(0)], cfg, "shards", print, model_arg="m", score_config="sc", fingerprint="f") == ["stats"]
    # the shard folder reaches the actors absolute (their working folder is not the driver's)
    assert ray_calls.connects == ["h:1"] and ray_calls.runs == [(Path("shards").absolute(), "m", "sc", "f")]
    assert ray_calls.shutdowns == 0
    ray_calls.connect_owns, ray_calls.run_raises = True, RunError("stalled")
    with pytest.raises(RunError, match="stalled"):
        r.run_ray([_unit(0)], cfg, "shards", print, model_arg="m", score_config="sc", fingerprint="f")
    assert ray_calls.shutdowns == 1 and r._OWNED["started"] is False


def test_run_hands_the_job_to_run_ray(monkeypatch):
    from audit.engines import EngineJob

    seen = []
    monkeypatch.setattr(r, "run_ray", lambda *a, **kw: seen.append((a, kw)) or ["ok"])
    progress = print
    job = EngineJob(["u"], "cfg", Path("s"), progress, "model", "sc", "fp")
    assert r.run(job) == ["ok"]
    assert seen == [((["u"], "cfg", Path("s"), progress),
                     {"model_arg": "model", "score_config": "sc", "fingerprint": "fp", "log": None})]
    job = EngineJob(["u"], "cfg", Path("s"), progress, "model", "sc", "fp", None, seen.append)
    r.run(job)
    assert seen[-1][1]["log"] == seen.append  # the run's log, which the engine's lines go through


# ---------------------------------------------------------------- _run

class FakeRay:
    """What _run calls on ``ray``: cluster_resources (a scripted sequence, the last repeated), remote, kill."""

    def __init__(self, resources):
        self.resources, self.remotes, self.killed = list(resources), [], []

    def cluster_resources(self):
        return self.resources.pop(0) if len(self.resources) > 1 else self.resources[0]

    def remote(self, **kw):
        self.remotes.append(kw)
        return lambda cls: SimpleNamespace(remote=lambda: f"handle of {cls.__name__}")

    def kill(self, handle):
        self.killed.append(handle)


@pytest.fixture
def run_env(monkeypatch):
    """_run with _execute recorded (or raising ``state.raises``), a fake clock (monotonic += 1 a call; sleep
    counted) and Ray Data's context flags restored after."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setattr(ctx, "print_on_execution_start", True)
    monkeypatch.setattr(logging.getLogger("ray.data"), "level", logging.NOTSET)
    monkeypatch.delenv("MEMAUDIT_RAY_LOGS", raising=False)
    state = SimpleNamespace(executed=[], sleeps=0, now=0.0, raises=None, ctx=ctx)

    def execute(ray, units, cfg, shard_dir, progress, model_arg, score_config, fingerprint, res, tracker):
        state.executed.append({"fingerprint": fingerprint, "res": res, "tracker": tracker})
        if state.raises:
            raise state.raises
        return ["done"]

    def monotonic():
        state.now += 1
        return state.now

    def sleep(s):
        state.sleeps += 1

    monkeypatch.setattr(r, "_execute", execute)
    monkeypatch.setattr(r, "time", SimpleNamespace(monotonic=monotonic, sleep=sleep, time=time.time))
    return state


def test_run_plans_the_pool_logs_it_and_quiets_ray_data(run_env, capsys):
    ray = FakeRay([{"CPU": 2.0}])
    units = [_unit(0), _unit(1), _unit(2)]
    cfg = RunConfig(inputs=("x",), workers=5)
    assert r._run(ray, units, cfg, Path("s"), print, "m", None, "fp") == ["done"]
    [call] = run_env.executed
    assert (call["res"]["workers"], call["res"]["num_cpus"], call["fingerprint"]) == (2, 0.75, "fp")
    assert call["tracker"] == "handle of ProgressTracker" and ray.remotes == [{"num_cpus": 0}]  # the tracker: no CPU
    assert ray.killed == ["handle of ProgressTracker"]
    assert capsys.readouterr().err.splitlines() == [
        "memaudit: ray: --workers 5 is more CPU actors than the cluster's 2 CPUs; using 2",
        "memaudit: ray: 2 scoring actor(s), 0 GPU and 0.75 CPU each, 3 unit(s) in 3 group(s)"]
    assert run_env.ctx.enable_progress_bars is False and run_env.ctx.print_on_execution_start is False
    assert logging.getLogger("ray.data").level == logging.CRITICAL


def test_run_keeps_ray_data_errors_with_ray_logs_and_kills_the_tracker_on_failure(run_env, monkeypatch, capsys):
    monkeypatch.setenv("MEMAUDIT_RAY_LOGS", "1")
    run_env.raises = RunError("unit 0 failed")
    ray = FakeRay([{"CPU": 2.0}])
    with pytest.raises(RunError, match="unit 0 failed"):
        r._run(ray, [_unit(0)], RunConfig(inputs=("x",)), Path("s"), print, "m", None, "fp")
    assert ray.killed == ["handle of ProgressTracker"] and logging.getLogger("ray.data").level == logging.ERROR
    assert "--workers" not in capsys.readouterr().err  # not capped: no such line


def test_run_fingerprints_the_model_when_the_driver_gave_none(run_env, monkeypatch):
    """The weights' fingerprint of the folder the model argument resolves to (a hub id: its cached snapshot)."""
    import audit.models

    monkeypatch.setattr(audit.models, "resolve_model_dir", lambda arg: (arg, Path("/hub/snapshots") / arg))
    monkeypatch.setattr(audit.models, "fingerprint_files", lambda folder: f"hash of {folder}")
    r._run(FakeRay([{"CPU": 1.0}]), [_unit(0)], RunConfig(inputs=("x",)), Path("s"), print, "org-model", None, None)
    assert run_env.executed[0]["fingerprint"] == "hash of /hub/snapshots/org-model"


def test_run_waits_for_cpus_to_join_even_with_the_stall_timeout_off(run_env):
    """No CPU and no GPU yet (a head with num-cpus 0): wait, polling; --stall-timeout 0 waits up to 900 s."""
    ray = FakeRay([{}, {"memory": 1.0}, {"CPU": 1.0}])
    r._run(ray, [_unit(0)], RunConfig(inputs=("x",), stall_timeout=0), Path("s"), print, "m", None, "fp")
    assert run_env.sleeps == 2 and run_env.executed[0]["res"]["workers"] == 1
    ray = FakeRay([{}, {"GPU": 1.0}])  # GPUs alone are enough
    r._run(ray, [_unit(0)], RunConfig(inputs=("x",)), Path("s"), print, "m", None, "fp")
    assert run_env.executed[1]["res"]["num_gpus"] == 1


def test_run_gives_up_waiting_for_cpus_strictly_after_the_stall_timeout(run_env):
    # the clock moves 1 a call: deadline = 1 + 2 = 3; checks at 2 and 3 wait, at 4 fail
    with pytest.raises(RunError, match=r"^the Ray cluster has no CPU or GPU for scoring actors"):
        r._run(FakeRay([{}]), [_unit(0)], RunConfig(inputs=("x",), stall_timeout=2), Path("s"), print, "m", None,
               "fp")
    assert run_env.sleeps == 2 and run_env.executed == []


# ---------------------------------------------------------------- probe_dtype

@pytest.fixture
def probe(ray_mod, monkeypatch):
    state = SimpleNamespace(connects=[], remotes=[], gets=[], resources={"GPU": 2.0, "CPU": 8.0})
    monkeypatch.setattr(r, "connect", state.connects.append)
    monkeypatch.setattr(ray_mod, "cluster_resources", lambda: state.resources)

    def remote(**kw):
        state.remotes.append(kw)
        return lambda fn: SimpleNamespace(remote=lambda: f"ref of {fn.__name__}")

    def get(ref, timeout=None):
        state.gets.append((ref, timeout))
        return "bfloat16"

    monkeypatch.setattr(ray_mod, "remote", remote)
    monkeypatch.setattr(ray_mod, "get", get)
    return state


def test_probe_dtype_only_for_auto_on_a_gpu_device_and_on_a_gpu_worker(probe):
    assert r.probe_dtype(RunConfig(inputs=("x",), dtype="float16")) is None
    assert r.probe_dtype(RunConfig(inputs=("x",), device="cpu")) is None
    assert probe.connects == []  # decided without Ray
    assert r.probe_dtype(RunConfig(inputs=("x",), address="h:1", stall_timeout=30)) == "bfloat16"
    assert r.probe_dtype(RunConfig(inputs=("x",), device="cuda:1", stall_timeout=30)) == "bfloat16"
    assert probe.connects == ["h:1", None]
    assert probe.remotes == [{"num_gpus": 1, "num_cpus": 0}] * 2
    assert probe.gets == [("ref of _resolve_auto_dtype", 30)] * 2
    probe.resources = {"CPU": 8.0}
    assert r.probe_dtype(RunConfig(inputs=("x",))) is None  # no GPU in the cluster: the driver resolves it


def test_probe_dtype_waits_without_a_limit_when_the_stall_timeout_is_off(probe):
    """RunConfig's stall_timeout 0 means never (as None): ray.get's timeout=0 would give up at once
    (GetTimeoutError unless the probe task had already finished)."""
    assert r.probe_dtype(RunConfig(inputs=("x",), stall_timeout=0)) == "bfloat16"
    assert r.probe_dtype(RunConfig(inputs=("x",), stall_timeout=None)) == "bfloat16"
    assert [t for _, t in probe.gets] == [None, None]


def test_resolve_auto_dtype_on_the_workers_cuda_device_without_torch_prefix(monkeypatch):
    import torch

    import audit.models

    asked = []
    monkeypatch.setattr(audit.models, "resolve_device", lambda d: asked.append(d) or torch.device("cpu"))
    assert r._resolve_auto_dtype() == "float32" and asked == ["cuda"]


# ---------------------------------------------------------------- _explain_failure

def test_explain_failure_names_the_units_whose_workers_kept_dying_most_attempts_first(tmp_path, monkeypatch):
    by_unit = {i: as_group(_unit(i, 10 * i, 10 * i + 10)) for i in range(5)}  # groups of one
    stats = {0: {}}
    snap = {"attempts": {0: 9, 1: 4, 2: 5, 3: 3, 4: 6}}
    monkeypatch.setattr(r, "unit_done", lambda shard_dir, u: u.index == 4)  # committed meanwhile
    exc = RuntimeError("ray.exceptions.ActorDiedError\nThe actor died unexpectedly\n" + "x" * 400)
    msg = r._explain_failure(exc, by_unit, stats, snap, 3, tmp_path)
    assert msg == ("unit 2 (/d/p.txt rows 20-30), unit 1 (/d/p.txt rows 10-20): its scoring worker died on each of 5 "
                   f"attempts (RuntimeError: {'x' * 300}); finished units are kept: rerun the same command to resume")


def test_explain_failure_says_a_worker_that_cannot_start_in_full(tmp_path):
    reason = "--model m on this worker has fingerprint a, the driver loaded b: every node must see the same weights"
    for kind in ("RunError", "ModelError"):
        exc = RuntimeError(f"ActorDiedError\n  raise ...\naudit.errors.{kind}: {reason}")
        assert r._explain_failure(exc, {}, {}, {}, 3, tmp_path) == (f"the scoring workers could not start: {reason} "
                                                                     "(finished units are kept)")


# ---------------------------------------------------------------- _drive

class Call:
    """A script step that runs ``fn`` and delivers what it returns."""

    def __init__(self, fn):
        self.fn = fn


class ScriptedQueue:
    """The results queue as _drive reads it: each get() takes the next step, ``(kind, item)``, a :class:`Call`, or
    a callable (run, then the queue is empty this time); past the script, empty. Every get() moves ``clock`` by 1."""

    def __init__(self, steps, clock):
        self.steps, self.clock = list(steps), clock

    def get(self, timeout=None):
        self.clock.now += 1
        step = self.steps.pop(0) if self.steps else None
        if isinstance(step, Call):
            return step.fn()
        if step is None or callable(step):
            if step:
                step()
            raise queue.Empty
        return step


def _row(unit: int, rows: int, peak: float = 1.0, error: str = "") -> tuple:
    stats = "" if error else json.dumps({"unit": unit, "rows_read": rows})
    return ("row", {"unit": np.int64(unit), "stats": stats, "error": error, "peak_rss_mib": peak})


@pytest.fixture
def drive(ray_mod, monkeypatch):
    """``go(steps, units, stall_timeout)``: _drive over a scripted queue with a fake clock for its watchdog;
    returns what it returned; ``state.progress`` the progress calls, ``state.stop`` the stop event."""
    state = SimpleNamespace(progress=[], tracker=r.ProgressTracker(), stop=threading.Event(),
                            clock=SimpleNamespace(now=0.0))
    monkeypatch.setattr(r, "StallWatchdog", functools.partial(StallWatchdog, clock=lambda: state.clock.now))
    monkeypatch.setattr(r, "LAST_RUN", {"stale": 1, "first_unit_s": 99.0})

    def go(steps, units, stall_timeout=50):  # (a loop that missed its end stalls instead of hanging)
        cfg = RunConfig(inputs=("x",), stall_timeout=stall_timeout)
        res = {"workers": 2}
        groups = [as_group(u) for u in units]  # (_run makes the groups _execute and _drive take)
        return r._drive(ray_mod, groups, cfg, Path("s"), state.progress.append, res, Handle(state.tracker), 3,
                        ScriptedQueue(steps, state.clock), state.stop)

    state.go = go
    return state


def test_drive_returns_stats_by_unit_index_and_shows_progress_from_either_count(drive):
    """Rows done: the larger of the tracker's rows (scored batches) and the rows of the units come back."""
    t = drive.tracker
    units = [_unit(0, 0, 3), _unit(1, 3, 5)]
    steps = [lambda: t.add(0, 2),  # the tracker: 2 rows
             lambda: t.add(0, 1),  # 3
             _row(1, 2, peak=5.0),  # units back: 2 rows; the tracker still 3
             _row(0, 3, peak=3.0),  # units back: 5
             ("end", None)]
    out = drive.go(steps, units)
    assert out == [{"unit": 0, "rows_read": 3}, {"unit": 1, "rows_read": 2}]
    assert drive.progress == [2, 1, 2]
    assert r.LAST_RUN["workers"] == 2 and r.LAST_RUN["worker_peak_rss_mib"] == 5.0
    assert "stale" not in r.LAST_RUN and "first_unit_s" not in r.LAST_RUN  # no unit was started (no attempts)


def test_drive_shows_each_unit_as_it_comes_back_without_tracker_rows(drive):
    drive.go([_row(0, 3), _row(1, 2), ("end", None)], [_unit(0, 0, 3), _unit(1, 3, 5)])
    assert drive.progress == [3, 2]


def test_drive_records_the_first_unit_and_the_actors_that_started_by_the_end(drive):
    t = drive.tracker

    def end_after_an_actor_started():  # an actor reported ready just before the end came back
        t.actor_ready({"load_s": 1.0})
        return ("end", None)

    drive.go([lambda: t.started(0), _row(0, 3), Call(end_after_an_actor_started)], [_unit(0)])
    assert "first_unit_s" in r.LAST_RUN and r.LAST_RUN["first_unit_s"] != 99.0
    assert r.LAST_RUN["actor_start"] == [{"load_s": 1.0}]


def test_drive_fails_on_a_units_error_and_stops_the_stream(drive):
    with pytest.raises(RunError, match=r"^unit 1 \(x\): broken$"):
        drive.go([_row(1, 0, error="unit 1 (x): broken")], [_unit(0), _unit(1)])
    assert drive.stop.is_set()


def test_drive_fails_naming_the_units_missing_at_the_end(drive):
    units = [_unit(0, 0, 3), _unit(1, 3, 6), _unit(2, 6, 9)]
    with pytest.raises(RunError, match=r"^the Ray run ended without 2 unit\(s\), first unit 1 \(/d/p.txt rows 3-6\); "
                                       r"rerun the same command to resume$"):
        drive.go([_row(0, 3), ("end", None)], units)


def test_drive_turns_a_failed_execution_into_its_explanation(drive):
    boom = RuntimeError("boom")
    with pytest.raises(RunError, match=r"^the Ray run failed \(RuntimeError: boom\); finished units are kept") as err:
        drive.go([("exc", boom)], [_unit(0)])
    assert err.value.__cause__ is boom


def test_drive_rows_or_tracker_events_keep_the_watchdog_quiet(drive):
    """stall_timeout 2.5 and the clock moving 1 a poll: progress every poll, by rows alone or by tracker events
    alone, is no stall; ``end`` ends the loop."""
    units = [_unit(i, 0, 1) for i in range(4)]
    assert len(drive.go([_row(i, 1) for i in range(4)] + [("end", None)], units, stall_timeout=2.5)) == 4
    t = drive.tracker
    steps = [lambda: t.add(0, 0), lambda: t.add(0, 0), lambda: t.add(0, 0), lambda: t.add(0, 0)]
    assert len(drive.go(steps + [_row(i, 1) for i in range(4)] + [("end", None)], units, stall_timeout=2.5)) == 4


@pytest.mark.parametrize("done, waiting", [
    (0, "unit 0 (/d/p.txt rows 0-1), unit 1 (/d/p.txt rows 1-2), unit 2 (/d/p.txt rows 2-3) ..."),
    (2, "unit 2 (/d/p.txt rows 2-3), unit 3 (/d/p.txt rows 3-4), unit 4 (/d/p.txt rows 4-5)"),
])
def test_drive_stall_names_the_first_three_units_waited_on(drive, done, waiting):
    units = [_unit(i, i, i + 1) for i in range(5)]
    with pytest.raises(RunError) as err:
        drive.go([_row(i, 1) for i in range(done)], units, stall_timeout=2.5)
    assert str(err.value) == (f"the Ray run made no progress for 2.5 s (--stall-timeout); waiting on {waiting}; "
                              "finished units are kept: rerun the same command to resume")
    assert drive.stop.is_set()


# ---------------------------------------------------------------- _execute, _record_executor, _stop_stream

class FakeExecutor:
    def __init__(self):
        self.shutdowns: list[bool] = []
        self.down = threading.Event()

    def shutdown(self, force=False):
        self.shutdowns.append(force)
        self.down.set()


class FakeDataset:
    """Ray Data's dataset as _execute drives it, run in this process: map_batches records each stage; iter_rows
    creates its executor (``_create_executor``, which _record_executor wraps, as Ray Data's does) and runs each
    item through the stages, one row at a time (the read function per batch, one instance of the actor class).
    Before row ``wait_before`` it waits for the executor's shutdown (a stage that does not return), then
    ``after_shutdown``: "end" (the iterator ends) or "continue" (rows already in flight still come)."""

    def __init__(self, items, override_num_blocks=None):
        self.items, self.blocks, self.stages, self.produced = items, override_num_blocks, [], []
        self.wait_before, self.after_shutdown, self.executor = None, "end", FakeExecutor()

    def map_batches(self, fn, **kw):
        self.stages.append((fn, kw))
        return self

    def _create_executor(self):
        return self.executor

    def iter_rows(self):
        executor = self._create_executor()
        actor = None
        for i, item in enumerate(self.items):
            if i == self.wait_before:
                executor.down.wait(30)
                if self.after_shutdown == "end":
                    return
            batch = {"group": np.array([item["group"]], dtype=object)}
            for fn, kw in self.stages:
                if isinstance(fn, type):
                    actor = actor or fn(**kw["fn_constructor_kwargs"])
                    batch = actor(batch)
                else:
                    batch = fn(batch, **kw["fn_kwargs"])
            self.produced.append(i)
            for j in range(len(next(iter(batch.values())))):  # the actor's rows: one per unit of the group
                yield {k: v[j] for k, v in batch.items()}


@pytest.fixture
def execute(actor, monkeypatch, tmp_path):
    """``go(res, stall_timeout, setup, work)``: _execute on 3 units of a 5-line file (units of 2 rows; ``work``: groups
    of them instead) through a FakeDataset, the actor's collaborators faked (the ``actor`` fixture); ``setup(ds)``
    before iterating."""
    from audit.pipeline import build_plan

    src = tmp_path / "p.txt"
    src.write_text("a red cat\na blue dog\na green fox\na pink owl\na grey emu\n")
    cfg = RunConfig(inputs=(str(src),), unit_rows=2, device="cpu", dtype="float32", stall_timeout=3)
    units = build_plan(cfg).units
    monkeypatch.setattr(r, "POLL_S", 0.02)
    monkeypatch.setattr(r, "UNIT_RETRIES", 5)
    monkeypatch.setattr(r, "UNIT_HOOK", lambda unit: None)
    monkeypatch.setattr(r, "LAST_RUN", {})
    monkeypatch.setattr(r, "_stop_stream", functools.partial(r._stop_stream, timeout=3))
    state = SimpleNamespace(units=units, cfg=cfg, progress=[], datasets=[])

    def go(res, stall_timeout=3, setup=None, work=None):
        def from_items(items, override_num_blocks=None):
            ds = FakeDataset(items, override_num_blocks)
            if setup:
                setup(ds)
            state.datasets.append(ds)
            return ds

        ray = SimpleNamespace(data=SimpleNamespace(from_items=from_items), get=lambda ref, timeout=None: ref)
        c = RunConfig(inputs=cfg.inputs, unit_rows=2, device="cpu", dtype="float32", stall_timeout=stall_timeout)
        groups = [as_group(w) for w in (work or units)]
        return r._execute(ray, groups, c, tmp_path / "shards", state.progress.append, "m", SimpleNamespace(
            dtype="float32"), "fp", res, Handle(actor.tracker))

    state.go = go
    return state


def _results_threads():
    return [t for t in threading.enumerate() if t.name == "memaudit-ray-results" and t.is_alive()]


def test_execute_builds_the_documented_pipeline_and_returns_every_units_stats(execute, actor, tmp_path):
    """One block per unit; a read stage of workers + 1 tasks of 0.25 CPU; a fixed pool of ``workers`` actors, two
    units in flight each, with the plan's CPUs and GPU (none: not 0); the actors get the run's hook, retries and
    thread count."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    res = {"workers": 2, "num_gpus": 0, "num_cpus": 0.75, "threads": 1}
    out = execute.go(res)
    assert [s["rows_read"] for s in out] == [2, 2, 1] and [s["unit"] for s in out] == [0, 1, 2]
    assert sum(execute.progress) == 5 and not _results_threads()
    [ds] = execute.datasets
    assert ds.blocks == 3
    (read, read_kw), (score, score_kw) = ds.stages
    assert read is r._read_units and read_kw["batch_size"] == 1 and read_kw["num_cpus"] == 0.25
    assert read_kw["fn_kwargs"]["cfg"].inputs == execute.cfg.inputs
    assert isinstance(read_kw["compute"], TaskPoolStrategy) and read_kw["compute"].size == 3
    pool = score_kw["compute"]
    assert score is r.UnitScorer and score_kw["batch_size"] == 1
    assert isinstance(pool, ActorPoolStrategy) and (pool.min_size, pool.max_size) == (2, 2)
    assert pool.max_tasks_in_flight_per_actor == 2
    assert (score_kw["num_cpus"], score_kw["num_gpus"]) == (0.75, None)
    kw = score_kw["fn_constructor_kwargs"]
    assert kw["hook"] is r.UNIT_HOOK and kw["retries"] == 5 and kw["threads"] == 1 and kw["launched_at"] > 0
    assert (kw["model_arg"], kw["fingerprint"], kw["shard_dir"]) == ("m", "fp", str(tmp_path / "shards"))
    assert actor.threads == [1]
    execute.go({"workers": 1, "num_gpus": 1, "num_cpus": 1.0, "threads": None})
    assert execute.datasets[1].stages[1][1]["num_gpus"] == 1


def test_execute_makes_a_block_per_group_and_returns_each_of_its_units_stats(execute, actor):
    from audit.unit import group_units

    groups = group_units(execute.units, 4)  # units 0+1 (4 rows), unit 2 (1 row)
    out = execute.go({"workers": 2, "num_gpus": 0, "num_cpus": 0.75, "threads": 1}, work=groups)
    assert [s["unit"] for s in out] == [0, 1, 2] and [s["rows_read"] for s in out] == [2, 2, 1]
    assert execute.datasets[0].blocks == 2 and [i for i, _, _ in actor.calls] == [0, 2]
    assert sum(execute.progress) == 5


def test_execute_stopped_by_a_stall_before_any_row_shuts_the_stream_down(execute):
    """No row came back before the stall (Ray Data had stored no ``_current_executor``): the executor the dataset
    created is shut down (force) and the results thread has left the iterator when the error leaves."""
    def setup(ds):
        ds.wait_before = 0

    with pytest.raises(RunError, match=r"^the Ray run made no progress for 1 s"):
        execute.go({"workers": 1, "num_gpus": 0, "num_cpus": 0.75, "threads": None}, stall_timeout=1, setup=setup)
    assert not _results_threads()
    assert execute.datasets[0].executor.shutdowns[:1] == [True]


def test_execute_takes_no_further_row_after_a_units_error(execute, actor):
    def process(unit, progress, prepared):
        raise SourceError(f"unit {unit.index}: cannot read")

    def setup(ds):
        ds.wait_before, ds.after_shutdown = 1, "continue"

    actor.process = process
    with pytest.raises(RunError, match=r"^unit 0: cannot read$"):
        execute.go({"workers": 1, "num_gpus": 0, "num_cpus": 0.75, "threads": None}, setup=setup)
    assert not _results_threads()
    assert execute.datasets[0].produced == [0, 1]  # the row in flight at the shutdown, not the next


def test_record_executor_keeps_what_the_dataset_creates_and_skips_an_older_ray():
    old = SimpleNamespace()
    r._record_executor(old)
    assert not hasattr(old, "_memaudit_executors")
    ds = FakeDataset([])
    r._record_executor(ds)
    assert ds._create_executor() is ds.executor and ds._memaudit_executors == [ds.executor]


def test_stop_stream_sets_stop_and_outlasts_an_executor_already_shutting_down():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(10,), daemon=True)  # a results thread between two rows
    thread.start()

    class Busy:
        def __init__(self):
            self.calls = 0

        def shutdown(self, force=False):
            self.calls += 1
            raise RuntimeError("already shutting down")

    busy = Busy()
    r._stop_stream(SimpleNamespace(_current_executor=busy), thread, stop, timeout=5)
    assert stop.is_set() and not thread.is_alive() and busy.calls >= 1
