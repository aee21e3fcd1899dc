"""Tests that kill mutants surviving the session-54 mutation review (mnew54) of the code changed in session 53."""

from __future__ import annotations


def test_threshold_text_starts_at_six_digits_and_keeps_bools_as_written():
    # mutants: range(7, 18) printed 1e6 as "1000000" (.6g already reads back as "1e+06"); dropping the bool check
    # printed an edited calibration's `true` threshold as "1", as if it were a number
    from audit.text import threshold_text

    assert threshold_text(1e6) == "1e+06" and threshold_text(123456.0) == "123456"
    assert threshold_text(True) == "True" and threshold_text(None) == "None"
    assert threshold_text(float("-inf")) == "-inf" and threshold_text(float("nan")) == "nan"


def test_terminal_width_reads_only_a_positive_integer_columns(monkeypatch):
    # mutants: `int(columns) >= 0` took COLUMNS=0 as a width of 0 columns; no .strip() refused " 40 " a shell may set
    from audit.cli.common import terminal_width

    for value, width in (("40", 40), (" 40 ", 40), ("0", None), ("-5", None), ("abc", None), ("", None)):
        monkeypatch.setenv("COLUMNS", value)
        assert terminal_width() == width, value  # stdout under pytest is no terminal: None without COLUMNS


def test_zero_width_warnings_skip_a_scorer_with_no_figures():
    # mutant: dropping `"auroc_ci" in f` raised KeyError for a scorer whose every score was non-finite (no AUROC,
    # no CI: n/a in the table) instead of leaving it to the non-finite warning; a layer entry is read alike
    from audit.evaluate import zero_width_warnings

    same = {"auroc": 1.0, "auroc_ci": [1.0, 1.0], "tpr_at_1pct_fpr": 0.5, "tpr_at_1pct_fpr_ci": [0.2, 0.8],
            "tpr_at_3pct_fpr": 0.5, "tpr_at_3pct_fpr_ci": [0.2, 0.8]}
    assert zero_width_warnings({"noise_magnitude": {"auroc": None}, "attention_entropy": same},
                               {"attention_entropy": {"up.0": {"auroc": None}}}, 50, 500) == [
        "attention_entropy: AUROC 1.000 [1.000, 1.000]: a 95% bootstrap CI of zero width is no interval (every "
        "resample gave the same value, as the percentile bootstrap does for a figure at 0 or 1 or for scores all "
        "equal)"]


def test_top_note_says_only_what_the_list_left_out():
    # the note's three cases at their edges: --top at MAX_TOP lists as asked; one past it is capped; a --top above the
    # run's unique prompts says "all listed" only when all were listed (not when a --top cap cut the list)
    from audit.report import MAX_TOP, top_note

    assert top_note(MAX_TOP, MAX_TOP, "r.parquet") is None
    assert top_note(MAX_TOP + 1, MAX_TOP, "r.parquet") == (
        f"--top {MAX_TOP + 1:,}: a list holds at most {MAX_TOP:,} prompts (every scored prompt is in r.parquet)")
    assert top_note(50, 7, "r.parquet", unique=7) == "--top 50: the run has 7 unique prompts, all listed"
    assert top_note(7, 7, "r.parquet", unique=7) is None  # asked as many as there are: nothing left out
    assert top_note(50, 5, "r.parquet", unique=7) is None  # fewer listed than unique: not "all listed"
    assert top_note(50, 7, "r.parquet") is None  # a diff (no unique): only the cap is noted


def test_reference_settings_warning_makes_no_claim_without_both_sides():
    # a run whose scores an older cache served records no scored_with, and an edited manifest may hold a calibration
    # that is not a mapping: no warning either way (mutants dropping either isinstance check warned or raised)
    from audit.pipeline import reference_settings_warning

    ref = {"batch_size": 8, "compile": False, "device": "cpu", "engine": "local"}
    assert reference_settings_warning({"calibration": {"reference_scored_with": ref}}) is None
    assert reference_settings_warning({"calibration": {"reference_scored_with": ref}, "scored_with": "8"}) is None
    assert reference_settings_warning({"calibration": "edited", "scored_with": ref}) is None
    assert reference_settings_warning({"scored_with": ref}) is None


def test_check_weight_files_reads_each_component_and_lets_a_live_link_be(tmp_path):
    # a component folder holding no safetensors (check_components speaks of it) must not end the check: the next
    # component's fp16-only weights are still refused (mutant: `return` for `continue`); four variant files list three
    # and "..." (mutant: "..." after two); a link to nothing is named
    import pytest

    from audit.errors import ModelError
    from audit.models.base import check_weight_files

    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    unet = tmp_path / "unet"
    unet.mkdir()
    for i in range(4):
        (unet / f"diffusion_pytorch_model-{i}.fp16.safetensors").write_bytes(b"")
    with pytest.raises(ModelError) as err:
        check_weight_files("m", tmp_path, ["text_encoder", "unet"])
    assert str(err.value).startswith(
        "--model m: unet/ holds only 'fp16' variant weights (diffusion_pytorch_model-0.fp16.safetensors, "
        "diffusion_pytorch_model-1.fp16.safetensors, diffusion_pytorch_model-2.fp16.safetensors ...) and no "
        "diffusion_pytorch_model.safetensors")
    te2 = tmp_path / "text_encoder_2"
    te2.mkdir()
    (te2 / "model.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(ModelError, match="text_encoder_2/model.safetensors is a link to .*gone, which does not exist"):
        check_weight_files("m", tmp_path, ["text_encoder_2"])
