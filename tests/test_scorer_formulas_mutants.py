"""The scorers' formulas where hand-applied mutants of audit/scorers (parametrization, noise_magnitude,
attention_entropy_late, guidance_geometry, layers, attention_entropy and the shared forward in base) survived the
earlier tests, checked against hand computations on the tiny seeded model: eps from each prediction type on a
hand-built forward process (float32 from float16 inputs); Wen's magnitude and Asthana's geometry on an
x0-prediction model; zero-terminal-SNR first steps (x0 refused, epsilon kept); prediction types a scorer cannot
use, refused before scoring; Ren's D over a one-step and a two-step late window and a truncated prompt's
summary; the step generators' wrap; the cosine's clamp; memaudit.json's guidance weights; the per-layer columns'
order; the entropy along another axis."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from audit.models import load_model
from audit.scorers import ScoreConfig, Scorer, prompt_seed, tokenize
from audit.scorers.parametrization import to_epsilon

PROMPTS = ["a red cat on the beach", "old city street at night"]


def _variant(tiny_model_dir, root, **scheduler):
    """A copy of the tiny model at ``root`` whose scheduler config has ``scheduler`` overrides; loaded on CPU."""
    shutil.copytree(tiny_model_dir, root)
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | scheduler))
    return load_model(str(root), "cpu", "float32")


def _inputs(model, prompts, k=1):
    """(x [B*K, C, H, W], cond [B*K, L, D], uncond [B*K, L, D]) rebuilt from the definitions: the seeded pure
    noise (DDIM: init_noise_sigma = 1, scale_model_input the identity) and the text encoder's last hidden state."""
    c_in, size = model.unet.config.in_channels, model.unet.config.sample_size
    x = torch.cat([torch.randn((k, c_in, size, size), generator=torch.Generator().manual_seed(prompt_seed(0, p)))
                   for p in prompts])
    with torch.no_grad():
        cond = model.text_encoder(torch.from_numpy(tokenize(model.tokenizer, prompts, 77).input_ids))[0]
        empty = model.text_encoder(torch.from_numpy(tokenize(model.tokenizer, [""], 77).input_ids))[0]
    return x, cond.repeat_interleave(k, dim=0), empty.expand(len(x), -1, -1)


def _unet(model, x, t, c):
    with torch.no_grad():
        return model.unet(x, t, encoder_hidden_states=c).sample.double()


def _ab(model, t):
    return float(DDIMScheduler.from_config(model.scheduler_config).alphas_cumprod[t])


@pytest.fixture(scope="module")
def x0_model(tiny_model_dir, tmp_path_factory):
    """The tiny model declared as an x0 (``sample``) predictor: same weights, other parametrization."""
    return _variant(tiny_model_dir, tmp_path_factory.mktemp("x0") / "m", prediction_type="sample")


def test_noise_magnitude_is_refused_at_a_zero_terminal_snr_first_step_of_an_x0_model(tiny_model_dir, tmp_path):
    """At alpha_bar_t0 = 0, eps = (x_t - 0 * x0) / 1 = x_t for every prompt, as from v: Wen's d was 0.0 for every
    prompt of an x0-prediction model (only v-prediction was refused). guidance_geometry keeps its cosine term."""
    from audit.errors import ModelError

    m = _variant(tiny_model_dir, tmp_path / "m", prediction_type="sample", rescale_betas_zero_snr=True,
                 timestep_spacing="trailing")
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(to_epsilon(out, x, 0.0, "sample"), x)  # why: the prompt's x0 drops out
    with pytest.raises(ModelError, match=r"first timestep \(999\) alpha_bar = 0 \(a zero-terminal-SNR schedule\), "
                                         r"where the noise prediction from x0 is x_t for every prompt"):
        Scorer(m, ScoreConfig("noise_magnitude", tuple(m.default_layers)))
    res = Scorer(m, ScoreConfig("guidance_geometry", tuple(m.default_layers))).score(PROMPTS)
    np.testing.assert_array_equal(res["guidance_norm"], [0.0, 0.0])
    assert np.isfinite(res["guidance_cosine"]).all() and (res["guidance_cosine"] != 0).all()


def test_noise_magnitude_of_an_epsilon_model_is_kept_at_a_zero_terminal_snr_first_step(tiny_model_dir, tmp_path):
    """An epsilon model predicts eps itself, so alpha_bar_t0 = 0 changes nothing: d = || eps_c - eps_u || at t0 = 999
    (trailing spacing), not refused."""
    m = _variant(tiny_model_dir, tmp_path / "m", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    s = Scorer(m, ScoreConfig("noise_magnitude", tuple(m.default_layers)))
    assert s.first_timestep == 999 and float(s.scheduler.alphas_cumprod[999]) == 0.0
    x, cond, uncond = _inputs(m, PROMPTS)
    d = (_unet(m, x, 999, cond) - _unet(m, x, 999, uncond)).flatten(1).norm(dim=1).numpy()
    assert (d > 0).all()
    np.testing.assert_allclose(s.score(PROMPTS)["noise_magnitude"], d, rtol=1e-4)


def test_a_prediction_type_the_scorer_cannot_use_is_refused_before_scoring(tiny_model_dir, tmp_path):
    """``flow_prediction`` in an SD 1.x folder: guidance_geometry (on eps, like noise_magnitude) names the types
    memaudit converts; attention_entropy_late samples with DDIM, whose step raised on every prompt while scoring
    (exit 4, every row a scoring error): now refused when the scorer is built, by the Ray driver too.
    attention_entropy needs neither and scores."""
    from audit.config import RunConfig
    from audit.engines import get_engine
    from audit.errors import ModelError
    from audit.runner import _identity_info

    m = _variant(tiny_model_dir, tmp_path / "m", prediction_type="flow_prediction")
    layers = tuple(m.default_layers)
    with pytest.raises(ModelError, match=r"--scorer guidance_geometry is defined on the noise prediction, and the "
                                         r"scheduler config's prediction_type 'flow_prediction' is not one memaudit "
                                         r"converts to it \(epsilon, v_prediction, sample\)"):
        Scorer(m, ScoreConfig("guidance_geometry", layers))
    said = ("--scorer attention_entropy_late samples with DDIMScheduler, which cannot step the scheduler config's "
            "prediction_type 'flow_prediction'; use attention_entropy")
    with pytest.raises(ModelError, match=re.escape(said)):
        Scorer(m, ScoreConfig("attention_entropy_late", layers, num_inference_steps=5))
    cfg = RunConfig(inputs=("x",), model=str(tmp_path / "m"), device="cpu", dtype="float32",
                    scorer="attention_entropy_late")
    with pytest.raises(ModelError, match=re.escape(said)):
        _identity_info(cfg, str(tmp_path / "m"), get_engine("ray"))
    assert np.isfinite(Scorer(m, ScoreConfig("attention_entropy", layers)).score(PROMPTS)["attn_entropy"]).all()


def test_guidance_geometry_weights_from_memaudit_json_weigh_the_columns_and_malformed_ones_are_refused(
        tiny_model_dir, tmp_path):
    """``[0.5, 3.0]``: guidance_norm and guidance_cosine stay the unweighted parts, guidance_geometry = 0.5 norm +
    3 cos. Weights that are not two finite numbers are refused when the scorer is built: a string "12" was
    unpacked into its characters (1.0, 2.0), an empty list or 0 silently meant the published weights, [true, 2]
    gave 1.0, and a list of one failed with Python's unpacking message."""
    from audit.errors import ModelError
    from audit.scorers.guidance_geometry import weights_for

    root = tmp_path / "m"
    shutil.copytree(tiny_model_dir, root)
    (root / "memaudit.json").write_text(json.dumps({"guidance_geometry_weights": [0.5, 3]}))
    m = load_model(str(root), "cpu", "float32")
    res = Scorer(m, ScoreConfig("guidance_geometry", tuple(m.default_layers))).score(PROMPTS)
    x, cond, uncond = _inputs(m, PROMPTS)
    norm = (_unet(m, x, 981, cond) - _unet(m, x, 981, uncond)).flatten(1).norm(dim=1).numpy()
    u = _unet(m, x, 41, uncond)
    g = _unet(m, x, 41, cond) - u
    cos = ((u * g).sum(dim=1) / (u.norm(dim=1) * g.norm(dim=1))).flatten(1).mean(dim=1).numpy()
    np.testing.assert_allclose(res["guidance_norm"], norm, rtol=1e-4)
    np.testing.assert_allclose(res["guidance_cosine"], cos, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["guidance_geometry"], 0.5 * norm + 3.0 * cos, rtol=1e-4)

    class Model:
        unet = m.unet
        extra: dict = {}

    for bad, shown in (("12", '"12"'), ([], "[]"), (0, "0"), ([True, 2], "[true, 2]"), ([1.0], "[1.0]"),
                       ([1, 2, 3], "[1, 2, 3]"), ([1, float("nan")], "[1, NaN]"), (["1", 2], '["1", 2]')):
        Model.extra = {"guidance_geometry_weights": bad}
        with pytest.raises(ValueError, match=r"guidance_geometry_weights in the model's memaudit.json must be two "
                                             r"finite numbers \[gamma1, gamma2\] \(got " + re.escape(shown) + r"\)$"):
            weights_for(Model(), "sd1")
    Model.extra = {"guidance_geometry_weights": None}  # null: not set, the family's weights
    assert weights_for(Model(), "sd1") == (1.0, 2.0)
    (root / "memaudit.json").write_text(json.dumps({"guidance_geometry_weights": "12"}))
    with pytest.raises(ModelError, match=r'must be two finite numbers \[gamma1, gamma2\] \(got "12"\)'):
        Scorer(load_model(str(root), "cpu", "float32"), ScoreConfig("guidance_geometry", tuple(m.default_layers)))
