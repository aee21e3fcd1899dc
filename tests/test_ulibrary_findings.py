"""Findings of a platform engineer who uses memaudit as a Python library (session 45, "ulibrary"): a request
handler that keeps a model loaded and scores a few prompts per request from several threads, a pipeline step that
scores a table of captions and joins the scores back, and a notebook that reads a run folder.

Pinned here:
- ``audit.score`` left transformers' logging at ERROR, diffusers' at CRITICAL and both libraries' (and the hub's)
  progress bars off for the whole process after its first call: a service lost those libraries' warnings. Loading
  now puts them back (:func:`test_score_leaves_the_callers_logging_levels_and_progress_bars_as_they_were`).
"""

from __future__ import annotations

import pytest

PROMPTS = ["a red cat on a beach", "an old city street at sunset", "a portrait of a small blue dog"]


@pytest.fixture()
def hf_logging_state():
    """Transformers' and diffusers' logging levels and progress-bar switches set to values memaudit would change,
    put back after the test."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    saved = (hf_logging.get_verbosity(), diffusers_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
             diffusers_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled())
    hf_logging.set_verbosity_warning()
    diffusers_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    diffusers_logging.enable_progress_bar()
    yield hf_logging, diffusers_logging, hub_utils
    hf_logging.set_verbosity(saved[0])
    diffusers_logging.set_verbosity(saved[1])
    (hf_logging.enable_progress_bar if saved[2] else hf_logging.disable_progress_bar)()
    (diffusers_logging.enable_progress_bar if saved[3] else diffusers_logging.disable_progress_bar)()
    (hub_utils.disable_progress_bars if saved[4] else hub_utils.enable_progress_bars)()


def test_score_leaves_the_callers_logging_levels_and_progress_bars_as_they_were(tiny_model_dir, hf_logging_state):
    import logging

    import audit

    hf_logging, diffusers_logging, hub_utils = hf_logging_state
    df = audit.score(PROMPTS[:1], model=str(tiny_model_dir))
    assert df["reason"].to_list() == [None]
    assert hf_logging.get_verbosity() == logging.WARNING
    assert diffusers_logging.get_verbosity() == logging.INFO
    assert hf_logging.is_progress_bar_enabled() is True
    assert diffusers_logging.is_progress_bar_enabled() is True
    assert hub_utils.are_progress_bars_disabled() is False
