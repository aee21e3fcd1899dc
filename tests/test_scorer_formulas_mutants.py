"""The scorers' formulas where hand-applied mutants of audit/scorers (parametrization, noise_magnitude,
attention_entropy_late, guidance_geometry, layers, attention_entropy and the shared forward in base) survived the
earlier tests, checked against hand computations on the tiny seeded model: eps from each prediction type on a
hand-built forward process (float32 from float16 inputs); Wen's magnitude and Asthana's geometry on an
x0-prediction model; zero-terminal-SNR first steps (x0 refused, epsilon kept); prediction types a scorer cannot
use, refused before scoring (and only those); Ren's D over a one-step and a two-step late window, a truncated
prompt's summary and the per-step entropies in float64; the step generators' wrap; the cosine's clamp;
memaudit.json's guidance weights; an SD 2.x Euler folder's first input; the per-layer columns' order; the
entropy along another axis."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from audit.capture import CrossAttentionCapture, cross_attention_layers
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


def test_to_epsilon_recovers_the_noise_of_a_hand_built_forward_process_in_float32_from_half_inputs():
    """x0 = (0.5, -1), eps = (2, 0.25), alpha_bar = 0.36 (sqrt 0.6, sqrt(1 - ab) 0.8): x_t = 0.6 x0 + 0.8 eps =
    (1.9, -0.4), v = 0.6 eps - 0.8 x0 = (0.8, 0.95). From float16 tensors every conversion gives eps in float32,
    computed in float32 (a float16 product 0.8 * x_t rounds by about 2e-4)."""
    x0, eps = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.25]])
    x_t, v = 0.6 * x0 + 0.8 * eps, 0.6 * eps - 0.8 * x0
    np.testing.assert_allclose(x_t.numpy(), [[1.9, -0.4]], atol=1e-6)
    np.testing.assert_allclose(v.numpy(), [[0.8, 0.95]], atol=1e-6)
    h_x = x_t.half()
    xf = h_x.double().numpy()  # the float16 values, exactly
    for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        got = to_epsilon(out, x_t, 0.36, kind)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), eps.numpy(), atol=1e-6, err_msg=kind)
        h_out = out.half()
        of = h_out.double().numpy()
        expected = {"epsilon": of, "v_prediction": 0.6 * of + 0.8 * xf, "sample": (xf - 0.6 * of) / 0.8}[kind]
        half = to_epsilon(h_out, h_x, 0.36, kind)
        assert half.dtype == torch.float32, kind
        np.testing.assert_allclose(half.double().numpy(), expected, rtol=0, atol=2e-6, err_msg=kind)


def test_to_epsilon_refuses_sd3s_flow_velocity_naming_what_it_converts():
    """SD 3.x declares ``flow_velocity`` (v = eps - x0, x_t = (1 - sigma) x0 + sigma eps, so eps = x_t + (1 - sigma)
    v): memaudit has no flow conversion and says which prediction types it converts."""
    x0, eps, sigma = torch.tensor([[0.5]]), torch.tensor([[2.0]]), 0.25
    x_t, v = (1 - sigma) * x0 + sigma * eps, eps - x0
    assert (x_t + (1 - sigma) * v).item() == pytest.approx(2.0)  # the identity the refusal's reason rests on
    with pytest.raises(ValueError, match=r"'flow_velocity': memaudit converts epsilon, v_prediction, sample to the "
                                         r"noise prediction"):
        to_epsilon(v, x_t, 0.36, "flow_velocity")


def test_noise_magnitude_of_an_x0_prediction_model_is_wens_d_on_eps_from_x0(x0_model):
    """eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab) at t0 = 981 for both branches: d = || eps_c - eps_u ||, which is
    sqrt(ab / (1 - ab)) || x0_c - x0_u || (about 0.076 of the raw difference)."""
    m = x0_model
    res = Scorer(m, ScoreConfig("noise_magnitude", tuple(m.default_layers))).score(PROMPTS)
    x, cond, uncond = _inputs(m, PROMPTS)
    ab = _ab(m, 981)
    eps_c = (x.double() - math.sqrt(ab) * _unet(m, x, 981, cond)) / math.sqrt(1 - ab)
    eps_u = (x.double() - math.sqrt(ab) * _unet(m, x, 981, uncond)) / math.sqrt(1 - ab)
    d = (eps_c - eps_u).flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(res["noise_magnitude"], d, rtol=1e-4)
    raw = (_unet(m, x, 981, cond) - _unet(m, x, 981, uncond)).flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(res["noise_magnitude"] / raw, math.sqrt(ab / (1 - ab)), rtol=1e-4)


def test_guidance_geometry_of_an_x0_prediction_model_converts_each_timestep_with_its_own_alpha_bar(x0_model):
    """t_hi = 981 and t_lo = 41 each convert x0 to eps with their own alpha_bar (0.0058 and 0.96), on the same
    pure-noise x; SD 1.x weights (1, 2)."""
    m = x0_model
    res = Scorer(m, ScoreConfig("guidance_geometry", tuple(m.default_layers))).score(PROMPTS)
    x, cond, uncond = _inputs(m, PROMPTS)

    def eps(t, c):
        ab = _ab(m, t)
        return (x.double() - math.sqrt(ab) * _unet(m, x, t, c)) / math.sqrt(1 - ab)

    assert 0.005 < _ab(m, 981) < 0.006 and 0.95 < _ab(m, 41) < 0.97
    norm = (eps(981, cond) - eps(981, uncond)).flatten(1).norm(dim=1).numpy()
    u = eps(41, uncond)
    g = eps(41, cond) - u
    cos = ((u * g).sum(dim=1) / (u.norm(dim=1) * g.norm(dim=1))).flatten(1).mean(dim=1).numpy()
    np.testing.assert_allclose(res["guidance_norm"], norm, rtol=1e-4)
    np.testing.assert_allclose(res["guidance_cosine"], cos, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["guidance_geometry"], norm + 2.0 * cos, rtol=1e-4)


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


def test_a_sampler_step_that_fails_for_another_reason_is_left_to_the_scoring(tiny_model, monkeypatch):
    """The check before scoring refuses only diffusers' prediction_type error: another error of its 1-value dry
    step (here a made-up one) does not stop the scorer from being built."""
    from audit.errors import ModelError

    def step(self, *args, **kwargs):
        raise RuntimeError("a 1x1 sample is too small for this solver")

    monkeypatch.setattr(DDIMScheduler, "step", step)
    s = Scorer(tiny_model, ScoreConfig("attention_entropy_late", tuple(tiny_model.default_layers),
                                       num_inference_steps=5))
    assert s.first_timestep == 801
    monkeypatch.setattr(DDIMScheduler, "step", lambda self, *a, **k: (_ for _ in ()).throw(
        ValueError("prediction_type given as x must be one of `epsilon`")))
    with pytest.raises(ModelError, match="cannot step the scheduler config's prediction_type 'epsilon'"):
        Scorer(tiny_model, ScoreConfig("attention_entropy_late", tuple(tiny_model.default_layers),
                                       num_inference_steps=5))



def test_ren_d_with_one_step_is_the_step_0_entropy_of_every_layers_mean(tiny_model):
    """N = 1: the late window (the last max(N // 5, 1) steps) is step 0 itself, so D = E_0 + (H_0 - H_0) = E_0,
    the entropy of the attention averaged over all layers at t0 = 981 (a ``--steps 1`` run raised on an empty
    late window)."""
    m = tiny_model
    res = Scorer(m, ScoreConfig("attention_entropy_late", tuple(m.default_layers), num_inference_steps=1)).score(
        PROMPTS)
    sched = DDIMScheduler.from_config(m.scheduler_config)
    sched.set_timesteps(1)
    assert int(sched.timesteps[0]) == 1  # one leading step with offset 1
    x, cond, _ = _inputs(m, PROMPTS)
    layers = cross_attention_layers(m.unet)
    with CrossAttentionCapture(m.unet, layers, early_exit=False) as cap, torch.no_grad():
        probs = cap.run(lambda: m.unet(x, sched.timesteps[0], encoder_hidden_states=cond))
    a = np.mean([probs[name].double().numpy() for name in layers], axis=0)
    e0 = -(a * np.log(a)).sum(axis=1)
    np.testing.assert_allclose(res["late_entropy"], e0, rtol=1e-6)
    np.testing.assert_array_equal(res["summary_entropy_change"], [0.0, 0.0])
    np.testing.assert_allclose(res["attention_entropy_late"], e0, rtol=1e-6)


def test_ren_d_late_entropy_is_the_mean_over_the_window_and_a_truncated_prompts_summary_is_its_eos(tiny_model):
    """N = 10, late window steps 8 and 9: late_entropy is their MEAN (the first prompt's entropy moves by about
    1.8e-5 from step 8 to 9 on the random tiny model; the hand loop agrees to 3e-8). A prompt of more than 77
    tokens keeps 77 (BOS, 75 words, EOS at 76): its summary is position 76 alone, from the kept length, not the
    101 tokens it had."""
    m, n = tiny_model, 10
    long = " ".join(["red"] * 99)  # 99 words + BOS + EOS = 101 tokens
    prompts = [PROMPTS[0], long]
    res = Scorer(m, ScoreConfig("attention_entropy_late", tuple(m.default_layers), num_inference_steps=n)).score(
        prompts)
    tokens = tokenize(m.tokenizer, prompts, 77)
    assert tokens.n_tokens.tolist() == [8, 101] and tokens.n_kept.tolist() == [8, 77]
    np.testing.assert_array_equal(res["truncated"], [False, True])
    sched = DDIMScheduler.from_config(m.scheduler_config)
    sched.set_timesteps(n)
    x, cond, uncond = _inputs(m, prompts)
    layers = cross_attention_layers(m.unet)
    e, h, latents = [], [], x
    for t in sched.timesteps:
        with CrossAttentionCapture(m.unet, layers, early_exit=False) as cap, torch.no_grad():
            probs = cap.run(lambda: m.unet(latents, t, encoder_hidden_states=cond).sample)
            out_c = cap.output
            out_u = m.unet(latents, t, encoder_hidden_states=uncond).sample
        a = np.mean([probs[name].double().numpy() for name in layers], axis=0)  # [2, 77]
        e.append(-(a * np.log(a)).sum(axis=1))
        h.append(np.array([-(a[0, 7:] * np.log(a[0, 7:])).sum(), -a[1, 76] * np.log(a[1, 76])]))
        latents = sched.step(out_u + 7.5 * (out_c - out_u), t, latents).prev_sample
    late = (e[8] + e[9]) / 2
    change = (h[8] + h[9]) / 2 - h[0]
    assert abs(e[9][0] - e[8][0]) > 5e-6  # the window's steps differ: a mean is not its last step
    assert np.abs(change).min() > 1e-4
    np.testing.assert_allclose(res["late_entropy"], late, rtol=0, atol=1e-6)
    np.testing.assert_allclose(res["summary_entropy_change"], change, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(res["attention_entropy_late"], late + change, rtol=0, atol=1e-6)


def test_step_entropies_average_the_layers_and_sum_the_summary_from_the_eos_in_float64():
    """Two layers of two rows averaged with equal weights: (0.5, 0.25, 0.0625, 0.1875) and uniform over 4. The
    summary runs from the EOS (index n_kept - 1: 2 and 1) to the end, unnormalized; float64 as documented."""
    from audit.scorers.attention_entropy_late import step_entropies, summary_mask

    one = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])
    two = torch.tensor([[0.5, 0.25, 0.0, 0.25], [0.25, 0.25, 0.25, 0.25]])
    mask = summary_mask(np.array([3, 2], dtype=np.int32), 4, "cpu")
    assert mask.tolist() == [[False, False, True, True], [False, True, True, True]]
    e, h = step_entropies({"first": one, "second": two}, mask)
    assert e.dtype == torch.float64 and h.dtype == torch.float64
    row = [0.5, 0.25, 0.0625, 0.1875]
    np.testing.assert_allclose(e.numpy(), [-sum(p * math.log(p) for p in row), math.log(4)], rtol=1e-12)
    np.testing.assert_allclose(h.numpy(), [-(0.0625 * math.log(0.0625) + 0.1875 * math.log(0.1875)),
                                           0.75 * math.log(4)], rtol=1e-12)


def test_step_generators_wrap_at_2_to_the_63():
    """(s + 1 + j) mod 2^63: a seed of 2^62 gives 2^62 + 1 and 2^62 + 2 (torch takes seeds below 2^64)."""
    from audit.scorers.attention_entropy_late import draw_generators

    assert [g.initial_seed() for g in draw_generators([2**62, 2**63 - 2], 2, "cpu")] == [2**62 + 1, 2**62 + 2,
                                                                                      2**63 - 1, 0]


def test_channel_cosine_clamps_each_norm_at_1e_8_as_torch_does():
    """Per pixel over channels, then the mean over pixels: (1, 0) vs (0, 1) is 0 and (1, 1) vs (-2, -2) is -1, mean
    -0.5; vectors of norm 1e-4 (far above the 1e-8 clamp of each norm) still give cosine 1."""
    from audit.scorers.guidance_geometry import channel_cosine

    u = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])  # [N=1, C=2, H=1, W=2]
    g = torch.tensor([[[[0.0, -2.0]], [[1.0, -2.0]]]])
    assert channel_cosine(u, g).tolist() == pytest.approx([-0.5], abs=1e-7)
    small = torch.full((1, 4, 2, 2), 5e-5)  # norm over 4 channels 1e-4
    assert channel_cosine(small, small).tolist() == pytest.approx([1.0], abs=1e-6)


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


def test_the_first_input_of_an_sd2_euler_folder_is_the_vp_x_t_of_pure_noise(tiny_model_dir, tmp_path):
    """An SD 2.x folder (pad token "!") with Euler, linspace spacing (SD 2.0's scheduler): t0 = 999, the pipeline's
    latent noise * init_noise_sigma (sigma_999) scaled by 1 / sqrt(sigma^2 + 1) is sqrt(1 - alpha_bar_999) * noise,
    the VP x_t of x0 = 0, that the scorer's forward reads (DDIM's first input is the noise itself)."""
    root = tmp_path / "m"
    shutil.copytree(tiny_model_dir, root)
    path = root / "tokenizer" / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"pad_token": "!"}))
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"_class_name": "EulerDiscreteScheduler",
                                                                "timestep_spacing": "linspace"}))
    m = load_model(str(root), "cpu", "float32")
    s = Scorer(m, ScoreConfig("attention_entropy", tuple(m.default_layers)))
    assert s.adapter.name == "sd2" and type(s.scheduler).__name__ == "EulerDiscreteScheduler"
    assert s.first_timestep == 999
    ab = _ab(m, 999)
    noise, _, _ = _inputs(m, PROMPTS)
    x = s.latents(PROMPTS)
    np.testing.assert_allclose(x.numpy(), math.sqrt(1 - ab) * noise.numpy(), rtol=1e-5, atol=1e-7)
    assert 0.99 < math.sqrt(1 - ab) < 0.998



def test_per_layer_values_index_the_layers_in_the_order_given_not_by_name():
    """Column NN is the NN-th layer in call order (the dict's order): ``transformer_blocks.2`` is l00 and
    ``transformer_blocks.10`` l01 (a sort by name would swap them); K = 2 draws averaged, prompt-major; l02.. NaN."""
    from audit.scorers.layers import per_layer_values

    first = torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.1, 0.2], [0.25, 0.25, 0.5], [0.25, 0.25, 0.5]])  # [B*K=4, L=3]
    second = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    out = per_layer_values({"transformer_blocks.2.attn2": first, "transformer_blocks.10.attn2": second}, 2, 2)
    a0 = np.array([[0.6, 0.3, 0.1], [0.25, 0.25, 0.5]])  # mean over each prompt's two draws
    np.testing.assert_allclose(out["attn_entropy_l00"].numpy(), -(a0 * np.log(a0)).sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(out["bos_mass_l00"].numpy(), [0.6, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(out["attn_entropy_l01"].numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(out["bos_mass_l01"].numpy(), [1.0, 1.0])
    assert out["attn_entropy_l00"].dtype == torch.float64
    assert all(np.isnan(out[f"{c}_l{i:02d}"].numpy()).all() for c in ("attn_entropy", "bos_mass") for i in range(2, 16))


def test_attention_entropy_along_another_axis_with_both_paths():
    """``dim`` picks the distribution's axis: two distributions in the COLUMNS of a [3, 2] array, (0.5, 0.5, 0) and
    (0.25, 0.25, 0.5): log 2 and 1.5 log 2 nats, from a tensor and from a nested list."""
    from audit.scorers import attention_entropy

    cols = [[0.5, 0.25], [0.5, 0.25], [0.0, 0.5]]
    expected = [math.log(2), 1.5 * math.log(2)]
    np.testing.assert_allclose(attention_entropy(torch.tensor(cols, dtype=torch.float64), dim=0).numpy(), expected,
                               rtol=1e-12)
    np.testing.assert_allclose(attention_entropy(cols, dim=0), expected, rtol=1e-12)
