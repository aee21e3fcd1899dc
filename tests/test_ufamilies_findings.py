"""Findings of the session-45 new-user trial on the non-SD-1.x families (SD 2.x, SDXL, SD 3.x, PixArt):

1. A folder whose text encoder(s) and denoiser came from different models (the conditioning width is not the
   UNet's ``cross_attention_dim``, PixArt's ``caption_channels``, SD 3.x's ``joint_attention_dim`` or
   ``pooled_projection_dim``) loaded, and then every prompt failed with a matrix-shape ``scoring_error`` (exit 4,
   a run folder of rejected rows); it is now refused at load in one line naming both widths (exit 2).
2. Another family's denoiser in a folder (a PixArt transformer in an SD 2.x ``unet/``, an SD 2.x UNet in PixArt's
   ``transformer/``) stopped with diffusers' unrelated message ("can't multiply sequence by non-int of type
   'NoneType'", "not possible to define the number of attention heads ..."); it now names the class the
   component's config.json describes and the one the pipeline needs. PixArt-alpha's published config naming
   ``Transformer2DModel`` still loads.
3. An inpainting UNet (9 input channels, 4 output) in a StableDiffusionPipeline or StableDiffusionXLPipeline
   folder was scored by ``attention_entropy`` from 9 channels of pure noise, exit 0 (its mask and image channels
   filled with noise), while ``noise_magnitude`` failed every row; it is now refused at load in one line.
4. ``--scorer guidance_geometry`` on SD 3.x was refused with noise_magnitude's reason ("so Wen's magnitude is 0 by
   construction"); it now says why guidance_geometry does not apply.
5. ``memaudit eval --scorers attention_entropy,noise_magnitude`` on SD 3.x scored every prompt with the first
   scorer, then refused the second: every scorer is now checked against the model before any prompt is scored.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from audit.errors import ModelError
from audit.models import load_model


def _run(model, tmp_path):
    """``memaudit run`` of one prompt on ``model``: (exit code, non-empty output lines)."""
    from audit.cli import app

    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(model), "--out", str(tmp_path / "out"),
                                   "--device", "cpu"])
    return res.exit_code, [ln for ln in res.output.splitlines() if ln.strip()]


def _swap(folders, kind, tmp_path, component, module):
    """A copy of the ``kind`` family folder with ``component`` replaced by ``module`` saved as safetensors."""
    model = shutil.copytree(folders[kind], tmp_path / "m")
    shutil.rmtree(model / component)
    module.save_pretrained(model / component, safe_serialization=True)
    return model


def _sd2_unet(cross_attention_dim=32, seed=1, in_channels=4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4),
        use_linear_projection=True, upcast_attention=True, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2)


def _sdxl_unet(cross_attention_dim, in_channels=4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=cross_attention_dim)


def _pixart_transformer(caption_channels):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(5)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=5, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=caption_channels, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)


def _sd3_transformer(joint_attention_dim, pooled_projection_dim):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(9)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim,
                                 out_channels=4)


WIDTH_CASES = {  # family folder, component, replacement, the line's reason
    "sd2_unet_64": ("sd2_v_euler", "unet", lambda: _sd2_unet(64),
                    "the text conditioning is 32 wide (text_encoder/'s hidden_size) but unet/'s cross_attention_dim "
                    "is 64"),
    "sd2_unet_per_block": ("sd2_v_euler", "unet", lambda: _sd2_unet((32, 64)),  # one block of the two differs
                           "the text conditioning is 32 wide (text_encoder/'s hidden_size) but unet/'s "
                           "cross_attention_dim is [32, 64]"),
    "sdxl_unet_96": ("sdxl", "unet", lambda: _sdxl_unet(96),
                     "the text conditioning is 64 wide (text_encoder/ + text_encoder_2/ hidden sizes 32 + 32) but "
                     "unet/'s cross_attention_dim is 96"),
    "pixart_caption_64": ("pixart", "transformer", lambda: _pixart_transformer(64),
                          "the text conditioning is 32 wide (text_encoder/'s T5 d_model) but transformer/'s "
                          "caption_channels is 64"),
    "sd3_joint_64": ("sd3", "transformer", lambda: _sd3_transformer(64, 64),
                     "the text conditioning is 32 wide (text_encoder_3/'s T5 d_model) but transformer/'s "
                     "joint_attention_dim is 64"),
    "sd3_pooled_32": ("sd3", "transformer", lambda: _sd3_transformer(32, 32),
                      "the text conditioning is 64 wide (text_encoder/ + text_encoder_2/ pooled projection_dim 32 + "
                      "32) but transformer/'s pooled_projection_dim is 32"),
}


@pytest.mark.parametrize("case", list(WIDTH_CASES))
def test_text_conditioning_of_another_width_than_the_denoiser_takes_is_refused_at_load(case, family_folders,
                                                                                         tmp_path):
    kind, component, build, reason = WIDTH_CASES[case]
    model = _swap(family_folders, kind, tmp_path, component, build())
    with pytest.raises(ModelError) as err:
        load_model(str(model), "cpu", "float32")
    assert str(err.value) == f"--model {model}: {reason}: the components come from different models"
    code, lines = _run(model, tmp_path)  # was: exit 4 after every row failed with a matrix-shape scoring_error
    assert code == 2 and lines == [f"memaudit: error: --model {model}: {reason}: the components come from "
                                   "different models"]
    assert not (tmp_path / "out").exists()  # refused before anything was scored or written
    if case == "sd3_joint_64":  # without T5 the pipeline fills T5's positions with zeros of the joint width: it runs
        for part in ("text_encoder_3", "tokenizer_3"):
            shutil.rmtree(model / part)
        index = json.loads((model / "model_index.json").read_text())
        (model / "model_index.json").write_text(json.dumps({k: v for k, v in index.items()
                                                            if k not in ("text_encoder_3", "tokenizer_3")}))
        loaded = load_model(str(model), "cpu", "float32")
        assert loaded.unet.config.joint_attention_dim == 64
        (tmp_path / "no_t5").mkdir()
        code, lines = _run(model, tmp_path / "no_t5")
        assert code == 0 and lines[0].startswith("memaudit: 1 row read, 1 scored, 0 rejected"), lines


@pytest.mark.parametrize("case", ["pixart_in_sd2_unet", "sd2_unet_in_pixart", "pixart_in_sd3"])
def test_another_familys_denoiser_is_named_in_one_line(case, family_folders, family_models, tmp_path):
    source, kind, component = {"pixart_in_sd2_unet": ("pixart/transformer", "sd2_v_euler", "unet"),
                               "sd2_unet_in_pixart": ("sd2_v_euler/unet", "pixart", "transformer"),
                               "pixart_in_sd3": ("pixart/transformer", "sd3", "transformer")}[case]
    model = shutil.copytree(family_folders[kind], tmp_path / "m")
    shutil.rmtree(model / component)
    family, part = source.split("/")
    shutil.copytree(family_folders[family] / part, model / component)
    named, needed = {"pixart_in_sd2_unet": ("PixArtTransformer2DModel", "UNet2DConditionModel"),
                     "sd2_unet_in_pixart": ("UNet2DConditionModel", "PixArtTransformer2DModel"),
                     "pixart_in_sd3": ("PixArtTransformer2DModel", "SD3Transformer2DModel")}[case]
    expected = (f"--model {model}: {component}/config.json describes a {named}, but this folder's pipeline needs a "
                f"{needed} there (a component from another model family)")
    code, lines = _run(model, tmp_path)
    assert code == 2 and lines == [f"memaudit: error: {expected}"]
    assert not (tmp_path / "out").exists()
    if case == "sd2_unet_in_pixart":  # PixArt-alpha's published class name for its own transformer still loads
        _check_pixart_alias(family_folders, family_models, tmp_path)


def _check_pixart_alias(family_folders, family_models, tmp_path):
    """A PixArt folder whose transformer/config.json names Transformer2DModel loads and scores as the original."""
    # PixArt-alpha's hub folders name Transformer2DModel in transformer/config.json (saved before diffusers had
    # PixArtTransformer2DModel): the class check accepts that alias, and the model scores as the original folder
    from audit.scorers import ScoreConfig, Scorer

    model = shutil.copytree(family_folders["pixart"], tmp_path / "alias")
    config = model / "transformer" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"_class_name": "Transformer2DModel"}))
    loaded = load_model(str(model), "cpu", "float32")
    prompts = ["a red cat on the beach", "blue boat on a lake"]
    got = Scorer(loaded, ScoreConfig("attention_entropy", tuple(loaded.default_layers))).score(prompts)["risk"]
    original = family_models["pixart"]
    want = Scorer(original, ScoreConfig("attention_entropy", tuple(original.default_layers))).score(prompts)["risk"]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("kind", ["sd2_v_euler", "sdxl"])
def test_an_inpainting_unet_is_refused_before_scoring(kind, family_folders, tmp_path):
    # was: attention_entropy scored 9 channels of noise (exit 0), noise_magnitude failed every row (exit 4)
    unet = _sd2_unet(in_channels=9) if kind == "sd2_v_euler" else _sdxl_unet(64, in_channels=9)
    model = _swap(family_folders, kind, tmp_path, "unet", unet)  # weights and config agree: 9 in, 4 out
    code, lines = _run(model, tmp_path)
    assert code == 2 and lines == [
        f"memaudit: error: --model {model}: unet/ takes 9 input channels but predicts 4: memaudit scores "
        "text-to-image UNets from pure noise, whose input and output channels are equal (an inpainting UNet takes 9: "
        "its mask and image latents besides the noise)"]
    assert not (tmp_path / "out").exists()


def test_guidance_geometry_on_sd3_is_refused_with_its_own_reason(family_folders, tmp_path):
    from audit.cli import app

    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(family_folders["sd3"]), "--out",
                                   str(tmp_path / "out"), "--scorer", "guidance_geometry", "--device", "cpu"])
    assert res.exit_code == 2 and not (tmp_path / "out").exists()
    assert [ln for ln in res.output.splitlines() if ln.strip()] == [
        "memaudit: error: SD 3.x is a flow-matching model: guidance_geometry (Asthana & Belagiannis) is defined on "
        "the noise prediction at DDIM timesteps of a DDPM-family schedule, which a flow-matching model does not "
        "have; use --scorer attention_entropy"]


def test_eval_refuses_a_scorer_the_model_cannot_run_before_scoring_any(family_folders, tmp_path):
    # was: "attention_entropy: scored 4 prompts in 0.1 s" (every prompt scored), then the refusal of the second
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.cli import app

    table = tmp_path / "labelled.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue boat", "an old man", "a city street"],
                             "memorized": [True, True, False, False]}), table)
    res = CliRunner().invoke(app, ["eval", str(table), "--model", str(family_folders["sd3"]), "--scorers",
                                   "attention_entropy,noise_magnitude", "--device", "cpu"])
    assert res.exit_code == 2
    assert [ln for ln in res.output.splitlines() if ln.strip()] == [
        "memaudit: error: SD 3.x is a flow-matching model: the noise scorers are defined on the noise prediction, "
        "and at the first step (sigma = 1) it equals x_t for every prompt, so Wen's magnitude is 0 by construction; "
        "use --scorer attention_entropy"]
