"""audit.text.visible's documented character classes, audit.tokenizer's tie-break rule, and audit.faults'
retry bound. Pure functions; no model."""

from __future__ import annotations

import pytest

from audit.errors import RunError, SourceError


# ---------------------------------------------------------------- audit.text.visible

@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u061c", "\u200e", "\u200f"])
def test_line_separators_and_directional_marks_are_escaped(char):
    """U+2028/U+2029 break a terminal line; U+061C, U+200E, U+200F reorder what follows (bidi marks)."""
    from audit.text import visible

    assert visible(f"a{char}b") == f"a\\u{ord(char):04x}b"
    assert visible(f"a{char}b", one_line=True) == f"a\\u{ord(char):04x}b"


def test_a_supplementary_variation_selector_is_kept_after_any_cjk_ideograph_only():
    """U+E0100..E01EF select ideographic variants: kept after a CJK ideograph of any block (URO, extension A, the
    compatibility block, the supplementary planes), escaped after anything else."""
    from audit.text import visible

    vs17 = "\U000e0100"
    for ideograph in ("\u845b", "\u3400", "\uf900", "\U00020000"):
        assert visible(ideograph + vs17) == ideograph + vs17, hex(ord(ideograph))
    assert visible("a" + vs17) == "a\\U000e0100"
    assert visible("\U0001f60a" + vs17) == "\U0001f60a\\U000e0100"


# ---------------------------------------------------------------- audit.tokenizer

def test_bpe_ties_are_broken_by_the_lexicographically_smallest_pair():
    """Two words, each pair seen once: the smaller pair ("a", "b</w>") merges first (the docstring's rule)."""
    from audit.tokenizer import learn_merges

    assert learn_merges(["cd", "ab"]) == [("a", "b</w>"), ("c", "d</w>")]
    # the most frequent pair first ("c", "d": in two words) over the smaller ("a", "b</w>"), then ties by order
    assert learn_merges(["cde", "ab", "cdd"]) == [("c", "d"), ("a", "b</w>"), ("cd", "d</w>"), ("cd", "e</w>")]


# ---------------------------------------------------------------- audit.faults

class _Unit:
    index, url, start, stop = 3, "data/a.parquet", 40, 60


def test_a_failing_unit_is_tried_retries_plus_one_times_and_on_retry_between_attempts():
    from audit.faults import run_unit_with_retries

    calls, retried = [], []

    def fn():
        calls.append(1)
        raise OSError(f"disk on fire {len(calls)}")

    with pytest.raises(RunError, match=r"unit 3 \(data/a\.parquet rows 40-60\) failed 3 times, last with OSError: "
                                       r"disk on fire 3"):
        run_unit_with_retries(fn, _Unit(), retries=2, on_retry=lambda n, exc: retried.append((n, str(exc))))
    assert len(calls) == 3
    assert retried == [(1, "disk on fire 1"), (2, "disk on fire 2")]  # not after the last attempt


def test_a_unit_that_succeeds_on_its_last_attempt_returns_its_result():
    from audit.faults import run_unit_with_retries

    calls = []

    def fn():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("flaky")
        return "done"

    assert run_unit_with_retries(fn, _Unit(), retries=2) == "done" and len(calls) == 3


def test_an_unreadable_input_is_not_retried_and_keeps_its_error_type():
    from audit.faults import run_unit_with_retries

    calls = []

    def fn():
        calls.append(1)
        raise SourceError("data/a.parquet: unreadable")

    with pytest.raises(SourceError, match="unreadable"):
        run_unit_with_retries(fn, _Unit(), retries=2)
    assert calls == [1]
