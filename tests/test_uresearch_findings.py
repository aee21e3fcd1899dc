"""Findings of a new-user trial (an ML researcher comparing scorers on a labelled prompt CSV): the labelled table
that ``memaudit eval`` reads, its errors, and its figures against scikit-learn on a run's risk.parquet."""

from __future__ import annotations

import pytest

from audit.errors import RunError
from audit.evaluate import read_labelled
from helpers import labels_csv


def test_csv_prompts_that_look_like_numbers_are_text(tmp_path):
    # pyarrow typed a CSV prompt column holding only numbers as int64 (or double), and eval refused
    # it ("prompt column 'prompt' is int64, not text") where `memaudit run` reads every CSV field as text
    path = tmp_path / "labels.csv"
    path.write_text("id,prompt,memorized\n0,1984,1\n1,007,0\n2,3.50,0\n3,1e5,1\n", encoding="utf-8")
    prompts, labels = read_labelled(path)
    assert prompts == ["1984", "007", "3.50", "1e5"]  # exactly as written: no 7, no 3.5, no 100000.0
    assert labels.tolist() == [True, False, False, True]


def test_csv_not_in_utf8_names_its_rows(tmp_path):
    # a CSV saved from a spreadsheet in cp1252 was refused as "prompt column 'prompt' is binary, not text"
    path = tmp_path / "labels.csv"
    path.write_bytes("prompt,memorized\ncaf\u00e9 au lait,1\na blue dog,0\nna\u00efve,0\na fox,1\n".encode("cp1252"))
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: 2 row(s) whose prompt is not valid UTF-8 (row 0, 2; 0-based data rows): save "
                              "the table as UTF-8 (`memaudit run` rejects such rows as invalid_utf8)")


@pytest.mark.parametrize("labels, message", [
    # a missing label said how many, not where: "has 2 null value(s)"; a CSV's NaN and empty field both read as null
    (["1", "0", "NaN", "1", "", "0"], "label column 'memorized' has 2 null value(s) (row 2, 4): every prompt needs a "
                                      "label, true/false or 1/0"),
    # text labels were listed bare (values seen: no, yes), so '0' and '1' as text read like the integers it asks for
    (["yes", "no", "no", "yes", "no", "no"], "label column 'memorized' is string, not boolean (true/false, or integers "
                                             "0/1); values seen: 'no', 'yes'"),
    (["1", "0", "2", "1", "0", "2"], "label column 'memorized' is int64, not boolean (true/false, or integers 0/1); "
                                     "values seen: 0, 1, 2 (row 2, 5 not 0/1)"),
    (["1", "0", "0.5", "1", "0", "0"], "label column 'memorized' is double, not boolean (true/false, or integers 0/1); "
                                       "values seen: 0.0, 0.5, 1.0 (row 2 not 0/1)"),
    # every value outside 0/1: the values say it, no row list
    (["2", "3", "2", "3", "2", "3"], "label column 'memorized' is int64, not boolean (true/false, or integers 0/1); "
                                     "values seen: 2, 3"),
    # five null rows: all listed, no "..."
    (["", "", "", "1", "", ""], "label column 'memorized' has 5 null value(s) (row 0, 1, 2, 4, 5): every prompt needs "
                                "a label, true/false or 1/0"),
])
def test_bad_labels_name_their_rows_and_values(tmp_path, labels, message):
    path = labels_csv(tmp_path, labels)
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == f"{path}: {message}"


def test_text_zero_one_labels_in_parquet_are_quoted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"], "memorized": ["1", "0"]}), path)
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: label column 'memorized' is string, not boolean (true/false, or integers 0/1); "
                              "values seen: '0', '1'")


def test_evaluate_names_the_label_values_it_refuses():
    import numpy as np

    from audit.evaluate import evaluate

    with pytest.raises(RunError) as err:  # before any model is loaded
        evaluate(["a", "b", "c"], np.array([1.0, 0.0, np.nan]), None)
    assert str(err.value) == "labels are float64, not boolean (or integers 0/1); values seen: 0.0, 1.0, nan"
    with pytest.raises(RunError) as err:
        evaluate(["a", "b", "c"], [1, 0, 2], None)
    assert str(err.value) == "labels are int64, not boolean (or integers 0/1); values seen: 0, 1, 2"


def test_eval_label_column_option(tmp_path, tiny_model_dir):
    # a table whose labels are in `label` could not be evaluated at all: the error named the missing 'memorized'
    # column and no option chose another (a header "prompt, memorized" also hid its leading space)
    import json

    from typer.testing import CliRunner

    from audit.cli import app

    path = tmp_path / "labels.csv"
    prompts = ["a red cat", "a blue dog", "a green bird", "a fox", "a small house", "old city street"]
    path.write_text("prompt,label\n" + "".join(f"{p},{y}\n" for p, y in zip(prompts, [1, 0, 0, 1, 0, 0])))
    base = ["eval", str(path), "--model", str(tiny_model_dir), "--device", "cpu", "--bootstrap", "10"]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2
    assert res.output.strip() == (f"memaudit: error: {path}: no label column 'memorized' (columns: 'prompt', 'label'); "
                                  "see --label-column")
    res = CliRunner().invoke(app, [*base, "--label-column", "label", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["n_memorized"], out["n_ordinary"]) == (2, 4)


def test_json_files_that_are_not_json_lines(tmp_path):
    # pandas' to_json writes a JSON array (orient="records") or an object of columns (the default): the array was
    # "cannot read (ArrowInvalid: JSON parse error: Column() changed from object to array in row 0)", and the
    # columns object, read by pyarrow as one row of structs, crashed on listing its labels (TypeError: unhashable
    # type: 'dict'; exit 1 from the command line)
    import json

    array = tmp_path / "labels.json"
    array.write_text(json.dumps([{"prompt": "a red cat", "memorized": 1}, {"prompt": "a fox", "memorized": 0}]))
    for text in (array.read_text(), "\ufeff\n  " + array.read_text()):  # also after a byte-order mark and blanks
        array.write_text(text, encoding="utf-8")
        with pytest.raises(RunError) as err:
            read_labelled(array)
        assert str(err.value) == (f"{array}: a JSON array; a labelled table in JSON is JSON lines, one object a line "
                                  '({"prompt": ..., "memorized": true}; pandas: to_json(path, orient="records", '
                                  "lines=True))")
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"prompt": {"0": "a red cat", "1": "a fox"}, "memorized": {"0": 1, "1": 0}}))
    with pytest.raises(RunError) as err:
        read_labelled(columns)
    assert str(err.value) == (f"{columns}: label column 'memorized' is struct<0: int64, 1: int64>, not boolean "
                              "(true/false, or integers 0/1); each label is a nested value: a JSON table is one "
                              'object a line (pandas: to_json(path, orient="records", lines=True))')


def test_eval_counts_reconcile_with_the_table_rows(tmp_path, tiny_model_dir, tiny_model):
    # a table with a repeated prompt gave n_memorized + n_ordinary < its rows and nothing in --json (or from
    # audit.evaluate.evaluate) said why: the merge was only a stderr line of the command
    import json

    import numpy as np
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.evaluate import evaluate

    prompts = ["a red cat", "a blue dog", "a green bird", "a fox", "a small house", " a red cat", "a blue dog"]
    labels = [1, 0, 0, 1, 0, 1, 0]
    path = tmp_path / "labels.csv"
    path.write_text("prompt,memorized\n" + "".join(f"{p},{y}\n" for p, y in zip(prompts, labels)))
    base = ["eval", str(path), "--model", str(tiny_model_dir), "--device", "cpu", "--bootstrap", "10"]
    res = CliRunner().invoke(app, [*base, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["n_memorized"], out["n_ordinary"], out["n_rows"], out["n_duplicate_rows"]) == (2, 3, 7, 2)
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 0, res.output
    assert (f"model {tiny_model_dir} [{tiny_model.fingerprint}]: 2 memorized, 3 ordinary prompts (7 rows: 2 "
            "repeating a prompt above, merged); 1 noise draw(s); 95% bootstrap CIs") in res.stdout
    res = evaluate(prompts, np.array(labels), tiny_model, n_boot=10)
    assert (res["n_memorized"], res["n_ordinary"], res["n_rows"], res["n_duplicate_rows"]) == (2, 3, 7, 2)


def test_layers_all_without_the_attention_scorer_is_refused(tmp_path, tiny_model_dir):
    # `eval --scorers noise_magnitude --layers all` printed no per-layer figure and said nothing about it
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.evaluate import evaluate

    path = labels_csv(tmp_path, ["1", "0", "0", "1", "0", "0"])
    res = CliRunner().invoke(app, ["eval", str(path), "--model", str(tiny_model_dir), "--device", "cpu",
                                   "--scorers", "noise_magnitude,guidance_geometry", "--layers", "all"])
    assert res.exit_code == 2
    assert res.output.strip() == ("memaudit: error: --layers all: the per-layer figures are those of "
                                  "attention_entropy; add it to --scorers (noise_magnitude, guidance_geometry)")
    with pytest.raises(RunError) as err:  # before any model is loaded (model None would load the lab model)
        evaluate(["a", "b"], [True, False], "/nonexistent/model", ["noise_magnitude"], layers="all")
    assert str(err.value) == ("--layers all (layers='all'): the per-layer figures are those of attention_entropy; add "
                              "it to the scorers (noise_magnitude)")


def test_guidance_geometry_with_too_few_steps_is_refused_before_scoring(tmp_path, tiny_model_dir, tiny_model):
    # `memaudit run --scorer guidance_geometry --steps 2` scored every row into scoring_error (IndexError: index -3
    # is out of bounds for dimension 0 with size 2) and exited 4 after writing a run of rejects; `eval` refused it
    import audit
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.scorers import ScoreConfig, Scorer

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    line = "--steps 2: guidance_geometry needs at least 3 scheduler steps (every prompt would fail to score)"
    for extra in (["--scorer", "guidance_geometry"], ["--confirm", "guidance_geometry", "--confirm-top", "1"]):
        out = tmp_path / f"run{len(extra)}"
        res = CliRunner().invoke(app, ["run", str(prompts), "--model", str(tiny_model_dir), "--device", "cpu",
                                       "--out", str(out), "--steps", "2", "--no-progress", *extra])
        assert res.exit_code == 2, res.output
        assert res.output.strip().splitlines()[-1] == f"memaudit: error: {line}"
        assert not (out / "risk.parquet").exists()
    with pytest.raises(RunError) as err:
        audit.score(["a red cat"], model=str(tiny_model_dir), scorer="guidance_geometry", steps=2, device="cpu")
    assert str(err.value) == line
    with pytest.raises(RunError) as err:
        Scorer(tiny_model, ScoreConfig("guidance_geometry", tuple(tiny_model.default_layers), num_inference_steps=2))
    assert str(err.value) == line
    res = CliRunner().invoke(app, ["run", str(prompts), "--model", str(tiny_model_dir), "--device", "cpu",
                                   "--out", str(tmp_path / "ok"), "--steps", "3", "--no-progress",
                                   "--scorer", "guidance_geometry"])
    assert res.exit_code == 0, res.output  # 3 steps: t_lo = timesteps[0], defined


def test_evaluate_warns_a_python_caller_about_a_small_table(tiny_model):
    # from a notebook, evaluate() on 4 ordinary prompts returned TPR at 1% FPR read at FPR 0 without a word: only
    # the command printed the too-few warnings
    import warnings

    from audit.evaluate import evaluate

    prompts = ["a red cat", "a blue dog", "a green bird", "a fox", "a small house", "old city street"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate(prompts, [1, 0, 0, 1, 0, 0], tiny_model, n_boot=10)
    expected = [
        "4 ordinary prompts cannot measure TPR at 1% FPR (one false positive is already 25% FPR, not below 1%; it "
        "needs at least 101)",
        "4 ordinary prompts cannot measure TPR at 3% FPR (one false positive is already 25% FPR, not below 3%; it "
        "needs at least 34)",
        "2 memorized and 4 ordinary prompts: too few for a stable AUROC (its bootstrap CI understates the "
        "uncertainty with under 10 of a class)",
        "--bootstrap 10 (n_boot): a 95% CI's limits are the 2.5th and 97.5th percentiles of the resampled figures, and "
        "10 resample(s) put fewer than one in each tail, so every CI printed is about their range, not a 95% interval; "
        "give 1,000 (the default) or more"]  # (test_ustats_findings)
    assert res["warnings"] == expected
    assert [str(w.message) for w in caught if w.category is UserWarning] == [f"memaudit eval: {m}" for m in expected]
    assert caught[0].filename == __file__  # pointed at the caller's line


@pytest.mark.parametrize("url", ["s3://bucket/labels.csv", "https://example.com/labels.parquet"])
def test_eval_of_a_url_says_it_reads_local_files(url):
    # `memaudit eval s3://bucket/labels.csv` said "s3:/bucket/labels.csv: no such file" (the path's // collapsed), an
    # https URL "cannot read (ArrowInvalid: Unrecognized filesystem type in URI: https:/example.com/...)"
    from pathlib import Path

    from typer.testing import CliRunner

    from audit.cli import app

    line = (f"{url}: a URL; memaudit eval reads a labelled table from a local file (copy it here first; `memaudit run` "
            "reads URLs, eval does not)")
    with pytest.raises(RunError) as err:
        read_labelled(Path(url))
    assert str(err.value) == line
    res = CliRunner().invoke(app, ["eval", url])
    assert res.exit_code == 2 and res.output.strip() == f"memaudit: error: {line}"


def test_a_csv_with_another_separator_is_named(tmp_path):
    # a spreadsheet's CSV with ';' read as one column: "no prompt column 'prompt' (columns: prompt;memorized); see
    # --prompt-column", pointing at the wrong option
    path = tmp_path / "labels.csv"
    path.write_text("prompt;memorized\na red cat;1\na dog;0\n")
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: no prompt column 'prompt' (columns: 'prompt;memorized'); the header is one "
                              "column holding ';': a CSV is read separated by commas (a .tsv file by tabs), save it so")
    path.write_text("text,memorized\na red cat,1\na dog,0\n")
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == f"{path}: no prompt column 'prompt' (columns: 'text', 'memorized'); see --prompt-column"


def test_invalid_utf8_in_json_lines_or_a_parquet_string_column(tmp_path):
    # pyarrow does not check the bytes of a JSON string or a Parquet string column: the prompts' decoding crashed
    # (`memaudit eval` exit 1: "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff ...")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from audit.cli import app

    lines = tmp_path / "labels.jsonl"
    lines.write_bytes(b'{"prompt": "a dog", "memorized": false}\n{"prompt": "a cat \xff", "memorized": true}\n')
    table = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"a dog", b"caf\xe9", b"a fox"], pa.binary()).view(pa.string()),
                             "memorized": [False, True, True]}), table)
    for path, bad in ((lines, "1 row(s) whose prompt is not valid UTF-8 (row 1;"),
                      (table, "1 row(s) whose prompt is not valid UTF-8 (row 1;")):
        line = (f"{path}: {bad} 0-based data rows): save the table as UTF-8 (`memaudit run` rejects such rows as "
                "invalid_utf8)")
        with pytest.raises(RunError) as err:
            read_labelled(path)
        assert str(err.value) == line
        res = CliRunner().invoke(app, ["eval", str(path)])
        assert res.exit_code == 2 and res.output.strip() == f"memaudit: error: {line}"


def test_a_text_label_with_invalid_utf8_is_refused_not_a_crash(tmp_path):
    lines = tmp_path / "labels.jsonl"
    lines.write_bytes(b'{"prompt": "a dog", "memorized": "no"}\n{"prompt": "a cat", "memorized": "y\xffs"}\n')
    with pytest.raises(RunError) as err:  # was UnicodeDecodeError
        read_labelled(lines)
    assert str(err.value) == (f"{lines}: label column 'memorized' is string, not boolean (true/false, or integers "
                              "0/1); values seen: 'no', 'y\\\\xffs'")


@pytest.mark.parametrize("prompts, labels, message", [
    # a lone surrogate crashed in pyarrow (UnicodeEncodeError); audit.score rejects it as invalid_utf8
    (["a cat \ud83d", "a dog"], [1, 0], "prompts: item 0 is not valid UTF-8 text (a lone surrogate such as '\\ud83d'; "
                                        "1 such item(s)): `memaudit run` rejects such prompts as invalid_utf8"),
    # a notebook's missing label or prompt was "labels are object" / "item 2 is float"
    (["a cat", "a dog"], [True, None], "labels: item 1 is None, not a boolean (or 0/1) (1 such item(s))"),
    (["a cat", "a dog", float("nan")], [1, 0, 1], "prompts: item 2 is float (NaN: a missing value), not text (1 such "
                                                  "item(s))"),
])
def test_evaluate_names_the_bad_item(prompts, labels, message):
    from audit.evaluate import evaluate

    with pytest.raises(RunError) as err:  # before the (nonexistent) model is looked for
        evaluate(prompts, labels, "/nonexistent/model")
    assert str(err.value) == message


def test_evaluate_takes_python_booleans_and_zero_one_in_an_object_array(tiny_model):
    import numpy as np

    from audit.evaluate import evaluate

    res = evaluate(["a cat", "a dog", "a fox"], np.array([True, 0, 1], dtype=object), tiny_model, n_boot=5)
    assert (res["n_memorized"], res["n_ordinary"]) == (2, 1)  # was refused: "labels are object, not boolean"


def test_label_null_rows_past_five_end_with_dots(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("prompt,memorized\n" + "".join(f"prompt {i},{'' if i % 2 else i % 4 // 2}\n" for i in range(14)))
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: label column 'memorized' has 7 null value(s) (row 1, 3, 5, 7, 9 ...): every "
                              "prompt needs a label, true/false or 1/0")


def test_parquet_binary_prompts_are_decoded_and_a_null_one_is_named(tmp_path):
    # a Parquet prompt column of bytes was refused as "binary, not text"; its UTF-8 text is the prompt
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"caf\xc3\xa9", b"a dog", b"a fox"], pa.binary()),
                             "memorized": [True, False, False]}), path)
    prompts, labels = read_labelled(path)
    assert prompts == ["caf\u00e9", "a dog", "a fox"] and labels.tolist() == [True, False, False]
    pq.write_table(pa.table({"prompt": pa.array([b"a cat", None, b"a fox"], pa.binary()),
                             "memorized": [True, False, False]}), path)
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: 1 row(s) with a null or empty prompt (row 1): a labelled table needs a prompt "
                              "in every row")


@pytest.mark.parametrize("command", ["eval", "report", "calibrate", "diff", "layers"])
def test_an_interrupted_command_that_keeps_nothing_does_not_offer_to_resume(tmp_path, monkeypatch, command):
    # Ctrl-C in `memaudit eval` said "interrupted; rerun the same command with the same --out to resume": eval has
    # no --out and resumes nothing (nor do report, calibrate, diff, layers)
    from typer.testing import CliRunner

    import audit.calibrate
    import audit.diff
    import audit.evaluate
    import audit.models
    import audit.report
    from audit import faults
    from audit.cli import app

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(faults.RUN_FOLDER, "path", None)
    for module, name in ((audit.evaluate, "read_table"), (audit.models, "load_model"), (audit.report, "build_report"),
                         (audit.calibrate, "calibrate"), (audit.diff, "previous_run")):
        monkeypatch.setattr(module, name, stop)  # the first step of each command
    args = {"eval": ["eval", str(tmp_path / "x.csv")], "report": ["report", str(tmp_path)],
            "calibrate": ["calibrate", str(tmp_path), "-o", str(tmp_path / "c.json")],
            "diff": ["diff", str(tmp_path), str(tmp_path)], "layers": ["layers", "--model", str(tmp_path)]}[command]
    res = CliRunner().invoke(app, args)
    assert (res.exit_code, res.stderr) == (130, "memaudit: error: interrupted; nothing was kept: rerun the command to "
                                                "start again\n"), res.output


def test_eval_takes_the_noise_generator_of_a_run(tmp_path, tiny_model_dir, tiny_model):
    # a run made with --noise-generator philox could not be reproduced by eval, which drew mt19937 noise only
    import json

    import numpy as np
    from sklearn.metrics import roc_auc_score
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.scorers import ScoreConfig, Scorer

    prompts = ["a red cat", "a blue dog", "a green bird", "a fox", "a small house", "old city street"]
    labels = np.array([1, 0, 0, 1, 0, 0], bool)
    path = labels_csv(tmp_path, [str(int(y)) for y in labels])
    base = ["eval", str(path), "--model", str(tiny_model_dir), "--device", "cpu", "--bootstrap", "5",
            "--scorers", "noise_magnitude"]
    res = CliRunner().invoke(app, [*base, "--noise-generator", "philox", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    aurocs = {}
    for generator in ("philox", "mt19937"):
        risk = Scorer(tiny_model, ScoreConfig("noise_magnitude", tuple(tiny_model.default_layers),
                                              noise_generator=generator)).score(prompts)["risk"]
        aurocs[generator] = roc_auc_score(labels, risk)
    assert aurocs == {"philox": 0.5, "mt19937": 0.625}  # the two noises rank these prompts differently
    assert out["noise_generator"] == "philox"
    assert out["scorers"]["noise_magnitude"]["auroc"] == aurocs["philox"]
    res = CliRunner().invoke(app, [*base, "--noise-generator", "pcg64"])
    assert res.exit_code == 2
    assert res.output.strip() == "memaudit: error: --noise-generator 'pcg64': choose mt19937 or philox"


def test_a_prompt_run_rejects_as_too_long_is_refused_by_eval(tmp_path):
    # a 1.5 MB prompt, which `memaudit run` rejects (prompt_too_long), was tokenized and scored by eval (23 s, 700 MB)
    path = tmp_path / "labels.csv"
    long, limit = "w" * 1_000_001, "v" * 1_000_000  # one over the limit, one at it (scored, as by run)
    path.write_text(f"prompt,memorized\na red cat,1\n{long},0\n{limit},0\na fox,1\n")
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: 1 row(s) with a prompt of more than 1,000,000 characters (row 1): `memaudit "
                              "run` rejects such prompts as prompt_too_long")
