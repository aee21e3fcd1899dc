"""Mutation review (session 50) of audit/mitigation/inference.py and audit/models/base.py: behaviours no test
pinned. Expected values are derived by hand (token counts of short prompts, positions kept by the summary mask),
never copied from the code's output. Tiny seeded models (audit.tiny, conftest's ``pipe``): CPU, no network."""

from __future__ import annotations

import torch

PROMPTS = ["a red cat", "an old boat on the lake at sunset"]  # n = 5 and 10: BOS + words + first EOS
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


def _kept(m, layer=LAYER):
    """Key positions with any probability > 0, per UNet row, in the last forward of ``layer``."""
    return (m.probs[layer] > 0).any(dim=(1, 2)).sum(-1).tolist()


def test_changing_active_between_direct_unet_calls_changes_the_mitigated_rows(pipe):
    """``Mitigation.active`` (a documented attribute: which conditional rows are mitigated) set to another value
    between two UNet calls of the same prompts applies to the second call: rows are cached per batch shape AND
    active, so the first call's rows are not reused. Guidance batch [uncond; cond] of 2 prompts, n = 5 and 10:
    an active row keeps n positions in both halves, an inactive one all 77."""
    from audit.mitigation.inference import Mitigation

    g = torch.Generator().manual_seed(3)
    ehs, x = torch.randn(4, 77, 32, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    with torch.no_grad(), Mitigation(pipe) as m:
        m.keep_probs = True
        m.set_prompts(2, torch.tensor([5, 10]))
        m.active = torch.tensor([True, False])
        pipe.unet(x, 981, encoder_hidden_states=ehs)
        first = _kept(m)
        m.active = torch.tensor([False, True])
        pipe.unet(x, 981, encoder_hidden_states=ehs)
        second = _kept(m)
    assert first == [5, 77, 5, 77]
    assert second == [77, 10, 77, 10]


def test_a_unet_that_projects_its_encoder_states_is_refused_before_anything_is_installed(parts):
    """A UNet2DConditionModel with ``encoder_hid_dim_type`` set (its cross-attention keys come from a projection
    of the encoder states, as an IP-Adapter's image tokens or Kandinsky's text_proj) has no BOS and summary
    positions the rule is defined on: ``mitigate`` refuses it in one line naming the projection type, and the
    UNet's processors are left as they were."""
    import pytest
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from audit.mitigation import MitigationError, mitigate

    tok, te, unet, sch, vae = parts
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # _use_default_values would reset it
    projected = UNet2DConditionModel.from_config(dict(cfg, encoder_hid_dim_type="text_proj", encoder_hid_dim=32))
    assert projected.config.encoder_hid_dim_type == "text_proj"
    p = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=projected, scheduler=sch,
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    before = {n: type(proc).__name__ for n, proc in projected.attn_processors.items()}
    with pytest.raises(MitigationError) as err:
        mitigate(p)
    assert str(err.value).startswith("StableDiffusionPipeline: the UNet projects its encoder states first "
                                     "(text_proj, e.g. an IP-Adapter's image tokens)")
    assert {n: type(proc).__name__ for n, proc in projected.attn_processors.items()} == before
    assert "encode_prompt" not in p.__dict__


def test_set_prompts_takes_numpy_and_torch_integer_counts_and_refuses_bools(pipe):
    """``set_prompts(n_cond)`` took only a Python int: ``np.int64(2)`` (``np.count_nonzero``) or a torch integer was
    refused as "n_cond must be a positive integer, got 2". Integers of any kind are taken (stored as an int); a bool
    (True would read as 1 row) and a float are still refused."""
    import numpy as np
    import pytest

    from audit.mitigation import MitigationError
    from audit.mitigation.inference import Mitigation

    m = Mitigation(pipe)
    for given in (np.int64(2), torch.tensor(2), 2):
        m.set_prompts(given, torch.tensor([5, 10]))
        assert type(m.n_cond) is int and m.n_cond == 2 and m.lengths.tolist() == [5, 10]
    for bad in (True, np.True_, torch.tensor(True), 2.0, np.float64(2.0), "2", 0, np.int64(-1)):
        with pytest.raises(MitigationError, match="n_cond must be a positive integer"):
            m.set_prompts(bad, None)


def test_a_second_threads_call_keeps_its_own_probabilities(pipe):
    """The per-call state is per thread (``_PerThread``), each thread starting from a FRESH mutable default: a
    pipeline call made in another thread with ``keep_probs`` records that call's attention in that thread's
    ``probs`` (the 10-token prompt keeps 10 positions in both rows of its guidance batch), and the thread that
    entered the block, which made no call, still has an empty ``probs``."""
    import threading

    from audit.mitigation import mitigate
    from helpers import generate_np

    seen = {}

    def work():
        try:
            generate_np(pipe, PROMPTS[1], 1, 0)
            seen["kept"] = _kept(m)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            seen["error"] = repr(exc)

    with mitigate(pipe) as m:
        m.keep_probs = True
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        assert seen == {"kept": [10, 10]}
        assert m.probs == {}
