"""`audit.score()` refuses every run-only option with a TypeError naming it (SCORE_REFUSES), before any
model is loaded."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("option, value, why", [
    ("fail_on_flagged", 1, "filter the returned table's flagged column instead"),
    ("skip_bad_files", True, "the prompts are given as a list"),
    ("limit", 3, "every prompt gets a row"),
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
