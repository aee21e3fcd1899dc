"""ufixrun's findings (session 53): a calibration records the settings its reference run was scored with, and a run
flagged with it is warned when its own differ."""

from __future__ import annotations

from dataclasses import replace
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.calibrate import calibrate, load_calibration, write_calibration
from audit.pipeline import RunConfig
from audit.runner import execute
from audit.tiny import TINY_WORDS


def _prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_model_dir):
    """A reference run at --batch-size 16, its calibration, and two runs flagged with it: one at --batch-size 16
    (the reference's settings) and one at 7, with what each logged."""
    root = tmp_path_factory.mktemp("calset")
    pq.write_table(pa.table({"prompt": _prompts(1, 30)}), root / "reference.parquet")
    pq.write_table(pa.table({"prompt": _prompts(2, 10)}), root / "screen.parquet")
    base = RunConfig(inputs=(str(root / "reference.parquet"),), model=str(tiny_model_dir), device="cpu",
                     batch_size=16)
    execute(replace(base, out=str(root / "ref")), progress=False, log=lambda m: None)
    cal_path = write_calibration(calibrate(root / "ref", fpr=0.1), root / "cal.json")
    logs = {}
    for name, size in (("same", 16), ("other", 7)):
        lines: list[str] = []
        execute(replace(base, inputs=(str(root / "screen.parquet"),), out=str(root / name), batch_size=size,
                        calibration=str(cal_path)), progress=False, log=lines.append)
        logs[name] = lines
    return root, cal_path, logs


def test_calibration_records_the_reference_runs_settings(calibrated):
    root, cal_path, _ = calibrated
    ref = json.loads((root / "ref" / "manifest.json").read_text())
    cal = load_calibration(cal_path)
    assert cal["reference"]["scored_with"] == ref["scored_with"]
    assert cal["reference"]["scored_with"]["batch_size"] == [16]
    assert cal["reference"]["scored_with"]["engine"] == ["local"]
    # the run flagged with it records them in its manifest's calibration section
    other = json.loads((root / "other" / "manifest.json").read_text())
    assert other["calibration"]["reference_scored_with"] == ref["scored_with"]
    assert other["scored_with"]["batch_size"] == [7]


def test_run_report_and_diff_warn_of_a_calibration_scored_otherwise(calibrated):
    root, _, logs = calibrated
    warned = [m for m in logs["other"] if "calibration's reference run" in m]
    assert warned == ["memaudit: warning: this run and its calibration's reference run were scored with different "
                      "settings (batch_size: calibration reference 16, this run 7): a prompt's risk may differ "
                      "between them by float rounding (about 1e-7), so a prompt at the threshold (one reference "
                      "prompt's risk) may be flagged or not by that rounding alone; calibrate on a reference run "
                      "scored with the run's settings"]
    assert not [m for m in logs["same"] if "calibration's reference run" in m]
    from audit.report import build_report

    assert warned[0].removeprefix("memaudit: warning: ") in build_report(root / "other").warnings
    assert not [w for w in build_report(root / "same").warnings if "calibration's reference run" in w]
    from audit.diff import diff_runs

    d = diff_runs(root / "same", root / "other")
    assert [w for w in d.flag_warnings if "reference run" in w] == [
        "the new run and its calibration's reference run were scored with different settings (batch_size: "
        "calibration reference 16, the new run 7): a prompt's risk may differ between them by float rounding (about "
        "1e-7), so a prompt at the threshold (one reference prompt's risk) may be flagged or not by that rounding "
        "alone; calibrate on a reference run scored with the run's settings"]
    d = diff_runs(root / "other", root / "same")
    assert [w for w in d.flag_warnings if "reference run" in w][0].startswith("the old run and its calibration's")


def test_a_calibration_without_recorded_settings_makes_no_claim(calibrated):
    """A calibration made by an earlier memaudit (no reference.scored_with) gives no warning and no error."""
    from audit.calibrate import calibration_summary
    from audit.pipeline import reference_settings_warning

    root, cal_path, _ = calibrated
    cal = load_calibration(cal_path)
    del cal["reference"]["scored_with"]
    other = json.loads((root / "other" / "manifest.json").read_text())
    assert "reference_scored_with" not in calibration_summary(cal)
    assert reference_settings_warning(other | {"calibration": calibration_summary(cal)}) is None


def test_a_files_bom_is_dropped_and_zero_width_characters_in_a_prompt_are_kept(tmp_path, tiny_model_dir, tiny_model):
    """A file's leading BOM (Excel's UTF-8 CSV, a TXT or JSON-lines file saved with one) is the encoding's signature,
    dropped by every reader; a BOM (U+FEFF) or zero-width space (U+200B) inside a prompt is kept by normalization:
    CLIP's tokenizer (transformers' CLIPTokenizer: NFC, whitespace, lowercase, then its split, none of which removes
    them) makes byte tokens of them, so the model sees other tokens and the prompt is another prompt (README)."""
    import polars as pl

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "excel.csv").write_bytes(b"\xef\xbb\xbfprompt\nwhite bird\n")
    (tmp_path / "in" / "lines.txt").write_bytes(b"\xef\xbb\xbfwhite bird\n")
    (tmp_path / "in" / "log.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "white bird"}\n')
    (tmp_path / "in" / "inner.csv").write_bytes("prompt\nwhite bird\n\ufeffwhite bird\nwhite\u200b bird\n".encode())
    execute(RunConfig(inputs=(str(tmp_path / "in"),), model=str(tiny_model_dir), device="cpu", batch_size=8,
                      out=str(tmp_path / "out")), progress=False, log=lambda m: None)
    risk = pl.read_parquet(tmp_path / "out" / "risk.parquet")
    assert risk.height == 6 and pl.read_parquet(tmp_path / "out" / "rejects.parquet").height == 0
    by_prompt = {p: risk.filter(pl.col("prompt") == p).select("risk", "prompt_hash", "prompt_raw").unique().rows()
                 for p in risk["prompt"].unique()}
    # the four files' plain prompt: one prompt, one score (the BOM of three files' first line not in it)
    assert sorted(by_prompt) == sorted(["white bird", "\ufeffwhite bird", "white\u200b bird"])
    assert len(by_prompt["white bird"]) == 1 and by_prompt["white bird"][0][2] is None
    assert risk.filter(pl.col("prompt") == "white bird").height == 4
    # inside a prompt: kept (prompt_raw null: normalization changed nothing), another hash and another score
    plain = by_prompt["white bird"][0]
    for other in ("\ufeffwhite bird", "white\u200b bird"):
        (r, h, raw), = by_prompt[other]
        assert raw is None and h != plain[1] and r != plain[0]
    tok = tiny_model.tokenizer
    ids = [tok(p).input_ids for p in ("white bird", "\ufeffwhite bird", "white\u200b bird")]
    assert len(ids[1]) == len(ids[0]) + 3 and len(ids[2]) == len(ids[0]) + 3  # three UTF-8 bytes, three tokens
    assert ids[1][:1] + ids[1][4:] == ids[0]  # after BOS, the three byte tokens of U+FEFF, then the plain prompt's
    assert any(ids[2][:i] + ids[2][i + 3:] == ids[0] for i in range(1, len(ids[0])))  # U+200B's within it


@pytest.mark.parametrize("case, message", [
    ("run_folder", "{path}: is a memaudit run folder, not a labelled table: memaudit eval scores a table of prompts "
                   "with a label column (true = memorized); a run's risk.parquet holds no labels (join its prompts with "
                   "yours into one Parquet, CSV or JSON-lines file)"),
    ("empty_file", "{path}: is empty (0 bytes): a labelled table needs a prompt and a label column, with rows"),
    ("label_is_prompt", "{path}: the label column 'text' is the prompt column too: name the column that holds the "
                        "labels (true/false or 1/0) with --label-column"),
])
def test_eval_refuses_a_run_folder_an_empty_file_and_the_prompt_column_as_labels_in_one_line(
        calibrated, tmp_path, tiny_model_dir, case, message):
    """`memaudit eval RUN_FOLDER` printed pyarrow's 'Could not open Parquet input source .../manifest.json: Parquet
    magic bytes not found in footer', an empty CSV 'cannot read (ArrowInvalid: Empty CSV file)', and `--label-column`
    naming the prompt column 'is binary, not boolean ... values seen: b'a red cat''."""
    from typer.testing import CliRunner

    from audit.cli import app

    args = []
    if case == "run_folder":
        path = calibrated[0] / "ref"
    elif case == "empty_file":
        path = tmp_path / "labels.csv"
        path.write_bytes(b"")
    else:
        path = tmp_path / "labels.csv"
        path.write_text("text,mem\na red cat,1\na blue dog,0\n")
        args = ["--prompt-column", "text", "--label-column", "text"]
    res = CliRunner().invoke(app, ["eval", str(path), "--model", str(tiny_model_dir), "--device", "cpu", *args])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [f"memaudit: error: {message.format(path=path)}"]
