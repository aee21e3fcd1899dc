"""`audit.score()` refuses every run-only option with a TypeError naming it (SCORE_REFUSES), before any
model is loaded."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("option, value, why", [
    ("fail_on_flagged", 1, "filter the returned table's flagged column instead"),
    ("skip_bad_files", True, "the prompts are given as a list"),
    ("limit", 3, "every prompt gets a row"),
    ("retry_failed", True, "each call scores into a new folder: call it again to retry"),  # it did nothing, silently
])
def test_score_refuses_run_only_options(option, value, why):
    import audit

    with pytest.raises(TypeError, match=rf"^score\(\) takes no {option} \({why}\); audit\.run\(inputs, out=\.\.\., "
                                        r"\.\.\.\) runs a whole audit$"):
        audit.score(["a photo"], **{option: value})


def test_score_refuses_any_mapping_not_only_a_dict():
    """A read-only mapping iterates its keys as a dict does: refused as a dict is (it scored the keys)."""
    import types

    import audit

    for prompts in ({"a red cat": 1}, types.MappingProxyType({"a red cat": 1})):
        with pytest.raises(TypeError, match=f"not a {type(prompts).__name__}: wrap a single prompt in a list"):
            audit.score(prompts)


def test_an_unknown_option_lists_only_what_the_function_takes():
    """`audit.score(["x"], bogus=1)` listed limit, fail_on_flagged, id_column, prompt_column and skip_bad_files
    among its options, then refused each of them. score() lists the run options less SCORE_REFUSES; run() all."""
    import dataclasses

    import audit
    from audit.api import SCORE_REFUSES
    from audit.config import RunConfig

    options = sorted({f.name for f in dataclasses.fields(RunConfig)} - {"inputs", "out"})
    with pytest.raises(TypeError) as got:
        audit.score(["a photo"], bogus=1)
    listed = str(got.value).split("the options are ")[1].split(", ")
    assert listed == [o for o in options if o not in SCORE_REFUSES] and "limit" not in listed and "seed" in listed
    with pytest.raises(TypeError) as got:
        audit.run("p.parquet", bogus=1)
    assert str(got.value).split("the options are ")[1].split(", ") == options


def test_run_reads_a_config_file_and_its_own_arguments_win(tmp_path, tiny_model_dir):
    """`audit.run(..., config="nightly.toml")` raised TypeError: the pipelines/*.toml files were the CLI's only. A
    config file now gives audit.run its inputs, out and options, as `memaudit run --config` reads it; the
    arguments given to audit.run win over the file's. A bad file raises the CLI's ConfigError."""
    import audit
    from audit.errors import ConfigError

    (tmp_path / "p.txt").write_text("a red cat\nold boat\n")
    (tmp_path / "q.txt").write_text("blue sky\n")
    (tmp_path / "nightly.toml").write_text(
        f'inputs = ["{{config_dir}}/p.txt"]\nout = "{{config_dir}}/runs/{{date}}"\nmodel = "{tiny_model_dir}"\n'
        'device = "cpu"\nseed = 3\nbatch_size = 4\n')
    out, manifest = audit.run(config=tmp_path / "nightly.toml", log=lambda m: None)
    assert out.parent == tmp_path / "runs" and manifest["counts"]["rows_read"] == 2
    assert manifest["score_config"]["seed"] == 3 and manifest["inputs"] == [str(tmp_path / "p.txt")]
    out2, m2 = audit.run(str(tmp_path / "q.txt"), tmp_path / "other", config=tmp_path / "nightly.toml", seed=5,
                         log=lambda m: None)
    assert out2 == tmp_path / "other" and m2["counts"]["rows_read"] == 1 and m2["score_config"]["seed"] == 5
    (tmp_path / "bad.toml").write_text("sed = 3\n")
    with pytest.raises(ConfigError, match=r"unknown option 'sed' \(did you mean 'seed'\?\)"):
        audit.run(config=tmp_path / "bad.toml")
