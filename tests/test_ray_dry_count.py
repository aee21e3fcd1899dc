"""`memaudit run --dry-run --engine ray` without `--address` counted the workers by starting a local Ray (about 10 s
on a new folder, 5-6 s on a warm machine) only to read its CPUs. It now resolves the CPUs and GPUs a local Ray would
have as `ray.init` resolves them (audit.engines.ray.local_resources), starting nothing. Run in a subprocess, so that
no Ray of this test session is already initialized."""

import json
import os
import subprocess
import sys


def test_the_dry_run_counts_a_local_rays_workers_without_starting_ray(tmp_path, tiny_model_dir):
    (tmp_path / "p.txt").write_text("".join(f"prompt number {i}\n" for i in range(50)))
    ray_tmp = tmp_path / "ray"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp),
           # Ray's own way to set a node's resources, read by the same resolver ray.init uses: 3 CPUs whatever
           # the machine
           "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 3})}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-m", "audit", "run", str(tmp_path / "p.txt"), "--model",
                          str(tiny_model_dir), "--out", str(tmp_path / "out"), "--engine", "ray", "--dry-run",
                          "--workers", "5"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert ("--engine ray: 3 workers (--workers 5 cut to the cluster's CPUs, as the run cuts them); units of at most "
            "17 rows, scored in 3 groups of at most 17 rows (the split the run makes)") in res.stdout.splitlines()
    assert not ray_tmp.exists()  # no Ray was started (a local Ray makes its session folder there)


def test_local_resources_is_none_inside_a_ray_job(monkeypatch):
    """With RAY_ADDRESS (a Ray job) the run joins that cluster: its resources are the cluster's, so it connects."""
    from audit.engines.ray import local_resources

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert local_resources() is None
