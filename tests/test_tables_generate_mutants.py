"""What a mutation review of audit/tables.py (schemas, atomic writes, the finished-run check) and audit/cli/generate.py
(`memaudit generate`) found untested, and the bugs behind some of it. Tables are built by hand from the schemas,
generation is stubbed where no image is needed; CPU, seconds."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audit.cli import app


# --- audit/cli/generate.py --------------------------------------------------------------------------------------
def _row(i, seed, status="image", reason=None):
    """One generations row of prompt ``i`` (an image row unless ``status`` says otherwise)."""
    return {"prompt_index": i, "prompt": f"p{i}", "seed": seed,
            "image_path": f"images/{i:08d}_s{seed}.png" if status == "image" else None, "risk": 0.5,
            "flagged": None, "mitigated": False, "status": status, "reason": reason}


def _oom(i, prompt):
    raise RuntimeError("CUDA out of memory (simulated)")


OFF = {"mitigate": "off", "calibration": None}


def test_a_damaged_part_whose_prompt_fails_again_is_not_read_as_its_rows(tmp_path):
    """A part copied over from another prompt (or cut short) is generated again; when that generation failed, the
    failed placeholder was written beside the damaged part, and _finalize read the damaged part first: another
    prompt's rows listed twice (the failure hidden, 2 images counted for 1), or an ArrowInvalid traceback."""
    from audit.cli.generate import _finalize, _generate_missing

    (tmp_path / "parts").mkdir()
    rows_in = [("p0", None), ("p1", None)]
    assert _generate_missing(tmp_path, rows_in, 1, False, lambda i, p: [_row(i, 0)]) == 2
    parts = tmp_path / "parts"
    shutil.copy(parts / "00000000.parquet", parts / "00000001.parquet")  # prompt 0's part copied over prompt 1's
    assert _generate_missing(tmp_path, rows_in, 1, False, _oom) == 0
    assert sorted(p.name for p in parts.iterdir()) == ["00000000.parquet", "00000001.failed.parquet"]
    summary = _finalize(tmp_path, 2, 1, OFF, 0, 1.0)
    assert (summary["images"], summary["rejected_by_reason"]) == (1, {"generation_failed": 1})
    rows = pq.read_table(tmp_path / "generations.parquet").to_pylist()
    assert [(r["prompt_index"], r["status"]) for r in rows] == [(0, "image"), (1, "rejected")]
    assert rows[1]["reason"] == "generation_failed: RuntimeError: CUDA out of memory (simulated)"
    (parts / "00000001.parquet").write_bytes(b"PAR1 not a whole file")  # cut short, then fails again
    _generate_missing(tmp_path, rows_in, 1, False, _oom)
    assert _finalize(tmp_path, 2, 1, OFF, 0, 1.0)["rejected_by_reason"] == {"generation_failed": 1}
    # and once it generates, the placeholder goes
    assert _generate_missing(tmp_path, rows_in, 1, False, lambda i, p: [_row(i, 0)]) == 1
    assert sorted(p.name for p in parts.iterdir()) == ["00000000.parquet", "00000001.parquet"]


def test_the_rate_of_a_run_that_made_no_image_or_took_no_time_is_null(tmp_path):
    """this_run.images_per_second: the images over the seconds, null when none was made (a rerun that only merged)
    and when no time was measured (no division by zero)."""
    from audit.cli.generate import _finalize, _write_table_atomic

    (tmp_path / "parts").mkdir()
    _write_table_atomic([_row(0, 0), _row(0, 1)], tmp_path / "parts" / "00000000.parquet")
    assert _finalize(tmp_path, 1, 2, OFF, 2, 0.5)["this_run"] == {"images": 2, "seconds": 0.5, "images_per_second": 4.0}
    assert _finalize(tmp_path, 1, 2, OFF, 0, 2.0)["this_run"] == {"images": 0, "seconds": 2.0, "images_per_second": None}
    assert _finalize(tmp_path, 1, 2, OFF, 2, 0.0)["this_run"] == {"images": 2, "seconds": 0.0, "images_per_second": None}


def test_a_folder_claimed_by_another_generate_meanwhile_is_refused(tmp_path):
    """check_out_dir saw no generate.json, but another process wrote one before this one took the lock: refused,
    and that process's options are kept (they were overwritten)."""
    from audit.cli.generate import GenerateError, _claim_folder

    theirs = {"seeds": 2, "steps": 50}
    (tmp_path / "generate.json").write_text(json.dumps(theirs))
    with pytest.raises(GenerateError, match=r"another memaudit generate made this folder its own meanwhile; rerun to "
                                            r"resume it with the same options, or use another --out"):
        _claim_folder(tmp_path, {"seeds": 1, "steps": 50}, None)
    assert json.loads((tmp_path / "generate.json").read_text()) == theirs
    (tmp_path / "new").mkdir()
    _claim_folder(tmp_path / "new", {"seeds": 1}, None)  # a new folder takes the options
    assert json.loads((tmp_path / "new" / "generate.json").read_text()) == {"seeds": 1}


def test_read_prompts_keeps_a_non_string_value_as_text_beside_its_reason(tmp_path):
    """A JSON number or list where the prompt should be is rejected with its type, and its value kept as text in the
    row's prompt (a null has none)."""
    from audit.cli.generate import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": 7}\n{"prompt": [1, "a"]}\n{"prompt": null}\n{"prompt": " a cat "}\n')
    assert read_prompts(path) == [("7", "prompt_not_string:int"), ("[1, 'a']", "prompt_not_string:list"),
                                  (None, "null_prompt"), ("a cat", None)]


def test_a_prompt_column_for_a_text_file_is_refused_whatever_the_suffix_case(tmp_path):
    from audit.cli.generate import GenerateError, run_generate

    prompts = tmp_path / "P.TXT"
    prompts.write_text("a red cat\n")
    with pytest.raises(GenerateError, match=r"--prompt-column 'text': .*P\.TXT is a \.txt file, one prompt a line"):
        run_generate(prompts, str(tmp_path / "no-such-model"), tmp_path / "out", prompt_column="text")
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_be_found_is_one_line_exit_2(tmp_path):
    """A ModelError (no such folder) is a usage error as documented: one line, exit 2, no traceback, nothing written."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    res = CliRunner().invoke(app, ["generate", str(prompts), "--model", str(tmp_path / "none"), "--out",
                                   str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.stderr.splitlines() == [f"memaudit: error: --model {tmp_path / 'none'}: no such folder, and not a hub id "
                                       "of the form owner/name"]
    assert not (tmp_path / "o").exists()


def test_when_every_row_failed_to_generate_only_the_error_is_said(tmp_path, monkeypatch):
    """Exit 4 with one error line; the 'rerun to try them again' warning is for a run that made some images."""
    import audit.cli.generate as gen

    summary = {"rows": 2, "images": 0, "rejected": 2, "rejected_by_reason": {"generation_failed": 2}}
    monkeypatch.setattr(gen, "run_generate", lambda *a, **kw: summary)
    res = CliRunner().invoke(app, ["generate", "p.txt", "--model", "m", "--out", str(tmp_path / "o")])
    assert res.exit_code == 4 and json.loads(res.stdout) == summary
    assert res.stderr.splitlines() == ["memaudit: error: nothing was generated: all 2 rows were rejected "
                                       "(generation_failed 2); generations.parquet says why for each"]
