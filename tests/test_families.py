"""Model families (issue 13): tiny seeded SD 2.x (Euler + v, DDIM + epsilon), SDXL and PixArt-alpha models
built from configs as diffusers' own tests build them (``get_dummy_components``) and saved with the
pipelines' ``save_pretrained``; each one runs end to end with both scorers, scores a prompt alone as in a
batch, captures the softmax of its layer's q/k, exits early with the full forward's values, encodes
exactly as its diffusers pipeline does, and lists its layers. Unsupported and broken folders stop with
exit 2 before anything is scored."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from helpers import run_audit

from audit.capture import CrossAttentionCapture
from audit.models import detect_family, load_model, read_identity
from audit.models.base import Conditioning
from audit.scorers import ScoreConfig, Scorer, attention_entropy
from audit.tiny import SD1_SCHEDULER_CONFIG, TINY_WORDS, clip_text_encoder

PROMPTS = ["a red cat on the beach", "portrait of an old man!!", "a city street at night", "blue boat on a lake"]
FAMILIES = ["sd2_v_euler", "sd2_eps_ddim", "sdxl", "pixart", "sd3"]
NOISE_SCORED = [f for f in FAMILIES if f != "sd3"]  # SD 3.x (flow matching) refuses the noise scorers


def _clip_tokenizer(pad: str | None = None):
    from audit.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(TINY_WORDS)
    if pad:
        tok.pad_token = pad  # SD 2.x and SDXL's tokenizer_2 pad with "!"
    return tok


def build_sd2(root, prediction_type: str, scheduler: str):
    """SD 2.x layout: per-block heads, linear projections, upcast attention, pad "!" (diffusers'
    tests/pipelines/stable_diffusion_2/test_stable_diffusion.py get_dummy_components, smaller)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = _clip_tokenizer(pad="!")
    te = clip_text_encoder(tok, hidden_size=32, seed=0)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        upcast_attention=True, down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    if scheduler == "euler":  # stabilityai/stable-diffusion-2 scheduler_config.json
        sch = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     prediction_type=prediction_type, steps_offset=1)
    else:  # stabilityai/stable-diffusion-2-1
        sch = DDIMScheduler.from_config(dict(SD1_SCHEDULER_CONFIG, prediction_type=prediction_type))
    pipe = StableDiffusionPipeline(vae=None, text_encoder=te, tokenizer=tok, unet=unet.eval(), scheduler=sch,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def build_sdxl(root):
    """SDXL layout (diffusers' tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok, tok2 = _clip_tokenizer(), _clip_tokenizer(pad="!")
    te = clip_text_encoder(tok, hidden_size=32, seed=0, num_layers=3)
    torch.manual_seed(2)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok2), hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=16, bos_token_id=tok2.bos_token_id,
        eos_token_id=tok2.eos_token_id, pad_token_id=tok2.pad_token_id)).eval()
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=64).eval()
    sch = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sch)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def t5_tokenizer():
    """A T5 (Unigram, sentencepiece-convention) tokenizer over TINY_WORDS: <pad> 0, </s> 1, <unk> 2, no BOS."""
    from transformers import T5Tokenizer

    letters = sorted({c for w in TINY_WORDS for c in w} | set("!?,."))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -2.0) for w in TINY_WORDS] + [(c, -5.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_pixart(root):
    """PixArt-alpha layout (diffusers' tests/pipelines/pixart_alpha/test_pixart.py), 5 blocks, learned sigma."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = t5_tokenizer()
    torch.manual_seed(4)
    te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    torch.manual_seed(5)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=5, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=None, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def build_sd3(root):
    """SD 3.x layout (diffusers' tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py), 4 blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    encoders = []
    for seed, tok in ((6, _clip_tokenizer()), (7, _clip_tokenizer(pad="!"))):
        torch.manual_seed(seed)
        encoders.append((tok, CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()))
    tok3 = t5_tokenizer()
    torch.manual_seed(8)
    te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    torch.manual_seed(9)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=encoders[0][1], tokenizer=encoders[0][0],
                                    text_encoder_2=encoders[1][1], tokenizer_2=encoders[1][0], text_encoder_3=te3,
                                    tokenizer_3=tok3)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


BUILDERS = {
    "sd2_v_euler": lambda root: build_sd2(root, "v_prediction", "euler"),
    "sd2_eps_ddim": lambda root: build_sd2(root, "epsilon", "ddim"),
    "sdxl": build_sdxl,
    "pixart": build_pixart,
    "sd3": build_sd3,
}
EXPECTED = {  # family, default layer, prediction type, t0
    "sd2_v_euler": ("sd2", "down_blocks.1.attentions.1.transformer_blocks.0.attn2", "v_prediction", 999),
    "sd2_eps_ddim": ("sd2", "down_blocks.1.attentions.1.transformer_blocks.0.attn2", "epsilon", 981),
    "sdxl": ("sdxl", "down_blocks.1.attentions.1.transformer_blocks.1.attn2", "epsilon", 981),
    "pixart": ("pixart", "transformer_blocks.3.attn2", "epsilon", 999),
    "sd3": ("sd3", "transformer_blocks.3.attn", "flow_velocity", 1000),
}


@pytest.fixture(scope="module")
def folders(family_folders):  # conftest's, shared with test_families_text_mutants
    return family_folders


@pytest.fixture(scope="module")
def models(family_models):
    return family_models


def _scorer(model, scorer="attention_entropy", layers=None):
    return Scorer(model, ScoreConfig(scorer, tuple(layers or model.default_layers)))


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_detected_with_its_default_layer_prediction_type_and_t0(kind, folders, models):
    family, layer, prediction, t0 = EXPECTED[kind]
    model = models[kind]
    assert model.adapter.name == family and detect_family(folders[kind])[0] is model.adapter
    assert model.default_layers == [layer]
    assert model.adapter.prediction_type(model) == prediction
    assert "not validated" in model.adapter.default_layer_note
    ident = read_identity(str(folders[kind]))  # what the Ray driver reads: no weights
    assert ident.family == family and ident.fingerprint == model.fingerprint
    assert ident.adapter.default_layers_from_config(ident.path, ident.extra) == [layer]
    # the layers `run --dry-run` checks --layers against, from the config alone: the loaded denoiser's
    assert ident.adapter.layers_from_config(ident.path) == model.adapter.cross_attention_layers(model.unet)
    assert int(ident.adapter.scheduler(ident.scheduler_config, 50).timesteps[0]) == t0 == _scorer(model).first_timestep


@pytest.mark.parametrize("kind", FAMILIES)
def test_memaudit_run_end_to_end_with_both_scorers(kind, folders, tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    for scorer in ("attention_entropy", "noise_magnitude") if kind in NOISE_SCORED else ("attention_entropy",):
        out, manifest = run_audit([src], folders[kind], tmp_path / scorer, scorer=scorer, batch_size=2,
                                  device="cpu", dtype="float32")
        risk = pq.read_table(out / "risk.parquet").to_pandas()
        assert manifest["counts"]["scored"] == len(PROMPTS) == len(risk), manifest["counts"]
        assert (risk["attn_entropy"] > 0.1).all() and np.isfinite(risk["attn_entropy"]).all()
        if scorer == "noise_magnitude":
            assert (risk["noise_magnitude"] > 1e-3).all() and np.isfinite(risk["noise_magnitude"]).all()
            np.testing.assert_array_equal(risk["risk"], risk["noise_magnitude"])
        if kind == "pixart":  # T5: no BOS
            assert risk["bos_mass"].isna().all()
        else:
            assert ((risk["bos_mass"] > 0) & (risk["bos_mass"] < 1)).all()


@pytest.mark.parametrize("kind", FAMILIES)
def test_scores_alone_equal_scores_in_a_batch(kind, models):
    for name in ("attention_entropy", "noise_magnitude") if kind in NOISE_SCORED else ("attention_entropy",):
        s = _scorer(models[kind], name)
        batch = s.score(PROMPTS)
        for i, p in enumerate(PROMPTS):
            alone = s.score([p])
            # float32 kernels round differently per batch shape (~1e-7 relative; memaudit run pads every batch
            # to one shape, so there the scores are bit-identical)
            np.testing.assert_allclose(alone["attn_entropy"][0], batch["attn_entropy"][i], rtol=1e-6, atol=1e-7)
            if name == "noise_magnitude":
                np.testing.assert_allclose(alone["noise_magnitude"][0], batch["noise_magnitude"][i], rtol=1e-5)
            np.testing.assert_allclose(alone["token_mass"][0], batch["token_mass"][i], rtol=0, atol=1e-6)


def _hand_softmax(model, layer, prompts, scorer):
    """a [B, L] recomputed from the layer's inputs: q = to_q(h), k = to_k(c), softmax(q k^T * scale + mask)."""
    attn = model.unet.get_submodule(layer)
    seen = {}

    def pre(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["c"] = kwargs["encoder_hidden_states"]
        seen["mask"] = kwargs.get("attention_mask")

    handle = attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        res = scorer.score(prompts)
    finally:
        handle.remove()
    h, c, mask = seen["h"], seen["c"], seen["mask"]
    b, heads = h.shape[0], attn.heads
    q = attn.to_q(h).view(b, -1, heads, attn.to_q.out_features // heads).transpose(1, 2)
    if getattr(attn, "add_k_proj", None) is not None:  # joint attention (SD 3.x): the image -> text block,
        # renormalized over the text keys = softmax over the image-query x text-key logits
        k = attn.add_k_proj(c).view(b, -1, heads, attn.add_k_proj.out_features // heads).transpose(1, 2)
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_added_k(k) if attn.norm_added_k is not None else k
    else:
        k = attn.to_k(c).view(b, -1, heads, attn.to_k.out_features // heads).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) * attn.scale  # [B, H, N, L]
    if mask is not None:
        logits = logits + mask.view(b, 1, 1, -1)
    return res, logits.softmax(-1).mean(dim=(1, 2))


@pytest.mark.parametrize("kind", FAMILIES)
def test_capture_equals_a_softmax_recomputed_from_the_layers_q_and_k(kind, models):
    model = models[kind]
    s = _scorer(model)
    with torch.no_grad():
        res, a = _hand_softmax(model, model.default_layers[0], PROMPTS[:2], s)
    np.testing.assert_allclose(res["token_mass"], a.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(res["attn_entropy"], attention_entropy(a.double()).numpy(), rtol=0, atol=1e-6)
    tokens = s.adapter.tokenize(model, PROMPTS[:2])
    if kind == "pixart":  # masked padding gets exactly zero mass; E is over the attended positions
        assert (a.numpy()[tokens.attention_mask == 0] == 0).all()
        assert (a.numpy()[tokens.attention_mask == 1] > 0).all()


@pytest.mark.parametrize("kind", FAMILIES)
def test_early_exit_equals_the_full_forward(kind, models):
    model = models[kind]
    s = _scorer(model)
    layer = model.default_layers[0]
    res = s.score(PROMPTS[:2])
    tokens = s.adapter.tokenize(model, PROMPTS[:2])
    with torch.no_grad():
        cond = s.encode(tokens)
        with CrossAttentionCapture(model.unet, [layer], early_exit=False) as cap:
            full = cap.run(lambda: s.adapter.forward(model.unet, s.latents(PROMPTS[:2]), s._t0_device, cond))
    assert cap.output.shape == (2, 4, 8, 8)  # the whole forward ran (PixArt: the noise half of learned sigma)
    np.testing.assert_allclose(res["attn_entropy"], attention_entropy(full[layer].double()).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", FAMILIES)
def test_identity_without_weights_equals_the_loaded_models(kind, folders, models):
    """SD 2.x (v and epsilon), SDXL, PixArt, SD 3 (SD 1.x and the lab: ``test_resume``)."""
    from helpers import assert_identity_matches_loaded

    assert_identity_matches_loaded(folders[kind], models[kind])
    if kind in NOISE_SCORED:  # Wen's t0 is DDIM's from the folder's config (SDXL, PixArt: Euler, DPM-Solver)
        assert_identity_matches_loaded(folders[kind], models[kind], scorer="noise_magnitude")
    if kind.startswith("sd2"):  # guidance_geometry: published weights for SD 1.x and 2.x only
        assert_identity_matches_loaded(folders[kind], models[kind], scorer="guidance_geometry")


@pytest.mark.parametrize("kind", FAMILIES)
def test_memaudit_layers_lists_the_family_layers(kind, folders, models):
    from audit.cli import app

    res = CliRunner().invoke(app, ["layers", "--model", str(folders[kind])])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"family {EXPECTED[kind][0]}; default layer: ") and "not validated" in lines[0]
    layers = models[kind].adapter.cross_attention_layers(models[kind].unet)
    assert [ln.split()[1] for ln in lines[1:]] == layers
    assert [ln.split()[1] for ln in lines[1:] if ln.endswith("(default)")] == [EXPECTED[kind][1]]
    assert lines[4].endswith("(default)")  # the 4th in call order


def test_encodings_equal_the_diffusers_pipelines(folders, models):
    """Our conditioning is the pipeline's own encode_prompt output (and SDXL's zeros for the empty prompt)."""
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    with torch.no_grad():
        m = models["sd2_v_euler"]
        pipe = StableDiffusionPipeline.from_pretrained(folders["sd2_v_euler"], safety_checker=None, vae=None,
                                                       feature_extractor=None, image_encoder=None)
        ours = m.adapter.encode(m, m.adapter.tokenize(m, PROMPTS))
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

        m = models["sdxl"]
        pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"], vae=None, feature_extractor=None,
                                                         image_encoder=None)
        ours = m.adapter.encode(m, m.adapter.tokenize(m, PROMPTS))
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
        assert ours.embeddings.shape == (4, 77, 64) and ours.mask is None
        torch.testing.assert_close(ours.embeddings, emb, rtol=0, atol=0)
        torch.testing.assert_close(ours.added["text_embeds"], pooled, rtol=0, atol=0)
        assert ours.added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 4  # 8 latents x 8
        uncond = m.adapter.unconditional(m, m.adapter.tokenize(m, [""]))
        assert (uncond.embeddings == 0).all() and (uncond.added["text_embeds"] == 0).all() and neg.abs().sum() == 0

        m = models["pixart"]
        pipe = PixArtAlphaPipeline.from_pretrained(folders["pixart"], vae=None)
        ours = m.adapter.encode(m, m.adapter.tokenize(m, PROMPTS))
        emb, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                             clean_caption=False)
        torch.testing.assert_close(ours.embeddings, emb, rtol=0, atol=0)
        assert torch.equal(ours.mask, mask) and ours.embeddings.shape[1] == 120


def test_sd2_lengths_come_from_the_tokenizer_mask_not_the_pad_id(models):
    m = models["sd2_v_euler"]
    tok = m.tokenizer
    assert tok.pad_token == "!"
    tokens = m.adapter.tokenize(m, ["portrait of an old man!!"])
    ids = tok("portrait of an old man!!").input_ids
    assert tok.pad_token_id in ids  # "!!" holds the pad token's id: an id comparison would cut the prompt
    assert int(tokens.n_kept[0]) == len(ids) and tokens.attention_mask[0].sum() == len(ids)
    assert tokens.input_ids[0, : len(ids)].tolist() == ids


def test_declared_unet_mask_comes_from_the_adapter_conditioning(tmp_path, tiny_model_dir):
    """The lab's memaudit.json declaration: the UNet attends to BOS and the prompt tokens only."""
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "masked")
    (model_dir / "memaudit.json").write_text(json.dumps({"unet_encoder_attention_mask": "bos_and_prompt_tokens"}))
    m = load_model(str(model_dir), "cpu", "float32")
    s = _scorer(m)
    tokens = m.adapter.tokenize(m, PROMPTS[:2])
    cond = s.encode(tokens)
    assert isinstance(cond, Conditioning)
    kwargs = m.adapter.unet_kwargs(cond)
    n = tokens.n_kept
    expected = (np.arange(77)[None] < (n[:, None] - 1)).astype(np.int64)
    np.testing.assert_array_equal(kwargs["encoder_attention_mask"].numpy(), expected)
    res = s.score(PROMPTS[:2])
    assert (res["token_mass"][expected == 0] == 0).all() and (res["token_mass"][expected == 1] > 0).all()


def _cli_run(model, tmp_path):
    from audit.cli import app

    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    return CliRunner().invoke(app, ["run", str(src), "--model", str(model), "--out", str(tmp_path / "out"),
                                    "--device", "cpu"])


@pytest.mark.parametrize("case", ["unsupported", "flux", "refiner", "no_index", "missing_text_encoder_2",
                                  "flow_matching"])
def test_unsupported_or_broken_folders_stop_with_exit_2_before_scoring(case, folders, tmp_path):
    model = shutil.copytree(folders["pixart" if case == "flow_matching" else "sdxl"], tmp_path / "m")
    index = json.loads((model / "model_index.json").read_text())
    cls = {"unsupported": "KandinskyV22Pipeline", "flux": "FluxPipeline",
           "refiner": "StableDiffusionXLImg2ImgPipeline"}.get(case)
    if cls:
        (model / "model_index.json").write_text(json.dumps(index | {"_class_name": cls}))
    elif case == "no_index":
        (model / "model_index.json").unlink()
    elif case == "flow_matching":  # a flow-matching scheduler: the noise scorers' quantity is undefined there
        (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    else:
        shutil.rmtree(model / "text_encoder_2")
    res = _cli_run(model, tmp_path)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("memaudit: error: ")
    assert not (tmp_path / "out").exists()  # nothing was scored or written
    supported = "supported: StableDiffusionPipeline (sd1, sd2), StableDiffusionXLPipeline (sdxl), " \
                "PixArtAlphaPipeline (pixart), PixArtSigmaPipeline (pixart), StableDiffusion3Pipeline (sd3)"
    if cls:
        assert f"declares {cls}, which memaudit does not support" in lines[0] and lines[0].endswith(supported)
    if case == "flux":
        assert "guidance-distilled variants have no unconditional branch" in lines[0]
    if case == "refiner":
        assert "refiner" in lines[0]
    if case == "no_index":
        assert "no model_index.json" in lines[0] and lines[0].endswith(supported)
    if case == "flow_matching":
        assert "FlowMatchEulerDiscreteScheduler: a flow-matching schedule in a family memaudit scores on a DDPM" \
            in lines[0]
    if case == "missing_text_encoder_2":
        assert "a StableDiffusionXLPipeline folder missing text_encoder_2/" in lines[0]


def test_pixart_spans_index_the_prompt_when_lower_casing_changes_its_length(models):
    """PixArt tokenizes the lower-cased prompt, and the spans indexed it: after "İ" (two characters lower-cased)
    every trigger token's span read the wrong text ("red" read "cat")."""
    import numpy as np

    model = models["pixart"]
    prompts = ["İİİİ red cat", "red cat", "ΣΑΣ İ dog"]
    tokens = model.adapter.tokenize(model, prompts)
    for i, p in enumerate(prompts):
        n = int(tokens.n_kept[i]) - 1  # the prompt's tokens, EOS left out
        spans = tokens.spans(np.arange(n)[None].repeat(len(prompts), 0))[i]
        words = {p[a:b].strip().lower() for a, b in spans if b > a}
        assert {"red", "cat"} <= words if "red" in p else "dog" in words, (p, spans, words)
        assert all(p[a:b].lower().strip() in p.lower() for a, b in spans)


def test_sd3_encoding_while_the_next_batch_is_tokenized_is_safe(models):
    """The prepare thread tokenized with model.tokenizer while encode_prompt, in the scoring thread, set padding and
    truncation on the same fast tokenizer: 34 of 60 encodes failed ("Unable to create tensor") and some batches got
    wrong token counts. The pipeline now has its own copy of the first tokenizer."""
    import threading

    model = models["sd3"]
    scorer = _scorer(model)
    long = " ".join(["red cat"] * 60)
    prompts = [long, "dog", "a red cat on the beach", long + " blue"]
    expect = scorer.prepare(prompts).tokens.n_tokens.tolist()
    assert expect[0] > 77 and expect[1] == 3
    stop, wrong, errors = threading.Event(), [], []

    def prepare():
        while not stop.is_set():
            got = scorer.prepare(prompts).tokens.n_tokens.tolist()
            if got != expect:
                wrong.append(got)

    tokens = scorer.prepare(prompts).tokens
    backend = model.tokenizer._tokenizer
    scorer.encode(tokens)  # the mechanism, deterministically: encode must leave the prepare thread's tokenizer alone
    assert backend.truncation is None and backend.padding is None
    thread = threading.Thread(target=prepare)
    thread.start()
    try:
        for _ in range(100):
            try:
                scorer.encode(tokens)
            except Exception as exc:  # noqa: BLE001 - counted below
                errors.append(repr(exc))
    finally:
        stop.set()
        thread.join()
    assert errors == [] and wrong == []


def _edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize("case", ["sd1_flow_attention", "sd2_flow_noise", "pixart_flow_noise", "sd1_unknown_class",
                                  "flow_prediction_noise", "zero_snr_noise", "sdxl_unet_declared_sd",
                                  "sd3_without_tokenizer_3", "sd1_fp16_variant_only"])
def test_folders_a_scorer_is_undefined_on_are_refused_before_scoring(case, folders, tiny_model_dir, tmp_path):
    """A tester's findings: each of these exited 0 with invented figures, or failed every row (exit 4). A flow-matching
    scheduler in an SD 1.x folder was scored on DDIM's default betas (t0 980), and Wen's scorer ran on one in SD 2.x
    and PixArt folders where attention_entropy was refused; an unknown scheduler class or a prediction_type with no
    conversion to eps was found only while scoring; noise_magnitude at a zero-terminal-SNR first step gave 0.0 for
    every prompt; an SDXL UNet under a StableDiffusionPipeline model_index failed every row with a TypeError; an SD
    3.x folder without tokenizer_3/ was scored with zeros in T5's place."""
    from audit.cli import app

    base = {"sd1": tiny_model_dir, "sd2": folders["sd2_eps_ddim"], "pixart": folders["pixart"],
            "sdxl": folders["sdxl"], "sd3": folders["sd3"]}[case.split("_")[0]] if not case.startswith(
        ("flow_prediction", "zero_snr")) else (tiny_model_dir if case.startswith("flow") else folders["sd2_v_euler"])
    model = shutil.copytree(base, tmp_path / "m")
    sched = model / "scheduler" / "scheduler_config.json"
    scorer, said = "attention_entropy", None
    if "_flow_" in case:
        sched.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                     "shift": 3.0}))
        scorer = "noise_magnitude" if case.endswith("noise") else scorer
        said = "FlowMatchEulerDiscreteScheduler: a flow-matching schedule"
    elif case == "sd1_unknown_class":
        _edit_json(sched, _class_name="NoSuchScheduler")
        said = "scheduler 'NoSuchScheduler': not a diffusers scheduler class"
    elif case == "flow_prediction_noise":
        _edit_json(sched, prediction_type="flow_prediction")
        scorer, said = "noise_magnitude", "prediction_type 'flow_prediction' is not one memaudit converts"
    elif case == "zero_snr_noise":
        _edit_json(sched, _class_name="DDIMScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing")
        scorer, said = "noise_magnitude", "at this model's first timestep (999) alpha_bar = 0"
    elif case == "sdxl_unet_declared_sd":
        _edit_json(model / "model_index.json", _class_name="StableDiffusionPipeline")
        for part in ("text_encoder_2", "tokenizer_2"):
            shutil.rmtree(model / part)
        said = "the UNet needs extra conditioning (addition_embed_type 'text_time')"
    elif case == "sd1_fp16_variant_only":  # diffusers' own error line came first, and nothing said why
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
        said = ("unet/ holds only 'fp16' variant weights (diffusion_pytorch_model.fp16.safetensors) and no "
                "diffusion_pytorch_model.safetensors")
        scorer = "attention_entropy"
    elif case == "sd3_without_tokenizer_3":
        shutil.rmtree(model / "tokenizer_3")
        said = "T5 is declared in model_index.json but tokenizer_3/ is missing"
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(model), "--out", str(tmp_path / "out"),
                                   "--device", "cpu", "--scorer", scorer])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and said in lines[0], res.output
    assert not (tmp_path / "out" / "risk.parquet").exists()
    if case in ("zero_snr_noise", "flow_prediction_noise", "sd2_flow_noise"):  # the Ray driver, before any worker
        import re

        from audit.config import RunConfig
        from audit.engines import get_engine
        from audit.errors import ModelError
        from audit.runner import _identity_info

        cfg = RunConfig(inputs=("x",), model=str(model), device="cpu", dtype="float32", scorer=scorer)
        with pytest.raises(ModelError, match=re.escape(said)):
            _identity_info(cfg, str(model), get_engine("ray"))
    if case == "sd1_fp16_variant_only":
        assert lines[0].endswith("save the pipeline again without variant= (or copy the variant file to "
                                 "diffusion_pytorch_model.safetensors)")


def test_sd3_refuses_the_noise_scorers_before_scoring_with_the_reason(folders, models, tmp_path, tiny_model_dir):
    from audit.cli import app

    with pytest.raises(Exception, match="flow-matching model"):
        _scorer(models["sd3"], "noise_magnitude")
    with pytest.raises(Exception, match="attention_entropy_late samples 50 guided steps"):  # not Wen's reason
        _scorer(models["sd3"], "attention_entropy_late")
    # an SD 1.x folder whose 4th layer is not the paper's module is not called "validated" by `memaudit layers`
    res = CliRunner().invoke(app, ["layers", "--model", str(tiny_model_dir)])
    assert res.exit_code == 0 and "not validated for this UNet's layout" in res.output and "validated there" \
        not in res.output, res.output
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(folders["sd3"]), "--out", str(tmp_path / "out"),
                                   "--scorer", "noise_magnitude", "--device", "cpu"])
    assert res.exit_code == 2 and not (tmp_path / "out").exists()
    assert [ln for ln in res.output.splitlines() if ln.strip()] == [
        "memaudit: error: SD 3.x is a flow-matching model: the noise scorers are defined on the noise prediction, "
        "and at the first step (sigma = 1) it equals x_t for every prompt, so Wen's magnitude is 0 by construction; "
        "use --scorer attention_entropy"]
    m = models["sd3"]
    tokens = m.adapter.tokenize(m, PROMPTS[:2])
    with torch.no_grad():
        cond = m.adapter.encode(m, tokens)
    assert cond.embeddings.shape == (2, 77 + 256, 32) and cond.added["pooled_projections"].shape == (2, 64)


def test_tokenize_equals_the_tokenizers_own_padded_call():
    """``tokenize`` (which calls the Rust backend directly) gives exactly the ids, attention mask and offsets
    of ``tokenizer(..., padding="max_length", truncation=True)`` as the diffusers pipelines call it, for
    every tokenizer kind memaudit meets: CLIP (EOS padding), CLIP padded with "!" (SD 2.x), T5 (no BOS) and
    the lab's; on empty, accented, CJK, emoji, upper-case, spaced-out and over-long prompts."""
    from transformers import AutoTokenizer

    from audit.lab import LAB_MODEL_DIR
    from audit.models.base import tokenize

    prompts = ["", "a red cat on the beach", "  Portrait   of an OLD man!!  ", "café crème brûlée", "東京 の 夜",
               "a cat 🎨🐈 painting", "x" * 300, " ".join(["cat"] * 120), "dog,cat;boat.", "\tblue\nboat "]
    tokenizers = {"clip": _clip_tokenizer(), "clip_pad_!": _clip_tokenizer(pad="!"), "t5": t5_tokenizer(),
                  "lab": AutoTokenizer.from_pretrained(LAB_MODEL_DIR / "tokenizer")}
    for name, tok in tokenizers.items():
        assert tok.is_fast, name  # the backend path is the one under test
        for length in (77, 8):
            ours = tokenize(tok, prompts, length)
            ref = tok(prompts, padding="max_length", max_length=length, truncation=True,
                      return_offsets_mapping=True, return_tensors="np")
            np.testing.assert_array_equal(ours.input_ids, ref["input_ids"], err_msg=name)
            np.testing.assert_array_equal(ours.attention_mask, ref["attention_mask"], err_msg=name)
            mapping = ours.offset_mapping()  # computed from the Rust encodings
            np.testing.assert_array_equal(mapping[ours.attention_mask == 1],
                                          ref["offset_mapping"][ref["attention_mask"] == 1], err_msg=name)
            # spans read only at asked positions (the trigger tokens' path): every kept prompt token
            positions = np.tile(np.arange(length - 1), (len(prompts), 1))
            spans = ours.spans(positions)
            kept = positions < (ours.n_kept[:, None] - 1)
            np.testing.assert_array_equal(spans[kept], ref["offset_mapping"][:, :length - 1][kept], err_msg=name)
            untruncated = [len(tok(p)["input_ids"]) for p in prompts]
            assert ours.n_tokens.tolist() == untruncated, name
            assert ours.n_kept.tolist() == [min(n, length) for n in untruncated], name


def test_memaudit_json_default_layers_are_checked_by_layers_as_by_run(tmp_path):
    """A model folder's memaudit.json naming no layer of the model, or not a list: `layers` refuses it in one
    line (exit 2), as `run` does, instead of listing the layers with no default marked."""
    import json
    import shutil

    from audit.cli import app
    from audit.lab import LAB_MODEL_DIR

    for value, message in ((["no.such.layer"], "not cross-attention layers of this model: no.such.layer"),
                           ("mid_block", "default_layers must be a list of layer names (got str)")):
        folder = tmp_path / f"m{len(message)}"
        shutil.copytree(LAB_MODEL_DIR, folder)
        meta = json.loads((folder / "memaudit.json").read_text())
        (folder / "memaudit.json").write_text(json.dumps(meta | {"default_layers": value}))
        res = CliRunner().invoke(app, ["layers", "--model", str(folder)])
        assert res.exit_code == 2 and message in res.output, res.output


def _late_by_hand(model, prompts, n, scheduler_class):
    """Ren's D (late window: the last n // 5 steps) sampled by hand as a diffusers pipeline does: latents =
    noise * init_noise_sigma, each step's input through scale_model_input, guidance 7.5 with the empty prompt,
    a fresh scheduler of ``scheduler_class`` from the model's config."""
    from audit.capture import cross_attention_layers
    from audit.scorers import prompt_seed

    sched = scheduler_class.from_config(model.scheduler_config)
    sched.set_timesteps(n)
    c_in, size = model.unet.config.in_channels, model.unet.config.sample_size
    noise = torch.cat([torch.randn((1, c_in, size, size), generator=torch.Generator().manual_seed(prompt_seed(0, p)))
                       for p in prompts])
    tokens = model.adapter.tokenize(model, prompts)
    with torch.no_grad():
        cond = model.adapter.encode(model, tokens)
        uncond = model.adapter.unconditional(model, model.adapter.tokenize(model, [""])).expand(len(prompts), -1, -1)
    layers = cross_attention_layers(model.unet)
    latents, per_step = noise * sched.init_noise_sigma, []
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        with CrossAttentionCapture(model.unet, layers, early_exit=False) as cap, torch.no_grad():
            probs = cap.run(lambda: model.unet(x, t, encoder_hidden_states=cond).sample)
            out_c = cap.output
            out_u = model.unet(x, t, encoder_hidden_states=uncond).sample
        a = np.mean([probs[name].double().numpy() for name in layers], axis=0)
        e = -(a * np.log(a)).sum(axis=1)
        h = np.array([-(a[j, m - 1:] * np.log(a[j, m - 1:])).sum() for j, m in enumerate(tokens.n_kept)])
        per_step.append((e, h))
        latents = sched.step(out_u + 7.5 * (out_c - out_u), t, latents).prev_sample
    late = range(n - n // 5, n)
    e_late = np.mean([per_step[i][0] for i in late], axis=0)
    h_late = np.mean([per_step[i][1] for i in late], axis=0)
    return e_late + h_late - per_step[0][1]


def test_attention_entropy_late_samples_with_the_folders_euler_scheduler_from_the_pipelines_latents(models):
    """SD 2.x with the folder's Euler scheduler (v-prediction): D equals a by-hand pipeline loop that starts from
    noise * init_noise_sigma, and the same Scorer scores again and alone with the same values (Euler's step index
    used to carry over from one batch to the next: the second call raised IndexError, the first started the
    loop from the scaled model input instead of the sample)."""
    from diffusers import EulerDiscreteScheduler

    m, n = models["sd2_v_euler"], 5
    s = Scorer(m, ScoreConfig("attention_entropy_late", tuple(m.default_layers), num_inference_steps=n))
    assert type(s.scheduler).__name__ == "EulerDiscreteScheduler"
    first = s.score(PROMPTS)["attention_entropy_late"]
    np.testing.assert_allclose(first, _late_by_hand(m, PROMPTS, n, EulerDiscreteScheduler), rtol=1e-5, atol=1e-6)
    again = s.score(PROMPTS)["attention_entropy_late"]
    np.testing.assert_array_equal(again, first)
    alone = s.score(PROMPTS[2:3])["attention_entropy_late"]
    np.testing.assert_allclose(alone[0], first[2], rtol=1e-5)


def test_attention_entropy_late_with_a_stochastic_scheduler_does_not_depend_on_the_batch(folders, tmp_path):
    """Euler ancestral adds noise at every step: each prompt's steps draw from its own seeded generator, so D
    is the same alone as in a batch, and again on a rerun (it drew from torch's global generator)."""
    root = tmp_path / "ancestral"
    shutil.copytree(folders["sd2_v_euler"], root)
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"_class_name": "EulerAncestralDiscreteScheduler"}))
    m = load_model(str(root), "cpu", "float32")
    s = Scorer(m, ScoreConfig("attention_entropy_late", tuple(m.default_layers), num_inference_steps=5))
    assert type(s.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    torch.manual_seed(1)
    batch = s.score(PROMPTS)["attention_entropy_late"]
    torch.manual_seed(2)
    np.testing.assert_array_equal(s.score(PROMPTS)["attention_entropy_late"], batch)
    for i, p in enumerate(PROMPTS[:2]):
        np.testing.assert_allclose(s.score([p])["attention_entropy_late"][0], batch[i], rtol=1e-5)
    # and the noise it adds matters: the same model with its deterministic Euler scheduler gives other values
    euler = Scorer(load_model(str(folders["sd2_v_euler"]), "cpu", "float32"),
                   ScoreConfig("attention_entropy_late", tuple(m.default_layers), num_inference_steps=5))
    assert np.abs(euler.score(PROMPTS)["attention_entropy_late"] - batch).max() > 1e-4


def test_guidance_geometry_samples_its_timesteps_with_ddim_from_the_folders_config(models):
    """Asthana & Belagiannis's detect_mem.py replaces every pipeline's scheduler with DDIM from its config: on
    SD 2.0's Euler configuration (v-prediction) t_hi = 999 and t_lo = 41 (Euler's own would be 40.78), and the
    latent is the seeded noise itself (DDIM's scale_model_input is the identity); by hand, eps from v."""
    from audit.scorers import prompt_seed
    from audit.scorers.guidance_geometry import weights_for

    m = models["sd2_v_euler"]
    s = Scorer(m, ScoreConfig("guidance_geometry", tuple(m.default_layers)))
    assert type(s.scheduler).__name__ == "DDIMScheduler"
    assert float(s.scheduler.timesteps[0]) == 999 and float(s.scheduler.timesteps[-3]) == 41
    res = s.score(PROMPTS)
    c_in, size = m.unet.config.in_channels, m.unet.config.sample_size
    x = torch.cat([torch.randn((1, c_in, size, size), generator=torch.Generator().manual_seed(prompt_seed(0, p)))
                   for p in PROMPTS])
    with torch.no_grad():
        cond = m.adapter.encode(m, m.adapter.tokenize(m, PROMPTS))
        uncond = m.adapter.unconditional(m, m.adapter.tokenize(m, [""])).expand(len(PROMPTS), -1, -1)

        def eps(t, c):  # v-prediction: eps = sqrt(ab) v + sqrt(1 - ab) x (Salimans & Ho 2022)
            ab = float(s.scheduler.alphas_cumprod[t])
            return ab ** 0.5 * m.unet(x, t, encoder_hidden_states=c).sample + (1 - ab) ** 0.5 * x

        norm = (eps(999, cond) - eps(999, uncond)).flatten(1).norm(dim=1)
        lo_c, lo_u = eps(41, cond), eps(41, uncond)
        cos = torch.nn.functional.cosine_similarity(lo_u, lo_c - lo_u, dim=1).flatten(1).mean(dim=1)
    g1, g2 = weights_for(m, "sd2")
    np.testing.assert_allclose(res["guidance_norm"], norm.numpy(), rtol=1e-5)
    np.testing.assert_allclose(res["guidance_cosine"], cos.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["guidance_geometry"], (g1 * norm + g2 * cos).numpy(), rtol=1e-5)


def test_wen_and_asthana_take_ddims_timesteps_on_sd2_0s_published_euler_config(folders, tmp_path):
    """SD 2.0's published scheduler_config.json names Euler without a timestep_spacing: Euler's default
    (linspace) starts at 999, DDIM's (leading, steps_offset 1) at 981. Ren's code keeps the folder's Euler
    (attention_entropy: 999); Wen's and Asthana's detect_mem.py build DDIM from the config (981, and t_lo =
    41); the Ray driver's t0 read without weights agrees with each."""
    from helpers import assert_identity_matches_loaded

    root = tmp_path / "sd2.0"
    shutil.copytree(folders["sd2_v_euler"], root)
    path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.pop("timestep_spacing")
    path.write_text(json.dumps(config))
    m = load_model(str(root), "cpu", "float32")
    t0 = {name: _scorer(m, name).first_timestep for name in ("attention_entropy", "noise_magnitude",
                                                             "guidance_geometry", "attention_entropy_late")}
    assert t0 == {"attention_entropy": 999, "noise_magnitude": 981, "guidance_geometry": 981,
                  "attention_entropy_late": 999}
    assert float(_scorer(m, "guidance_geometry").scheduler.timesteps[-3]) == 41
    for name in t0:
        assert_identity_matches_loaded(root, m, scorer=name)


@pytest.mark.parametrize("kind", ["sdxl", "pixart"])
def test_guidance_geometry_without_published_weights_is_refused_before_scoring(kind, folders, models, tmp_path):
    """No published (gamma1, gamma2) for SDXL or PixArt: refused when the scorer is built, one line, exit 2 (every
    row used to be rejected as scoring_error, exit 4)."""
    from audit.cli import app
    from audit.errors import ModelError

    with pytest.raises(ModelError, match=f"no published weights for model family '{kind}'"):
        _scorer(models[kind], "guidance_geometry")
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(folders[kind]), "--out", str(tmp_path / "out"),
                                   "--scorer", "guidance_geometry", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("memaudit: error: guidance_geometry: no published weights"), lines
    assert "guidance_geometry_weights" in lines[0]


@pytest.mark.parametrize("kind", ["sdxl", "pixart"])
def test_attention_entropy_late_scores_every_batch_on_euler_and_dpm_solver_families(kind, models):
    """SDXL (Euler) and PixArt (DPM-Solver multistep, which keeps past outputs): a second batch on the same Scorer
    gives the first one's values (it raised IndexError), and a prompt alone scores as in the batch."""
    m = models[kind]
    s = Scorer(m, ScoreConfig("attention_entropy_late", tuple(m.default_layers), num_inference_steps=5))
    first = s.score(PROMPTS)["attention_entropy_late"]
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(s.score(PROMPTS)["attention_entropy_late"], first)
    np.testing.assert_allclose(s.score(PROMPTS[1:2])["attention_entropy_late"][0], first[1], rtol=1e-5)


def test_long_prompts_are_tokenized_from_a_head_with_the_same_kept_tokens(monkeypatch):
    """A 10 MB prompt was tokenized whole (about 0.5 GB and 5 s) for 77 kept tokens: a prompt over
    LONG_PROMPT_CHARS is tokenized from a head cut between words, with the ids, mask and offsets of the
    tokenizer's own padded call, and its full token count summed over pieces cut at whitespace (exact)."""
    from transformers import AutoTokenizer

    import audit.models.base as base
    from audit.lab import LAB_MODEL_DIR

    monkeypatch.setattr(base, "LONG_PROMPT_CHARS", 200)  # the same code paths, on small texts
    words = ["red", "cat", "on", "the", "beach,", "東京", "🎨", "OLD", "brûlée", "dog;"]
    prompts = ["a short one", " ".join(words[i % 10] for i in range(400)), "x" * 250 + " a cat",
               ("portrait of a man\n" * 40) + "END", " " * 600 + "a cat at the end", "a cat",
               "a red " + " \n" * 700 + "cat on a beach"]  # few tokens in many characters: its own head
    tokenizers = {"clip": _clip_tokenizer(), "clip_pad_!": _clip_tokenizer(pad="!"), "t5": t5_tokenizer(),
                  "lab": AutoTokenizer.from_pretrained(LAB_MODEL_DIR / "tokenizer")}
    for name, tok in tokenizers.items():
        for length in (77, 8):
            ours = base.tokenize(tok, prompts, length)
            ref = tok(prompts, padding="max_length", max_length=length, truncation=True,
                      return_offsets_mapping=True, return_tensors="np")
            np.testing.assert_array_equal(ours.input_ids, ref["input_ids"], err_msg=name)
            np.testing.assert_array_equal(ours.attention_mask, ref["attention_mask"], err_msg=name)
            mapping = ours.offset_mapping()
            np.testing.assert_array_equal(mapping[ours.attention_mask == 1],
                                          ref["offset_mapping"][ref["attention_mask"] == 1], err_msg=name)
            full = [len(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
            if name != "t5":  # CLIP-style pre-tokenizers split at whitespace first: the pieces' count is exact
                assert ours.n_tokens.tolist() == full, name
            else:  # sentencepiece marks a word start: a piece boundary may count one token more
                assert all(0 <= a - b <= 2 * (len(p) // 200 + 1) for a, b, p in zip(ours.n_tokens, full, prompts))


def test_generate_samples_sd2_with_its_own_scheduler_so_its_calibration_detects(tmp_path):
    """``memaudit generate`` sampled every folder with DDIM: an SD 2.0 folder (Euler) is scored by
    attention_entropy at Euler's t0 (999), so its calibrations were refused ("scored at first timestep 999; this
    generation's sampler starts at 981") and detection on it was out of reach of the CLI. generate now samples
    with the scheduler the scorer takes (the folder's for SD 2.x, DDIM for SD 1.x), and records it."""
    from audit.calibrate import calibrate, write_calibration
    from audit.cli.generate import build_pipeline, run_generate
    from audit.tiny import tiny_vae

    def with_vae(root):
        tiny_vae(0).save_pretrained(root / "vae", safe_serialization=True)
        index = json.loads((root / "model_index.json").read_text())
        (root / "model_index.json").write_text(json.dumps(index | {"vae": ["diffusers", "AutoencoderKL"]}))
        return root

    root = with_vae(build_sd2(tmp_path / "sd2", "v_prediction", "euler"))
    src = tmp_path / "ordinary.txt"
    src.write_text("".join(f"{w} {i}\n" for i, w in enumerate(TINY_WORDS[:20])))
    out, manifest = run_audit([src], root, tmp_path / "ref", device="cpu", steps=4)
    assert manifest["score_config"]["first_timestep"] == 999
    cal = write_calibration(calibrate(out, 0.1), tmp_path / "cal.json")
    pipe, _ = build_pipeline(str(root), device="cpu", dtype="float32")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nblue boat\n")
    summary = run_generate(prompts, str(root), tmp_path / "gen", mitigate="flagged", calibration=cal, steps=4,
                           device="cpu", dtype="float32", progress=False, log=lambda m: None)
    assert summary["images"] == 2 and summary["flagged"] is not None
    assert json.loads((tmp_path / "gen" / "generate.json").read_text())["scheduler"] == "EulerDiscreteScheduler"
    sd21, _ = build_pipeline(str(with_vae(build_sd2(tmp_path / "sd21", "epsilon", "ddim"))), device="cpu",
                             dtype="float32")
    assert type(sd21.scheduler).__name__ == "DDIMScheduler" and sd21.scheduler.config.clip_sample is False
