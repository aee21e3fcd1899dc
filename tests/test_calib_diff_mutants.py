"""Mutation review of calibrate.py, diff.py and cascade.py (session 43): tests that pin what the others left open."""

from __future__ import annotations

import pytest

from audit.cascade import top_size


def test_confirm_top_fraction_is_read_as_the_decimal_given():
    # in binary 0.07 * 100 = 7.000000000000001, whose ceiling is 8: --confirm-top 0.07 of 100 prompts must be 7
    assert top_size("0.07", 100) == 7 and top_size("7%", 100) == 7 and top_size(0.07, 100) == 7
    assert top_size("0.14", 200) == 28 and top_size("55%", 100) == 55 and top_size("0.28", 300) == 84
    # still rounded up when the product is not a whole number, and a count is a count
    assert top_size("0.07", 101) == 8 and top_size("0.5%", 1001) == 6 and top_size("7", 100) == 7


def test_an_unknown_confirm_scorer_is_named_as_the_confirm_option():
    from types import SimpleNamespace

    from audit.cascade import check_confirm_options
    from audit.errors import RunError

    cfg = SimpleNamespace(confirm="guidance_geometri", confirm_top="2", scorer="attention_entropy", engine="local")
    with pytest.raises(RunError) as err:
        check_confirm_options(cfg)
    text = str(err.value)
    assert text.startswith("--confirm guidance_geometri: choose one of ") and "--scorer" not in text
    assert text.endswith("(did you mean 'guidance_geometry'?)")
