"""Family adapters' documented conventions: SD 2.x detection, SD 1.x's default-layer rule and load checks,
SDXL's time_ids, empty prompt and width check, PixArt's preprocessing (and its token spans in the prompt as
given), Sigma's length and micro-conditions, SD 3.x's T5 and scheduler rules. Tiny seeded models (the builders
of test_families), CPU only."""

from __future__ import annotations

from dataclasses import replace
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from audit.errors import ModelError
from audit.models import load_model


def _edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from test_families import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    from test_families import build_pixart

    return build_pixart(tmp_path_factory.mktemp("pixart") / "model")


# ---------------------------------------------------------------- SD 2.x detection (config files only)

def _sd_folder(root, unet=None, tokenizer_config=None, special_tokens_map=None):
    for sub in ("unet", "tokenizer"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "unet" / "config.json").write_text(json.dumps(unet or {}))
    if tokenizer_config is not None:
        (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if special_tokens_map is not None:
        (root / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return root


def test_sd2_is_told_by_linear_projection_or_by_the_bang_pad_token_each_alone(tmp_path):
    """Either sign alone makes a StableDiffusionPipeline folder SD 2.x (the module docstring's rule), the pad token
    also when special_tokens_map.json writes it as an AddedToken object; neither: SD 1.x."""
    from audit.models import SD2

    eos = "<|endoftext|>"
    cases = {
        "linear_only": (dict(unet={"use_linear_projection": True}, tokenizer_config={"pad_token": eos}), True),
        "pad_only": (dict(unet={"use_linear_projection": False}, tokenizer_config={"pad_token": "!"}), True),
        "pad_object": (dict(unet={}, special_tokens_map={"pad_token": {"content": "!", "lstrip": False}}), True),
        "neither": (dict(unet={"use_linear_projection": False}, tokenizer_config={"pad_token": eos}), False),
    }
    for name, (kw, expected) in cases.items():
        assert SD2.matches(_sd_folder(tmp_path / name, **kw)) is expected, name


# ---------------------------------------------------------------- SD 1.x default layer and load checks

class _Listed:
    """An adapter whose 'UNet' is the list of its cross-attention layer paths (the rule alone, no diffusers)."""


@pytest.mark.parametrize("family", ["sd1", "pixart", "sd3"])
def test_default_layer_is_the_4th_in_call_order_or_the_last_when_fewer(family):
    from audit.models import FAMILIES

    adapter = FAMILIES[family]
    fake = type("Fake", (type(adapter),), {"cross_attention_layers": lambda self, unet: list(unet)})()
    for n, expected in ((1, "l0"), (2, "l1"), (3, "l2"), (4, "l3"), (6, "l3")):
        assert fake.default_layers([f"l{i}" for i in range(n)]) == [expected], (family, n)
    with pytest.raises(ModelError):
        fake.default_layers([])


def test_layer_note_says_validated_only_for_exactly_the_papers_layer():
    from audit.models import SD1, SD1_DEFAULT_LAYER

    assert "validated there" in SD1.layer_note([SD1_DEFAULT_LAYER])
    assert "not validated" in SD1.layer_note([SD1_DEFAULT_LAYER, "up_blocks.1.attentions.0.transformer_blocks.0.attn2"])


def test_an_sd1_folder_whose_unet_needs_class_labels_is_refused_before_loading(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    _edit_json(model / "unet" / "config.json", class_embed_type="timestep")
    with pytest.raises(ModelError, match=r"the UNet needs extra conditioning \(class_embed_type 'timestep'\)"):
        load_model(str(model), "cpu", "float32")


def test_sd1_text_encoder_gets_the_mask_when_its_config_uses_one(tiny_model):
    """StableDiffusionPipeline.encode_prompt passes the tokenizer's mask when the text encoder's config sets
    use_attention_mask; CLIP's padding positions then attend to fewer keys, so their states change."""
    from audit.models import SD1

    tokens = SD1.tokenize(tiny_model, ["a red cat", "a photo of a dog on the beach"])
    ids, mask = torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)
    config = tiny_model.text_encoder.config
    config.use_attention_mask = True
    try:
        with torch.no_grad():
            ours = SD1.encode(tiny_model, tokens)
            with_mask = tiny_model.text_encoder(ids, attention_mask=mask)[0]
            without = tiny_model.text_encoder(ids)[0]
        with pytest.raises(ModelError, match="uses an attention mask"):
            SD1.encode(tiny_model, tokens.input_ids)  # bare ids carry no mask
    finally:
        del config.use_attention_mask
    assert not torch.equal(with_mask, without)  # the test can tell the two apart
    torch.testing.assert_close(ours, with_mask, rtol=0, atol=0)


def test_sd1_encode_calls_the_text_encoder_it_is_given(tiny_model):
    """``text_encoder`` (a compiled wrapper of model.text_encoder) is the module that runs."""
    from audit.models import SD1

    tokens = SD1.tokenize(tiny_model, ["a red cat"])
    calls = []

    def wrapper(ids, **kwargs):
        calls.append(ids.shape)
        return (torch.full((1, 77, 4), 7.0),)

    out = SD1.encode(tiny_model, tokens, text_encoder=wrapper)
    assert calls == [(1, 77)] and torch.equal(out, torch.full((1, 77, 4), 7.0))


# ---------------------------------------------------------------- SDXL

def test_sdxl_time_ids_use_the_vae_scale_factor_of_the_folder(tmp_path, sdxl_dir):
    """H = W = sample_size x 2 ** (len(vae block_out_channels) - 1): a 3-level VAE scales 8 latents by 4 = 32."""
    model = shutil.copytree(sdxl_dir, tmp_path / "m")
    (model / "vae").mkdir()
    (model / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64, 64]}))
    m = load_model(str(model), "cpu", "float32")
    assert m.family["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]


def test_sdxl_unconditional_is_the_encoded_empty_prompt_without_force_zeros(tmp_path, sdxl_dir):
    model = shutil.copytree(sdxl_dir, tmp_path / "m")
    _edit_json(model / "model_index.json", force_zeros_for_empty_prompt=False)
    m = load_model(str(model), "cpu", "float32")
    empty = m.adapter.tokenize(m, [""])
    with torch.no_grad():
        uncond = m.adapter.unconditional(m, empty)
        encoded = m.adapter.encode(m, empty)
    assert uncond.embeddings.abs().sum() > 0
    torch.testing.assert_close(uncond.embeddings, encoded.embeddings, rtol=0, atol=0)
    torch.testing.assert_close(uncond.added["text_embeds"], encoded.added["text_embeds"], rtol=0, atol=0)


def test_sdxl_zeros_for_the_empty_prompt_keep_the_time_ids(sdxl_dir):
    m = load_model(str(sdxl_dir), "cpu", "float32")
    with torch.no_grad():
        uncond = m.adapter.unconditional(m, m.adapter.tokenize(m, [""]))
    assert (uncond.embeddings == 0).all() and (uncond.added["text_embeds"] == 0).all()
    assert uncond.added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]  # 8 latents x 8


def test_sdxl_unet_whose_added_embedding_does_not_take_6_time_ids_is_refused(tmp_path, sdxl_dir):
    """6 x addition_time_embed_dim (7 here) + the pooled width 16 = 58, but the UNet's add_embedding takes 64."""
    model = shutil.copytree(sdxl_dir, tmp_path / "m")
    _edit_json(model / "unet" / "config.json", addition_time_embed_dim=7)
    with pytest.raises(ModelError, match=r"added embedding takes 64 features, but 6 time ids x 7 \+ a pooled width "
                                         r"of 16 make 58"):
        load_model(str(model), "cpu", "float32")


# ---------------------------------------------------------------- PixArt

def test_pixart_prompts_are_lower_cased_and_stripped_as_the_pipeline_does(pixart_dir):
    m = load_model(str(pixart_dir), "cpu", "float32")
    ours = m.adapter.tokenize(m, ["  A RED Cat ", "a red cat"])
    ref = m.tokenizer(["a red cat"], padding="max_length", max_length=120, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ours.input_ids[0], ref["input_ids"][0])
    np.testing.assert_array_equal(ours.input_ids[1], ref["input_ids"][0])
    # spans index the prompt as given (leading spaces skipped): "RED" and "Cat"
    n = int(ours.n_kept[0]) - 1
    spans = ours.spans(np.arange(n)[None])[0]
    words = ["  A RED Cat "[a:b].strip() for a, b in spans if b > a]
    assert words[-2:] == ["RED", "Cat"], words


def test_pixart_spans_skip_leading_spaces_when_lower_casing_changes_the_length(pixart_dir):
    m = load_model(str(pixart_dir), "cpu", "float32")
    prompt = "   İ red cat"
    tokens = m.adapter.tokenize(m, [prompt])
    n = int(tokens.n_kept[0]) - 1
    spans = tokens.spans(np.arange(n)[None])[0]
    words = [prompt[a:b].strip() for a, b in spans if b > a]
    assert words[-2:] == ["red", "cat"], (spans, words)


def test_pixart_sigma_folder_tokenizes_to_300(tmp_path, pixart_dir):
    model = shutil.copytree(pixart_dir, tmp_path / "m")
    _edit_json(model / "model_index.json", _class_name="PixArtSigmaPipeline")
    m = load_model(str(model), "cpu", "float32")
    assert m.max_length == 300
    assert m.adapter.tokenize(m, ["a red cat"]).input_ids.shape == (1, 300)


def test_pixart_1024_models_get_the_resolution_micro_conditions(pixart_dir):
    m = load_model(str(pixart_dir), "cpu", "float32")
    big = replace(m, unet=SimpleNamespace(config=SimpleNamespace(sample_size=128)))
    with torch.no_grad():
        cond = m.adapter.encode(big, m.adapter.tokenize(m, ["a red cat", "dog"]))
    assert cond.added["resolution"].tolist() == [[1024.0, 1024.0]] * 2
    assert cond.added["aspect_ratio"].tolist() == [[1.0]] * 2
    with torch.no_grad():
        assert m.adapter.encode(m, m.adapter.tokenize(m, ["a red cat"])).added == {}  # 256 px: none
    with pytest.raises(ModelError, match="PixArt needs the tokenizer's attention mask"):
        m.adapter.encode(m, m.adapter.tokenize(m, ["a red cat"]).input_ids)


# ---------------------------------------------------------------- SD 3.x

def _index(root, **parts):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", **parts}))
    return root


def test_sd3_t5_presence_rules(tmp_path):
    """No T5 when model_index.json sets text_encoder_3/tokenizer_3 to [null, null] and neither folder is there;
    refused when model_index declares T5 but both folders are gone."""
    from audit.models.sd3 import SD3Adapter

    dropped = _index(tmp_path / "dropped", text_encoder_3=[None, None], tokenizer_3=[None, None])
    assert SD3Adapter._has_t5("m", dropped) is False
    gone = _index(tmp_path / "gone", text_encoder_3=["transformers", "T5EncoderModel"],
                  tokenizer_3=["transformers", "T5TokenizerFast"])
    with pytest.raises(ModelError, match="T5 is declared in model_index.json but text_encoder_3/ and tokenizer_3/ is "
                                         "missing"):
        SD3Adapter._has_t5("m", gone)
    both = _index(tmp_path / "both", text_encoder_3=["transformers", "T5EncoderModel"])
    (both / "text_encoder_3").mkdir()
    (both / "tokenizer_3").mkdir()
    assert SD3Adapter._has_t5("m", both) is True


def test_sd3_dynamic_shifting_is_refused():
    from audit.models import SD3

    with pytest.raises(ModelError, match="without dynamic shifting"):
        SD3.scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, 50)
    assert float(SD3.scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, 50).timesteps[0]) == 1000



def test_sdxl_unet_without_text_time_embedding_is_refused_in_one_line(tmp_path, sdxl_dir):
    model = shutil.copytree(sdxl_dir, tmp_path / "m")
    _edit_json(model / "unet" / "config.json", addition_embed_type=None)
    with pytest.raises(ModelError, match="an SDXL UNet must have addition_embed_type 'text_time', not None"):
        load_model(str(model), "cpu", "float32")


@pytest.mark.parametrize("prompt", ["İ red cat ", "İİ red cat  "])
def test_pixart_spans_index_the_prompt_when_strip_and_lower_casing_offset_each_other(pixart_dir, prompt):
    """"İ red cat " is 10 characters and so is its lower-cased, stripped text "i̇ red cat": a length check took them
    for aligned, and the spans of "red" and "cat" read "ed " and "at " in the prompt as given."""
    assert len(prompt) == len(prompt.lower().strip())  # the case: the lengths agree, the texts do not
    pixart = load_model(str(pixart_dir), "cpu", "float32")
    tokens = pixart.adapter.tokenize(pixart, [prompt])
    n = int(tokens.n_kept[0]) - 1  # the prompt's tokens, EOS left out
    spans = tokens.spans(np.arange(n)[None])[0]
    words = [prompt[a:b].strip() for a, b in spans if b > a]
    assert words[-2:] == ["red", "cat"], (spans.tolist(), words)
