"""Findings of session 51's leftovers (helper uleftovers): ``python -m audit``, the names a model folder's
memaudit.json gives as its default layers, the values ``--cache ''`` / ``--calibration ''`` clear at a real run's
start, and the CSV record-by-record reader's cost on rows with both quoted-empty and empty fields."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _python_m(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)


# ------------------------------------------------------------------ python -m audit

def test_python_m_audit_is_the_memaudit_command_line_with_its_exit_codes(tmp_path):
    """``python -m audit`` failed with "No module named audit.__main__; 'audit' is a package and cannot be directly
    executed" (exit 1). It now runs the memaudit command line as the ``memaudit`` script does (``audit.cli.main``):
    the same version line, a usage error's one line and exit 2, no command's help and exit 2, a missing input's
    one line and exit 2; and importing ``audit.__main__`` runs nothing."""
    version = _python_m("audit", "--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout == _python_m("audit.cli", "--version", cwd=tmp_path).stdout
    assert version.stdout.startswith("memaudit 0.1.0 (build ")

    bare = _python_m("audit", cwd=tmp_path)
    assert bare.returncode == 2
    assert "Usage: memaudit [OPTIONS] COMMAND [ARGS]..." in bare.stdout

    usage = _python_m("audit", "run", "--nope", cwd=tmp_path)
    assert usage.returncode == 2
    assert usage.stderr.startswith("memaudit: error: No such option: --nope")
    assert usage.stderr.rstrip().endswith("see memaudit run --help")

    missing = _python_m("audit", "run", str(tmp_path / "absent.parquet"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == f"memaudit: error: {tmp_path / 'absent.parquet'}: no such file or folder\n"

    imported = subprocess.run([sys.executable, "-c", "import audit.__main__; print('imported')"], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert (imported.returncode, imported.stdout) == (0, "imported\n")


# ------------------------------------------------------------------ --cache '' / --calibration '' at a run's start

def test_a_run_says_at_its_start_which_config_values_an_empty_flag_dropped(tmp_path, tiny_model_dir):
    """``--cache ''`` and ``--calibration ''`` over a --config file that sets them: the dry run said the values it
    dropped, the real run said nothing of them. Now the run says the dry run's lines on stderr at its start (before
    the summary), runs without them (no cache folder made, no flagged column, the file's --fail-on-flagged 0 gate
    gone: exit 0), and says nothing of the kind without the empty flags."""
    import polars as pl
    from typer.testing import CliRunner

    from audit.cli import app

    src = tmp_path / "p.csv"
    src.write_text("prompt\na red cat\na blue dog\n")
    cal = tmp_path / "cal.json"  # never read: the command line drops it
    conf = tmp_path / "job.toml"
    conf.write_text(f'cache = "{tmp_path / "cache"}"\ncalibration = "{cal}"\nfail_on_flagged = 0\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--device", "cpu", "--config",
                                   str(conf), "--cache", "", "--calibration", "", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    err = res.stderr.splitlines()
    assert err[:2] == [
        f"memaudit: cache: none: --cache '' runs without the --config file's ({tmp_path / 'cache'}): every prompt "
        "read is sent to the model",
        f"memaudit: calibration: none: --calibration '' runs without the --config file's ({cal}): no flagged or "
        "risk_percentile column, and no --fail-on-flagged 0 gate (it needs the calibration)"]
    assert err[2].startswith("memaudit: 2 rows read, 2 scored, 0 rejected")
    assert res.stdout == f"{out}\n"
    assert not (tmp_path / "cache").exists()
    assert pl.read_parquet(out / "risk.parquet")["flagged"].to_list() == [None, None]  # no calibration: no flags

    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--device", "cpu", "--cache", "",
                                   "--out", str(tmp_path / "plain"), "--no-progress"])  # no file: nothing dropped
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0].startswith("memaudit: 2 rows read, 2 scored, 0 rejected")


# ------------------------------------------------------------------ memaudit.json's default layers

def _model_naming(tmp_path, tiny_model_dir, layers):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "memaudit.json").write_text(json.dumps({"default_layers": layers}))
    return model


TINY_LAYERS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn2, down_blocks.1.attentions.0.transformer_blocks."
               "0.attn2, mid_block.attentions.0.transformer_blocks.0.attn2, up_blocks.0.attentions.0.transformer_blocks"
               ".0.attn2, up_blocks.0.attentions.1.transformer_blocks.0.attn2, up_blocks.1.attentions.0.transformer_"
               "blocks.0.attn2, up_blocks.1.attentions.1.transformer_blocks.0.attn2")
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"


def test_default_layers_of_memaudit_json_that_the_unet_lacks_are_refused_naming_memaudit_json(tmp_path,
                                                                                              tiny_model_dir):
    """A model folder whose memaudit.json names default_layers ["nope", MID]: the run refused with "not a
    cross-attention layer of this UNet: nope", naming neither memaudit.json nor any option (the user had given no
    --layers), and ``run --dry-run`` passed it (exit 0). Now the run's line names the file and what to do (exit 2),
    and the dry run refuses it with the same line (exit 2; test_ufixcli_findings); with --layers the
    folder's default layers are not used, and both go ahead."""
    from typer.testing import CliRunner

    from audit.cli import app

    model = _model_naming(tmp_path, tiny_model_dir, ["nope", MID])
    src = tmp_path / "p.csv"
    src.write_text("prompt\na red cat\n")
    base = ["run", str(src), "--model", str(model), "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"]
    line = (f"memaudit: error: {model / 'memaudit.json'}: default_layers nope,{MID}: not a cross-attention layer of "
            f"this UNet: nope. Cross-attention layers: {TINY_LAYERS} (fix or remove default_layers in memaudit.json, "
            "or give --layers)")
    dry = CliRunner().invoke(app, [*base, "--dry-run"])
    assert dry.exit_code == 2
    assert dry.stderr == line + "\n"
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1] == line
    assert not (tmp_path / "out" / "risk.parquet").exists()

    dry = CliRunner().invoke(app, [*base, "--dry-run", "--layers", MID])
    assert dry.exit_code == 0, dry.output
    res = CliRunner().invoke(app, [*base, "--layers", MID])
    assert res.exit_code == 0, res.output


def test_a_rerun_checks_memaudit_json_default_layers_from_the_config_with_the_same_line(tmp_path, tiny_model_dir):
    """The identity check before the model loads (a rerun of an --out, the ray engine's head: its workers refused
    the layer once the cluster had started) checked --layers only; it now checks memaudit.json's default layers too,
    with the run's line naming the file."""
    import pytest

    from audit.config import RunConfig
    from audit.models.sd1 import SD1
    from audit.runner import check_layers_from_config

    model = _model_naming(tmp_path, tiny_model_dir, ["nope"])
    cfg = RunConfig(inputs=("x.csv",), model=str(model))
    with pytest.raises(KeyError) as exc:
        check_layers_from_config(cfg, SD1, model, str(model), {"default_layers": ["nope"]})
    assert exc.value.args[0] == (f"{model / 'memaudit.json'}: default_layers nope: not a cross-attention layer of "
                                 f"this UNet: nope. Cross-attention layers: {TINY_LAYERS} (fix or remove "
                                 "default_layers in memaudit.json, or give --layers)")
    check_layers_from_config(cfg, SD1, model, str(model), {"default_layers": [MID]})  # a layer it has: no refusal
    check_layers_from_config(cfg, SD1, model, str(model), {})  # none named: nothing to check


def test_names_without_weights_reads_the_safetensors_headers_only(tmp_path, tiny_model_dir):
    """The dry run's cheap check: a name under which the UNet's safetensors files hold no tensor; a module that
    holds tensors passes (even one that is not a cross-attention layer: the run refuses that one), a tensor's own
    name is no module; shards are read through their index; no weights file, or a header that is not JSON, gives
    None (no check: loading the model says what is wrong)."""
    import json
    import shutil

    from audit.models.base import names_without_weights

    unet = tiny_model_dir / "unet"
    attn1 = MID.replace("attn2", "attn1")
    assert names_without_weights(unet, ["nope", MID, attn1, "mid_block", f"{MID}.to_q.weight", "mid"]) == [
        "nope", f"{MID}.to_q.weight", "mid"]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", sharded / "part-1.safetensors")
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"{MID}.to_q.weight": "part-1.safetensors"}}))
    assert names_without_weights(sharded, [MID, "nope"]) == ["nope"]
    assert names_without_weights(tmp_path / "none", ["nope"]) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "diffusion_pytorch_model.safetensors").write_bytes((12).to_bytes(8, "little") + b"not json at all")
    assert names_without_weights(bad, ["nope"]) is None


# ------------------------------------------------------------------ the CSV record reader's quoted "" marks

def _marks_by_regex(record, written):
    """The marking as it was (every record's fields found by the regular expression): the reference."""
    import itertools

    from audit import sources

    fields = [m[1] for m in itertools.islice(sources._CSV_FIELD.finditer(written.rstrip("\r\n")), len(record))]
    if len(fields) != len(record):
        return record
    return [sources.QUOTED_EMPTY if v == "" and f == '""' else v for f, v in zip(fields, record)]


def test_quoted_empty_marks_are_those_of_the_regular_expression_on_tricky_records():
    """The record reader now finds the fields of a record with no comma inside quotes by splitting at its commas;
    on 20,000 random records of tricky fields (quoted commas and line breaks, doubled quotes, text after a closing
    quote, a quote inside an unquoted field, an unclosed quote, CRLF) its marks (QUOTED_EMPTY or not, field by field)
    are those of the regular expression it used for every record."""
    import csv
    import io
    import random

    from audit import sources

    tokens = ['""', "", "a", '"a,b"', '","', '"x""y"', '""""', '"a\nb"', '"",""', 'a"b', '"a"b', '""x', "x\"\"",
              '"', '"\r\n"', " ", '" "', '"unclosed, to the end']
    rng = random.Random(0)
    compared = marked = 0
    for _ in range(20000):
        written = ",".join(rng.choice(tokens) for _ in range(rng.randint(1, 6))) + rng.choice(["\n", "\r\n", ""])
        records = list(csv.reader(io.StringIO(written, newline="")))
        if len(records) != 1:  # "" (no record), or several: not one record's text
            continue
        (record,) = records
        got, want = sources._mark_quoted_empty(list(record), written), _marks_by_regex(list(record), written)
        assert [(v, type(v)) for v in got] == [(v, type(v)) for v in want], (written, record)
        compared += 1
        marked += sum(type(v) is sources._QuotedEmpty for v in got)
    assert compared > 19000 and marked > 10000


def test_the_record_reader_matches_fields_by_the_regular_expression_only_where_quotes_hold_a_comma(tmp_path,
                                                                                                   monkeypatch):
    """The CSV record-by-record reader took 4.5x as long on a file whose every row holds a quoted "" and an empty
    field (2.7 s against 0.6 s for 300,000 rows): every such record's fields were found by a regular expression.
    Now only a record with a comma inside quotes is; the rows read are the same (a quoted "" the empty string
    QUOTED_EMPTY, an empty field "")."""
    from audit import sources

    calls = []

    class Counting:
        def finditer(self, text):
            calls.append(text)
            return FIELD.finditer(text)

    FIELD = sources._CSV_FIELD
    monkeypatch.setattr(sources, "_CSV_FIELD", Counting())
    src = tmp_path / "both.csv"
    src.write_text("id,prompt,note,extra\n" + "".join(f'{i},a photo of thing {i},"",\n' for i in range(1000))
                   + '1000,"a, b",""\n')
    rows = list(sources._csv_rows(str(src), quoted_empty=True))
    assert rows[0] == ["id", "prompt", "note", "extra"] and len(rows) == 1002
    assert [(r, [type(v) for v in r]) for r in rows[1:3]] == [
        (["0", "a photo of thing 0", "", ""], [str, str, sources._QuotedEmpty, str]),
        (["1", "a photo of thing 1", "", ""], [str, str, sources._QuotedEmpty, str])]
    assert all(type(r[2]) is sources._QuotedEmpty and type(r[3]) is str for r in rows[1:1001])
    assert rows[1001] == ["1000", "a, b", ""] and type(rows[1001][2]) is sources._QuotedEmpty
    assert calls == ['1000,"a, b",""']  # the one record with a comma inside quotes


def test_the_dry_runs_weight_name_check_passes_every_cross_attention_layer_of_every_family(family_folders):
    """The dry run's check of memaudit.json's default layers against the denoiser's weight names refuses no
    cross-attention layer of any family (SD 2.x, SDXL: unet/; PixArt, SD 3.x: transformer/), and refuses a name
    that is none of its modules; the cross-attention layers read from the weights' names are those of the denoiser
    built from its config, on every family."""
    from audit.models import detect_family
    from audit.models.base import names_without_weights

    for key, root in family_folders.items():
        adapter, _ = detect_family(root, str(root))
        component = "transformer" if adapter.name in ("pixart", "sd3") else "unet"
        assert adapter.denoiser_component == component, key
        layers = adapter.layers_from_config(root)
        assert len(layers) >= 4, key
        assert names_without_weights(root / component, layers) == [], key
        assert names_without_weights(root / component, [*layers, "nope"]) == ["nope"], key
        assert adapter.layers_from_weights(root) == set(layers), key


def test_a_dry_run_of_a_folder_whose_memaudit_json_names_every_layer_goes_ahead(tmp_path, tiny_model_dir):
    """Every cross-attention layer of the tiny SD 1.x model named in memaudit.json: the dry run refuses none (exit 0);
    a module that holds weights but is not a cross-attention layer (an attn1) passed the dry run too, and was refused
    when the run started; now the dry run refuses it with the run's line (test_ufixcli_findings)."""
    from typer.testing import CliRunner

    from audit.cli import app

    src = tmp_path / "p.csv"
    src.write_text("prompt\na red cat\n")
    every = _model_naming(tmp_path / "every", tiny_model_dir, TINY_LAYERS.split(", "))
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(every), "--out", str(tmp_path / "o"), "--dry-run"])
    assert res.exit_code == 0, res.output
    attn1 = MID.replace("attn2", "attn1")
    other = _model_naming(tmp_path / "attn1", tiny_model_dir, [attn1])
    base = ["run", str(src), "--model", str(other), "--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"]
    dry = CliRunner().invoke(app, [*base, "--dry-run"])
    assert dry.exit_code == 2
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2
    assert dry.stderr == res.stderr.splitlines()[-1] + "\n"
    assert res.stderr.startswith(f"memaudit: error: {other / 'memaudit.json'}: default_layers {attn1}: not a "
                                 f"cross-attention layer of this UNet: {attn1}. Cross-attention layers: ")
