"""Mutation review (session 50, mnew50d) of the code changed on 2026-12-07: the exit-4 limit, the printed shares,
the digits that keep printed risks and thresholds apart, the score cache's notes and columns, and the sources'
line-break checks. Each test kills a hand-applied mutant that every other test let pass."""

from __future__ import annotations

from test_report_mutants import make_run


def test_a_share_at_or_under_its_limit_keeps_one_decimal():
    """share() adds decimals only to a share *above* the limit that would print as the limit: 1 of 200 rows under a
    limit of 0.01 is 0.5%, and 1 of 100 at a limit of 0.01 (equal, not above) is 1.0%. A share() that added digits
    whenever the shown value was at most the limit ran to its 16-decimal fallback ('0.5000000000000000%')."""
    from audit.text import share

    assert share(1, 200, 0.01) == "0.5%"
    assert share(1, 100, 0.01) == "1.0%"
    assert share(29, 100, 0.29) == "29.0%"
    assert share(0, 100, 0.01) == "0.0%"


def test_equal_rank_rises_list_in_the_new_runs_row_order(tmp_path):
    """Twelve prompts tied at old risk 1.0 all rise to a tied new risk 5.0 (old rank 4, new rank 1: a rise of 3
    each). Their order is the new run's row order (its ranking breaks risk ties by prompt_id, so rows #0, #1, #10,
    #11, #2, ...), the same in every diff of the two runs; the old run holds them in reverse. A sort on rise and rank
    alone left them in whatever order the join made, and one that took best_row descending reversed them."""
    from audit.diff import diff_runs

    tied = [f"t{i}" for i in range(12)]
    before = make_run(tmp_path / "before", [("h0", 10.0), ("h1", 9.0), ("h2", 8.0)] + [(p, 1.0) for p in tied[::-1]])
    after = make_run(tmp_path / "after", [(p, 5.0) for p in tied] + [("h0", 0.5), ("h1", 0.4), ("h2", 0.3)])
    d = diff_runs(before, after)
    order = ["t0", "t1", "t10", "t11", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9"]
    assert d.rank_rises["prompt"].to_list() == order
    assert d.rank_rises.select("rise", "old_rank", "rank").unique().rows() == [(3, 4, 1)]
    assert diff_runs(before, after, top=3).rank_rises["prompt"].to_list() == order[:3]
