"""The local engine's read-ahead is consumed by the first attempt only: a unit whose read-ahead failed
with a passing error is read again by its retry (run_unit_with_retries), not failed again by the same read."""

from __future__ import annotations

from helpers import prompts_file, run_audit


def test_a_failed_read_ahead_is_read_again_by_the_retry(tmp_path, tiny_model_dir, monkeypatch):
    import audit.engines.local as local

    real, calls = local.prepare_unit, []

    def flaky(unit, cfg):
        calls.append(unit.index)
        if len(calls) == 1:
            raise OSError("transient read error")
        return real(unit, cfg)

    monkeypatch.setattr(local, "prepare_unit", flaky)
    src = prompts_file(tmp_path / "p.txt", 12)
    _, manifest = run_audit([src], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8, unit_rows=6)
    assert (manifest["counts"]["rows_read"], manifest["counts"]["scored"]) == (12, 12)
    assert calls == [0, 1]  # unit 0's read-ahead failed; its retry read it itself (prepared=None)
