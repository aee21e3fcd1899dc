"""The pure helpers of the Ray engine (no Ray started): plan_resources' cap and thread split,
check_reachable's port bound, connect's choice and naming of --address vs RAY_ADDRESS."""

from __future__ import annotations

import pytest

from audit.errors import RunError


def test_capped_from_only_when_more_cpu_actors_than_cpus(monkeypatch):
    """``capped_from`` (the "--workers N is more CPU actors than the cluster's CPUs" line) is set only when the
    request exceeds the CPUs: as many actors as CPUs is not capped."""
    from audit.engines.ray import plan_resources

    assert plan_resources({"CPU": 2.0}, 2)["capped_from"] is None
    assert plan_resources({"CPU": 4.0}, None)["capped_from"] is None
    assert (plan_resources({"CPU": 2.0}, 3)["capped_from"], plan_resources({"CPU": 2.0}, 3)["workers"]) == (3, 2)


def test_cpu_actors_split_the_host_cores_bounded_by_omp_num_threads(monkeypatch):
    """CPU actors get this machine's cores split between them, at most the driver's OMP_NUM_THREADS; GPU actors
    get no thread setting."""
    import audit.engines.ray as r

    monkeypatch.setattr(r.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert r.plan_resources({"CPU": 8.0}, 2)["threads"] == 4
    assert r.plan_resources({"CPU": 8.0}, 16)["threads"] == 1  # capped to 8 actors: 8 // 8
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert r.plan_resources({"CPU": 8.0}, 2)["threads"] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert r.plan_resources({"CPU": 8.0}, 2)["threads"] == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a limit
    assert r.plan_resources({"CPU": 8.0}, 2)["threads"] == 4
    assert r.plan_resources({"CPU": 8.0, "GPU": 2.0}, None)["threads"] is None


def test_port_65536_is_refused_with_the_range_message():
    """The message says "1 to 65535": 65536 is refused by memaudit, not left to the socket (an OverflowError,
    which the CLI would report as an unexpected failure, exit 1)."""
    from audit.engines.ray import check_reachable

    with pytest.raises(RunError, match=r"^--address 127.0.0.1:65536: the port '65536' is not a number from 1 to 65535"):
        check_reachable("127.0.0.1:65536")
    with pytest.raises(RunError, match=r"the port '99999'"):
        check_reachable("127.0.0.1:99999")


@pytest.fixture
def no_ray_env(monkeypatch):
    # connect() sets these with setdefault: set them here so monkeypatch restores them
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ENABLE_AUTO_CONNECT", "0")
    import ray

    # as in a process without Ray (the suite's own Ray may be up): connect() must refuse the address before any
    # ray.init
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    return monkeypatch


def test_connect_names_ray_address_when_it_came_from_the_environment(no_ray_env):
    from audit.engines.ray import connect

    no_ray_env.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(RunError, match=r"^RAY_ADDRESS \(from the environment; --address overrides it\) 127\.0\.0\.1:1: "
                                       r"cannot join the Ray cluster \(nothing answers"):
        connect(None)


def test_connect_address_overrides_ray_address(no_ray_env):
    """``--address`` overrides RAY_ADDRESS (docs/ray.md, the message itself): the address tried and named is --address."""
    from audit.engines.ray import connect

    no_ray_env.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(RunError, match=r"^--address 127\.0\.0\.1:2: cannot join the Ray cluster \(nothing answers"):
        connect("127.0.0.1:2")
