"""Findings of the new-user trial of session 52's changes (unewday)."""

import os
import subprocess
import sys


def test_a_closed_stdout_ends_the_dry_run_docs_and_version_with_141_and_no_message(tmp_path):
    """`memaudit run --dry-run ... | head -1` exited 1 with no word (typer caught the EPIPE of the dry run's lines,
    echoed outside the command's error handling, and exited 1: "anything unexpected" to a scheduler), as did
    `memaudit --version`; README promises 141, silent, as `report | head` gives (`docs` kept with them)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a photo of prompt {i}\n" for i in range(12)), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="120")
    for args in (["run", str(prompts), "--dry-run", "--out", str(tmp_path / "r")], ["docs", "audits"],
                 ["docs"], ["--version"]):
        r, w = os.pipe()
        os.close(r)  # no reader from the start: the first write to stdout fails with EPIPE, every time
        try:
            proc = subprocess.run([sys.executable, "-m", "audit", *args], stdout=w, stderr=subprocess.PIPE,
                                  env=env, cwd=tmp_path, timeout=300)
        finally:
            os.close(w)
        err = proc.stderr.decode()
        assert proc.returncode == 141, (args, proc.returncode, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert all(line.startswith("memaudit: no --model given: using the bundled lab model") for line in lines), (
            args, err)
        assert not (tmp_path / "r").exists()  # a dry run writes nothing
