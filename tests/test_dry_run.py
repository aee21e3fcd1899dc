"""``memaudit run --dry-run``: the options checked and the inputs planned as a run plans them, a summary on stdout,
and nothing loaded, scored or written; exit 2 where the run would be refused."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from audit.cli import app


def _logs(root):
    """A JSON-lines file (3 lines), a Parquet file with 'text' (2 rows), one with 'prompt' (1 row), a CSV with
    neither (1 row)."""
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps(o) + "\n" for o in
                                          [{"prompt": "a red cat"}, {"text": "a blue dog"}, {"other": "x"}]))
    pq.write_table(pa.table({"text": ["old city street", "a small house"]}), root / "b.parquet")
    pq.write_table(pa.table({"prompt": ["sunset over the lake"]}), root / "c.parquet")
    (root / "d.csv").write_text("caption\nhello\n")
    return root


def _invoke(*args):
    return CliRunner().invoke(app, ["run", *map(str, args), "--dry-run"])


def test_a_dry_run_says_what_a_run_would_read_and_writes_nothing(tmp_path):
    """8 rows in 5 files; the Parquet files have 'text', 'prompt', and both (read row by row), the CSV neither (its
    row to be rejected); the folder is new and stays absent. The model (the bundled lab model) is found and its family
    detected, its weights not read; a model folder that does not exist is refused as the run refuses it, a hub id
    is not fetched."""
    root = _logs(tmp_path / "logs")
    pq.write_table(pa.table({"prompt": [None], "text": ["an old tower"]}), root / "e.parquet")
    out = tmp_path / "out"
    res = _invoke(root, "--prompt-column", "prompt", "--prompt-column", "text", "--out", out)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        "memaudit: dry run: no model loaded, nothing scored or written",
        "inputs: 5 files (csv 1, jsonl 1, parquet 3): 8 rows in 5 units of work",
        "prompt column: 'text' in 1 file; 'prompt' in 1 file; 'prompt' and 'text' in 1 file (each row reads the "
        "first holding a value); none of the names in 1 file (1 row to be rejected as missing_prompt_column); "
        "1 JSON-lines file: each line reads the first name holding a value",
        "model: lab (bundled): family sd1; its identity and weights are read when the run starts",
        "exit 4 expected: 1 of 8 rows (12.5%) to be rejected for want of the prompt or id column, more than "
        "--max-error-fraction 0.01: the run writes its outputs, then exits 4 (give the other name with "
        "--prompt-column, or raise --max-error-fraction)",
        f"--out {out}: a new run folder"]
    assert "1 of 5 input files has no column 'prompt' or 'text'" in res.stderr  # the run's own warning
    assert not out.exists()
    res = _invoke(root, "--out", out, "--model", tmp_path / "no-such-model")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines()[-1] == (f"memaudit: error: --model {tmp_path / 'no-such-model'}: no such folder, "
                                           "and not a hub id of the form owner/name")
    res = _invoke(root, "--out", out, "--model", "someone/some-model")
    assert res.exit_code == 0 and "model: someone/some-model: a hub id, not fetched in a dry run" in res.stdout


def test_a_dry_run_on_a_run_folder_says_resume_or_refusal(tmp_path, tiny_model_dir):
    """After the run: the same command resumes it (4 of 4 units committed), another prompt column is refused with
    the run's own message (exit 2); a folder of other files gets them named; no input with the column: the run's
    refusal (exit 2)."""
    root = _logs(tmp_path / "logs")
    out = tmp_path / "out"
    base = [root, "--prompt-column", "prompt", "--prompt-column", "text", "--out", out, "--model", tiny_model_dir,
            "--device", "cpu"]
    res = CliRunner().invoke(app, ["run", *map(str, base), "--no-progress", "--max-error-fraction", "1"])
    assert res.exit_code == 0, res.output
    res = _invoke(*base)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == (f"--out {out}: holds this run, 4 of 4 units committed: the same command "
                                           "resumes it (the model and score configuration are checked when it starts)")
    res = _invoke(root, "--out", out)
    assert res.exit_code == 2
    assert res.stdout.splitlines()[2:] == [
        "prompt column: 'prompt' in 1 file; no 'prompt' column in 2 files (3 rows to be rejected as "
        "missing_prompt_column); 1 JSON-lines file: judged line by line",
        "model: lab (bundled): family sd1; its identity and weights are read when the run starts",
        f"--out {out}: would be refused: {out} holds a different run: prompt_column: ['prompt', 'text'] -> 'prompt'. "
        "Choose another --out, or rerun the original command to resume it."]
    assert res.stderr.splitlines()[-1] == "memaudit: error: the run would be refused (above)"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    res = _invoke(root / "b.parquet", "--prompt-column", "text", "--out", tmp_path / "other")
    assert res.exit_code == 0 and res.stdout.splitlines()[-1] == (
        f"--out {tmp_path / 'other'}: exists, not a run folder: the run's files go beside the 1 other entry there")
    res = _invoke(root / "d.csv", "--out", tmp_path / "x")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines()[-1] == ("memaudit: error: no input has the prompt column 'prompt'; columns found: "
                                           "caption. Choose one with --prompt-column.")


def _calibrated_reference(tmp_path, tiny_model_dir):
    """A reference run of the logs' b.parquet (prompt column 'text') calibrated at FPR 0.5: the run's options
    ``base``, the calibration file and its threshold."""
    root = _logs(tmp_path / "logs")
    base = [root / "b.parquet", "--prompt-column", "text", "--model", tiny_model_dir, "--device", "cpu"]
    res = CliRunner().invoke(app, ["run", *map(str, base), "--out", str(tmp_path / "ref"), "--no-progress"])
    assert res.exit_code == 0, res.output
    cal = tmp_path / "cal.json"
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "ref"), "--fpr", "0.5", "-o", str(cal)])
    assert res.exit_code == 0, res.output
    return base, cal, json.loads(cal.read_text())["threshold"]


def test_a_dry_run_reads_the_calibration_as_the_run_does(tmp_path, tiny_model_dir):
    """--calibration is read and checked before the summary: its threshold and FPR are shown (the model check waits
    for the run); a missing file is refused as the run refuses it (exit 2)."""
    base, cal, threshold = _calibrated_reference(tmp_path, tiny_model_dir)
    res = _invoke(*base, "--out", tmp_path / "new", "--calibration", cal)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[4] == (f"calibration: {cal}: flags risk > {threshold!r} at FPR 0.5 (checked "
                                          "against the model when the run starts)")
    res = _invoke(*base, "--out", tmp_path / "new", "--calibration", tmp_path / "none.json")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines()[-1] == f"memaudit: error: --calibration {tmp_path / 'none.json'}: no such file"


def test_a_dry_run_says_what_the_score_cache_holds(tmp_path, tiny_model_dir):
    """--cache: a dry run said nothing of it (found by the shared-cache trial). Now one line: a cache not made yet,
    then after a real run with the tiny model the one folder of scores it made, and after a run with another seed
    (another score configuration) two; nothing is written by the dry runs."""
    root = _logs(tmp_path / "logs")
    cache = tmp_path / "cache"
    base = [root / "c.parquet", "--model", tiny_model_dir, "--device", "cpu", "--cache", cache]
    res = _invoke(*base, "--out", tmp_path / "o0")
    assert res.exit_code == 0, res.output
    assert f"cache: {cache}: a new score cache, made when the run starts" in res.stdout.splitlines()
    assert not cache.exists()
    for seed, n in ((0, "1 folder"), (1, "2 folders")):
        run = CliRunner().invoke(app, ["run", *map(str, base), "--seed", str(seed), "--out", str(tmp_path / f"r{seed}"),
                                       "--no-progress"])
        assert run.exit_code == 0, run.output
        res = _invoke(*base, "--out", tmp_path / "o1")
        assert res.exit_code == 0, res.output
        assert (f"cache: {cache}: {n} of earlier runs' scores (one per model and score configuration); the run reads "
                "its own, if any, once the model's identity is read") in res.stdout.splitlines()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o0").exists()


def test_a_dry_run_refuses_a_layer_the_model_lacks_as_the_run_does(tmp_path, tiny_model_dir, tiny_model):
    """`run --dry-run --layers nope` exited 0 ("a new run folder"), and the run it planned then exited 2 once the model
    had loaded. The layers are now read from the denoiser built from its config (no weights): the dry run exits 2 with
    the run's own line, word for word, listing the model's layers; a layer it has passes; a hub id is not fetched, so
    the dry run says the layers wait for the run."""
    from audit.models import adapter_of

    root = _logs(tmp_path / "logs")
    base = [root / "c.parquet", "--model", tiny_model_dir, "--device", "cpu", "--out", tmp_path / "out"]
    known = adapter_of(tiny_model).cross_attention_layers(tiny_model.unet)  # the loaded model's, as the run reads them
    assert len(known) >= 2 and all(name.endswith("attn2") for name in known)
    expected = (f"memaudit: error: --layers nope,{known[0]}: not a cross-attention layer of this UNet: nope. "
                f"Cross-attention layers: {', '.join(known)}")
    res = _invoke(*base, "--layers", f"nope,{known[0]}")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines()[-1] == expected
    run = CliRunner().invoke(app, ["run", *map(str, base), "--layers", f"nope,{known[0]}", "--no-progress"])
    assert run.exit_code == 2 and run.stderr.splitlines()[-1] == expected  # the run's own refusal, the same line
    res = _invoke(*base, "--layers", known[-1])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[3] == (f"model: {tiny_model_dir}: family sd1; its identity and weights are "
                                          "read when the run starts")
    res = _invoke(root / "c.parquet", "--model", "someone/some-model", "--layers", "nope", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[3] == ("model: someone/some-model: a hub id, not fetched in a dry run; --layers is "
                                          "checked against it when the run starts")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_dry_run_says_which_config_values_an_empty_flag_dropped(tmp_path, tiny_model_dir):
    """`--cache ''` and `--calibration ''` run without the --config file's values, but the dry run said nothing of
    it: its cache and calibration lines simply went, as if the file had none. Now one line each names the file's
    value that was dropped, and the --fail-on-flagged gate that went with the calibration; without the empty flags
    the file's values are planned as before, and with no --config nothing is said."""
    base, cal, threshold = _calibrated_reference(tmp_path, tiny_model_dir)
    conf = tmp_path / "job.toml"
    conf.write_text(f'cache = "{tmp_path / "cache"}"\ncalibration = "{cal}"\nfail_on_flagged = 3\n')
    res = _invoke(*base, "--config", conf, "--out", tmp_path / "new")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[4:6] == [
        f"cache: {tmp_path / 'cache'}: a new score cache, made when the run starts",
        f"calibration: {cal}: flags risk > {threshold!r} at FPR 0.5 (checked against the model when the run starts)"
        "; --fail-on-flagged 3: exit 3 when more rows are flagged"]
    res = _invoke(*base, "--config", conf, "--out", tmp_path / "new", "--cache", "", "--calibration", "")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[4:] == [
        f"cache: none: --cache '' runs without the --config file's ({tmp_path / 'cache'}): every prompt read is sent "
        "to the model",
        f"calibration: none: --calibration '' runs without the --config file's ({cal}): no flagged or "
        "risk_percentile column, and no --fail-on-flagged 3 gate (it needs the calibration)",
        f"--out {tmp_path / 'new'}: a new run folder"]
    res = _invoke(*base, "--out", tmp_path / "new", "--cache", "", "--calibration", "")  # no file: nothing dropped
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[4:] == [f"--out {tmp_path / 'new'}: a new run folder"]
    assert not (tmp_path / "new").exists() and not (tmp_path / "cache").exists()


def test_a_dry_run_checking_layers_on_a_denoiser_config_diffusers_cannot_build_says_what_the_run_says(
        tmp_path, tiny_model_dir):
    """A UNet config naming a block diffusers lacks: with --layers the dry run builds the denoiser from it, and said
    "ValueError: Nope2D does not exist. (run with --debug for the traceback)", exit 1, an unexpected error; the run
    says "--model M: cannot load (...)", exit 2. Now the dry run says the run's line, with its exit code."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["down_block_types"] = ["Nope2D"] * len(config["down_block_types"])
    (model / "unet" / "config.json").write_text(json.dumps(config))
    root = _logs(tmp_path / "logs")
    base = [root / "c.parquet", "--model", model, "--device", "cpu", "--layers", "nope", "--out", tmp_path / "out"]
    expected = f"memaudit: error: --model {model}: cannot load (ValueError: Nope2D does not exist.)"
    res = _invoke(*base)
    assert res.exit_code == 2 and res.stdout == "" and res.stderr.splitlines()[-1] == expected
    run = CliRunner().invoke(app, ["run", *map(str, base), "--no-progress"])
    assert run.exit_code == 2 and run.stderr.splitlines()[-1] == expected
