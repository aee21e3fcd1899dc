"""Pins what hand-applied mutants of the family adapters (SDXL, SD 3.x, PixArt), ``audit.text.visible`` and the lab
build showed unpinned: each adapter runs the text encoder it is given, SDXL's unconditional branch keeps a declared
mask, SD 3.x calls its transformer with the pipeline's own conditioning and reads memaudit.json's layers without
weights, PixArt's micro-conditions are for 1024 px models only (its scheduler the folder's, its spans left alone by a
slow tokenizer), the boundaries of visible()'s character ranges, the CLIP tokenizer's default length, and the lab
build's criteria at their thresholds, its picture rows and its prompts table. References: the diffusers pipelines'
own encode_prompt, escapes written out by hand, hand counts. Tiny seeded models (the builders of test_families), CPU
only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from audit.models import load_model

PROMPTS = ["a red cat on the beach", "portrait of an old man!!", "dog"]


class _Recording:
    """A stand-in for a compiled text encoder: records each call's ids and runs the wrapped module."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __call__(self, ids, **kwargs):
        self.calls.append((tuple(ids.shape), sorted(kwargs)))
        return self.module(ids, **kwargs)


# ---------------------------------------------------------------- SDXL

def test_sdxl_encode_runs_the_text_encoder_it_is_given(family_models):
    """``text_encoder`` (the scorer's compiled wrapper of the first encoder) is the module that runs, once per
    batch with the 77 ids of the first tokenizer; the result is the plain encoder's."""
    sdxl = family_models["sdxl"]
    tokens = sdxl.adapter.tokenize(sdxl, PROMPTS)
    wrapper = _Recording(sdxl.text_encoder)
    with torch.no_grad():
        ours = sdxl.adapter.encode(sdxl, tokens, text_encoder=wrapper)
        plain = sdxl.adapter.encode(sdxl, tokens)
    assert wrapper.calls == [((3, 77), ["output_hidden_states"])]
    torch.testing.assert_close(ours.embeddings, plain.embeddings, rtol=0, atol=0)
    with torch.no_grad():
        sdxl.adapter.unconditional(sdxl, sdxl.adapter.tokenize(sdxl, [""]), text_encoder=wrapper)
    assert wrapper.calls[1] == ((1, 77), ["output_hidden_states"])


def test_sdxl_unconditional_branch_keeps_a_declared_mask(tmp_path, family_folders):
    """With memaudit.json's unet_encoder_attention_mask the zeroed empty prompt attends to BOS only (BOS, EOS: kept 2,
    position i attended iff i < 2 - 1), as the conditional branch attends to BOS and its prompt tokens."""
    sdxl_dir = family_folders["sdxl"]
    import shutil

    root = shutil.copytree(sdxl_dir, tmp_path / "m")
    (root / "memaudit.json").write_text(json.dumps({"unet_encoder_attention_mask": "bos_and_prompt_tokens"}))
    m = load_model(str(root), "cpu", "float32")
    with torch.no_grad():
        uncond = m.adapter.unconditional(m, m.adapter.tokenize(m, [""]))
    expected = np.zeros((1, 77), dtype=np.int64)
    expected[0, 0] = 1
    assert (uncond.embeddings == 0).all()
    np.testing.assert_array_equal(uncond.mask.numpy(), expected)


# ---------------------------------------------------------------- SD 3.x

def test_sd3_velocity_is_the_transformer_called_as_the_pipeline_calls_it(family_folders, family_models):
    """The conditioning is StableDiffusion3Pipeline.encode_prompt's with its defaults (T5's 256 tokens after CLIP's
    77: 333 positions; both CLIP pooled projections, 32 + 32), and the velocity is the transformer called as the
    pipeline's __call__ calls it: the timestep expanded to the batch, those embeddings and pooled projections."""
    sd3 = family_models["sd3"]
    sd3_dir = family_folders["sd3"]
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, vae=None)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(1000.0)
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, prompt_3=None, device="cpu",
                                               do_classifier_free_guidance=False)
        cond = sd3.adapter.encode(sd3, sd3.adapter.tokenize(sd3, PROMPTS))
        theirs = pipe.transformer(hidden_states=x, timestep=t.expand(3), encoder_hidden_states=emb,
                                  pooled_projections=pooled, return_dict=False)[0]
        ours = sd3.adapter.forward(sd3.unet, x, t, cond)
    assert emb.shape == (3, 77 + 256, 32) and pooled.shape == (3, 64)
    torch.testing.assert_close(cond.embeddings, emb, rtol=0, atol=0)
    torch.testing.assert_close(cond.added["pooled_projections"], pooled, rtol=0, atol=0)
    assert cond.mask is None
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # the pooled projections and the timestep both change the velocity (the comparison above can tell them)
    with torch.no_grad():
        other_t = pipe.transformer(hidden_states=x, timestep=t.expand(3) - 1, encoder_hidden_states=emb,
                                   pooled_projections=pooled, return_dict=False)[0]
        other_p = pipe.transformer(hidden_states=x, timestep=t.expand(3), encoder_hidden_states=emb,
                                   pooled_projections=pooled * 0, return_dict=False)[0]
    assert (other_t - theirs).abs().max() > 1e-4 and (other_p - theirs).abs().max() > 1e-4


def test_sd3_and_pixart_layers_from_config_are_memaudit_jsons_when_it_names_some(family_folders):
    """What the Ray driver records without weights: memaudit.json's default_layers when set, else the 4th layer."""
    sd3_dir = family_folders["sd3"]
    pixart_dir = family_folders["pixart"]
    from audit.models import PIXART, SD3

    assert SD3.default_layers_from_config(sd3_dir, {"default_layers": ["transformer_blocks.1.attn"]}) == [
        "transformer_blocks.1.attn"]
    assert SD3.default_layers_from_config(sd3_dir, {}) == ["transformer_blocks.3.attn"]
    assert PIXART.default_layers_from_config(pixart_dir, {"default_layers": ["transformer_blocks.0.attn2"]}) == [
        "transformer_blocks.0.attn2"]
    assert PIXART.default_layers_from_config(pixart_dir, None) == ["transformer_blocks.3.attn2"]


def test_sd3_scheduler_config_without_a_class_name_is_flow_matching():
    """A scheduler_config.json that names no class is FlowMatchEulerDiscreteScheduler's (the SD 3.x default): with
    static shift 3, sigma -> 3 s / (1 + 2 s) maps the training sigmas 1/1000 .. 1 (sigma_min = shifted 0.001), 50
    steps are linspace(1, sigma_min) shifted again: t0 = 1000, t1 = 1000 x shift(1 - (1 - sigma_min) / 49)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from audit.models import SD3

    def shift(s):
        return 3 * s / (1 + 2 * s)

    sch = SD3.scheduler({"shift": 3.0}, 50)
    assert type(sch) is FlowMatchEulerDiscreteScheduler
    s1 = 1 - (1 - shift(0.001)) / 49
    assert float(sch.timesteps[0]) == 1000 and float(sch.timesteps[1]) == pytest.approx(1000 * shift(s1), rel=1e-6)


# ---------------------------------------------------------------- PixArt

def test_pixart_micro_conditions_are_for_1024_px_models_only(family_models):
    """PixArtAlphaPipeline adds resolution and aspect ratio when the transformer's sample_size is 128 (1024 px): a
    512 px model (sample_size 64) and a 2048 px one (256) get none."""
    pixart = family_models["pixart"]
    from dataclasses import replace

    tokens = pixart.adapter.tokenize(pixart, PROMPTS[:2])
    for size in (64, 256):
        other = replace(pixart, unet=SimpleNamespace(config=SimpleNamespace(sample_size=size)))
        with torch.no_grad():
            assert pixart.adapter.encode(other, tokens).added == {}, size


def test_a_loaded_pixart_model_takes_memaudit_jsons_layers(tmp_path, family_folders):
    pixart_dir = family_folders["pixart"]
    import shutil

    root = shutil.copytree(pixart_dir, tmp_path / "m")
    (root / "memaudit.json").write_text(json.dumps({"default_layers": ["transformer_blocks.0.attn2"]}))
    assert load_model(str(root), "cpu", "float32").default_layers == ["transformer_blocks.0.attn2"]


def test_pixart_scheduler_is_the_folders_class(family_models):
    """The folder's DPMSolverMultistepScheduler (the pipeline's), not DDIM built from its config."""
    pixart = family_models["pixart"]
    sch = pixart.adapter.scheduler(pixart.scheduler_config, 50)
    assert type(sch).__name__ == "DPMSolverMultistepScheduler"


def test_pixart_encode_runs_the_text_encoder_it_is_given_with_the_mask(family_models):
    pixart = family_models["pixart"]
    tokens = pixart.adapter.tokenize(pixart, PROMPTS)
    wrapper = _Recording(pixart.text_encoder)
    with torch.no_grad():
        ours = pixart.adapter.encode(pixart, tokens, text_encoder=wrapper)
        plain = pixart.adapter.encode(pixart, tokens)
    assert wrapper.calls == [((3, 120), ["attention_mask"])]
    torch.testing.assert_close(ours.embeddings, plain.embeddings, rtol=0, atol=0)



class _SlowTokenizer:
    """A tokenizer without a fast backend (no offsets): the T5 tokenizer's ids through its own call."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok
        self.pad_token_id, self.eos_token_id, self.model_max_length = tok.pad_token_id, tok.eos_token_id, 120

    def __call__(self, texts, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self.tok(texts, **kwargs)


def test_pixart_prompts_that_lower_casing_or_stripping_moves_have_no_spans_without_a_fast_tokenizer(family_models):
    """Spans are mapped back to the prompt only when the tokenizer gave some: with a slow tokenizer a prompt with
    spaces around it (or an "İ") is tokenized, with the fast tokenizer's ids, and has no spans."""
    pixart = family_models["pixart"]
    from dataclasses import replace

    slow = replace(pixart, tokenizer=_SlowTokenizer(pixart.tokenizer))
    prompts = ["  A RED Cat ", "İ dog"]
    tokens = pixart.adapter.tokenize(slow, prompts)
    assert not tokens.has_spans and tokens.offset_mapping() is None
    # and with the fast tokenizer the mapped spans keep EOS and padding empty, (0, 0)
    fast = pixart.adapter.tokenize(pixart, prompts).offset_mapping()
    n = pixart.adapter.tokenize(pixart, prompts).n_kept
    for i in range(len(prompts)):
        assert (fast[i, n[i] - 1:] == 0).all() and (fast[i, : n[i] - 1, 1] > 0).all(), fast[i, : n[i] + 1]
    np.testing.assert_array_equal(tokens.input_ids, pixart.adapter.tokenize(pixart, prompts).input_ids)

# ---------------------------------------------------------------- the lab build's criteria

def _lab_criteria(monkeypatch, bos=(0.6, 0.1), n_memorized=3, n_ordinary=5):
    """measure_criteria on 5 held-out captions (the first memorized) and planted rows making ``n_memorized`` and
    ``n_ordinary`` rows in all, with the text-encoder, probe, adherence and attention measurements replaced by
    recording stand-ins (BOS mass ``bos`` in two layers). Returns (criteria, rows, what the stand-ins were given)."""
    import audit.lab.adherence as adherence
    import audit.lab.encoder as encoder
    import audit.lab.regime as regime
    from audit.lab.build import measure_criteria
    from audit.lab.data import STREAM_HELDOUT, DataConfig, fresh_pairs
    from audit.lab.groundtruth import N_HELDOUT
    from audit.lab import LAB_MODEL_DIR

    cfg = DataConfig()
    held = fresh_pairs(cfg, N_HELDOUT * 2, STREAM_HELDOUT)[1][:5]
    seen = {}
    monkeypatch.setattr(encoder, "position_report", lambda tok, te, caps: seen.setdefault("position", list(caps)) and {})
    monkeypatch.setattr(adherence, "probe_references", lambda *a, **k: {})
    monkeypatch.setattr(adherence, "adheres", lambda images, caps: images.reshape(len(images), -1)[:, 0] > 0.5)
    layers = {"a": {"bos": bos[0]}, "b": {"bos": bos[1]}}

    def fake_regime(*a, **k):
        seen["regime"] = k
        return {"t0": 981, "layers": layers}

    monkeypatch.setattr(regime, "attention_regime", fake_regime)

    def row(group, memorized, prompt, duplication=0, image_duplication=0, split="validation"):
        return {"prompt": prompt, "group": group, "tier": -1 if group == "heldout" else 0,
                "kind": "" if group == "heldout" else "fixed", "memorized": memorized, "duplication": duplication,
                "image_duplication": image_duplication, "distance": 0.5, "nearest_is_own": False, "rep_w1": 0,
                "rep_w7_5": 0, "split": split}

    rows = [row("heldout", k == 0, c, split="validation" if k < 3 else "test") for k, c in enumerate(held)]
    for r, rep, dist in zip(rows, [2, 0, 3, 1, 2], [0.1, 0.2, 0.9, 0.3, 0.4]):
        r["rep_w7_5"], r["distance"] = rep, dist
    mem_left, ord_left = n_memorized - 1, n_ordinary - 4
    rows += [row("planted", True, f"m{k}", duplication=2, image_duplication=6, split="test") for k in range(mem_left)]
    rows += [row("planted", False, f"o{k}", duplication=4, image_duplication=6) for k in range(ord_left)]
    images = np.zeros((len(rows), 2, 4, 3, 16, 16), np.float32)
    images[:5, 1] = 1.0  # every held-out generation adheres at w = 7.5
    model = SimpleNamespace(scheduler_config=json.loads((LAB_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text()),
                            tokenizer=None, text_encoder=None, unet=None, extra={})
    return measure_criteria(model, rows, images, cfg, log=lambda m: None), rows, seen


def test_lab_criteria_count_targets_and_bos_sink_at_their_boundaries(monkeypatch):
    """40 memorized and 400 ordinary prompts meet "at least 40" and "at least 400"; 39 and 399 do not; a BOS mass of
    exactly 0.5 does not meet "more than 0.5", 0.5001 does."""
    crit, _, _ = _lab_criteria(monkeypatch, bos=(0.5, 0.1), n_memorized=40, n_ordinary=400)
    assert crit["checks"]["memorized_ge_40"] is True and crit["checks"]["not_memorized_ge_400"] is True
    assert crit["checks"]["bos_mass_gt_0_5_in_some_layer"] is False
    assert crit["counts"]["memorized"] == 40 and crit["counts"]["not_memorized"] == 400
    crit, _, _ = _lab_criteria(monkeypatch, bos=(0.1, 0.5001), n_memorized=39, n_ordinary=399)
    assert crit["checks"]["memorized_ge_40"] is False and crit["checks"]["not_memorized_ge_400"] is False
    assert crit["checks"]["bos_mass_gt_0_5_in_some_layer"] is True


def test_lab_criteria_counts_by_split_duplication_means_and_the_schedules_alpha_bar(monkeypatch):
    """Hand counts on 5 held-out rows (3 validation, 2 test, the first memorized) and planted rows (2 memorized on
    test, 3 ordinary on validation); alpha_bar at t0 = 981 from SD v1's scaled-linear betas, by numpy."""
    crit, rows, seen = _lab_criteria(monkeypatch, n_memorized=3, n_ordinary=7)
    assert crit["counts"]["by_split"] == {"validation": {"memorized": 1, "not_memorized": 5},
                                          "test": {"memorized": 2, "not_memorized": 2}}
    planted = next(r for r in crit["replication"] if r["group"] == "planted")
    assert planted["n_prompts"] == 5 and planted["n_memorized"] == 2
    assert planted["caption_duplication_mean"] == pytest.approx((2 * 2 + 3 * 4) / 5)
    assert planted["image_duplication_mean"] == 6.0
    heldout = next(r for r in crit["replication"] if r["group"] == "heldout")
    assert heldout["rep_w7_5_ge2"] == 3  # rep_w7_5 of 2, 3 and 2 (at least 2 of 4 seeds)
    assert heldout["median_distance"] == pytest.approx(0.3)  # of 0.1, 0.2, 0.9, 0.3, 0.4 (their mean is 0.38)
    bar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    assert crit["schedule"]["first_timestep"] == 981
    assert crit["schedule"]["alpha_bar_t0"] == pytest.approx(bar[981], rel=1e-5)
    # every held-out caption goes to the text-encoder report; the regime is measured unmasked for a model that
    # declares no UNet mask
    assert seen["position"] == [r["prompt"] for r in rows[:5]]
    assert seen["regime"]["mask_padding"] is False
    assert [r["adheres_w7_5"] for r in rows[:5]] == [4] * 5 and [r["adheres_w1"] for r in rows[:5]] == [0] * 5
    assert {r["adheres_w7_5"] for r in rows[5:]} == {-1}


# ---------------------------------------------------------------- audit.text.visible: the ranges' ends

# each range of visible()'s escaped characters, its first and last character escaped (as written out here) and
# its neighbours outside kept
ESCAPED_ENDS = {
    "\x00": r"\x00", "\x08": r"\x08", "\x0b": r"\x0b", "\x1f": r"\x1f", "\x7f": r"\x7f", "\x9f": r"\x9f",
    "\u061c": r"\u061c", "\u200b": r"\u200b", "\u200e": r"\u200e", "\u200f": r"\u200f", "\u2028": r"\u2028",
    "\u2029": r"\u2029", "\u202a": r"\u202a", "\u202e": r"\u202e", "\u2060": r"\u2060", "\u2064": r"\u2064",
    "\u2066": r"\u2066", "\u206f": r"\u206f", "\ufeff": r"\ufeff", "\ufff9": r"\ufff9", "\ufffb": r"\ufffb",
    "\U000e0000": r"\U000e0000", "\U000e007f": r"\U000e007f",
}
KEPT_NEIGHBOURS = [" ", "~", "\xa0", "\u061b", "\u200a", "\u200c", "\u200d", "\u2027", "\u202f", "\u205f",
                   "\u2065", "\ufefe", "\ufff8", "\ufffc", "\U000e0080"]


@pytest.mark.parametrize("one_line", [False, True])
def test_visible_escapes_both_ends_of_every_range_and_keeps_their_neighbours(one_line):
    from audit.text import visible

    for char, escape in ESCAPED_ENDS.items():
        assert visible(f"a{char}b", one_line=one_line) == f"a{escape}b", hex(ord(char))
    for char in KEPT_NEIGHBOURS:
        assert visible(f"a{char}b", one_line=one_line) == f"a{char}b", hex(ord(char))
    assert visible("a\tb\nc", one_line=one_line) == ("a\\tb\\nc" if one_line else "a\tb\nc")


def test_visible_escapes_a_second_variation_selector_of_either_range_and_keeps_cjk_variants_at_the_blocks_ends():
    """A selector after a selector is escaped (U+FE00 and U+FE0F, U+E0100 and U+E01EF); one after a character is kept
    (U+FE00 after "a", an ideographic variant after the first and last ideograph of each CJK block), and a
    supplementary selector after the character just outside a block is escaped (U+4DC0, a Yijing hexagram; U+A000,
    Yi; U+FB00, a Latin ligature; U+31350, past extension G)."""
    from audit.text import visible

    assert visible("a\ufe00\ufe00b") == "a\ufe00\\ufe00b"
    assert visible("\u2764\ufe0f\ufe0f") == "\u2764\ufe0f\\ufe0f"
    assert visible("a\ufe00") == "a\ufe00"
    vs17, vs256 = "\U000e0100", "\U000e01ef"
    assert visible("\u845b" + vs17 + vs256) == "\u845b" + vs17 + "\\U000e01ef"
    for ideograph in ("\u3400", "\u4dbf", "\u4e00", "\u9fff", "\uf900", "\ufaff", "\U00020000", "\U0003134f"):
        assert visible(ideograph + vs256) == ideograph + vs256, hex(ord(ideograph))
    for other in ("\u4dc0", "\ua000", "\ufb00", "\U00031350", "\u33ff"):
        assert visible(other + vs17) == other + "\\U000e0100", hex(ord(other))


def test_picture_rows_take_one_of_each_kind_at_one_per_tier_and_six_memorized_ordinary_prompts():
    from audit.lab.build import picture_rows

    rows = [{"group": "planted", "tier": 0, "kind": k, "memorized": True} for k in ("fixed", "fixed", "varied")]
    rows += [{"group": "seen_once", "tier": -1, "kind": "", "memorized": True} for _ in range(7)]
    assert picture_rows(rows, per_tier=1, n_heldout=0) == [0, 2, 3, 4, 5, 6, 7, 8]  # 1 fixed, 1 varied, 6 of 7


def test_write_prompts_keeps_every_replication_column_and_an_int64_row_index(tmp_path):
    import polars as pl

    from audit.lab.build import write_prompts

    cols = ["prompt", "memorized", "similarity", "distance", "duplication", "image_duplication", "split", "group",
            "tier", "kind", "planted_index", "caption_index", "train_step", "nearest_source", "nearest_is_own",
            "adheres_w7_5", "adheres_w1"]
    rows = [dict({c: 0 for c in cols}, prompt=f"p{i}", rep_w7_5=i, rep_w1=2 * i) for i in range(3)]
    write_prompts(rows, tmp_path / "t.parquet")
    t = pl.read_parquet(tmp_path / "t.parquet")
    assert t.columns == ["row"] + cols + ["rep_w1", "rep_w7_5"]
    assert t.schema["row"] == pl.Int64 and t["row"].to_list() == [0, 1, 2] and t["rep_w1"].to_list() == [0, 2, 4]


def test_clip_tokenizer_pads_to_sd_v1s_77_by_default():
    """model_max_length defaults to SD v1's L = 77: BOS, "cat", EOS, then 74 EOS paddings."""
    from audit.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(["cat"])
    assert tok.model_max_length == 77
    ids = tok("cat", padding="max_length", truncation=True).input_ids
    assert ids == [0, tok.get_vocab()["cat</w>"]] + [1] * 75
