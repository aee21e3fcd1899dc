"""The published detectors against values computed by hand in the test, on tiny seeded models:
Wen et al.'s noise magnitude for epsilon, v-prediction and zero-terminal-SNR models; Asthana &
Belagiannis's guidance geometry; Ren et al.'s D over a short guided sampling loop; the per-layer attention
columns of full-forward scorers."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from audit.capture import CrossAttentionCapture, cross_attention_layers
from audit.models import load_model
from audit.scorers import SCORERS, ScoreConfig, Scorer, prompt_seed, tokenize
from audit.scorers.guidance_geometry import weights_for
from audit.scorers.parametrization import to_epsilon

PROMPTS = ["a red cat on the beach", "old city street at night"]


def _variant(tiny_model_dir, tmp_path, **scheduler):
    """A copy of the tiny model whose scheduler config has ``scheduler`` overrides; loaded on CPU."""
    root = tmp_path / "variant"
    shutil.copytree(tiny_model_dir, root)
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | scheduler))
    return load_model(str(root), "cpu", "float32")


def _by_hand(model, prompts, k=1, seed=0):
    """(x [B*K, C, H, W], cond [B*K, L, D], uncond [B*K, L, D]): the seeded pure-noise latents and the
    embeddings, rebuilt from the definitions (DDIM: init_noise_sigma = 1, scale_model_input = identity)."""
    c_in = model.unet.config.in_channels
    size = model.unet.config.sample_size
    x = torch.cat([torch.randn((k, c_in, size, size), generator=torch.Generator().manual_seed(prompt_seed(seed, p)))
                   for p in prompts])
    with torch.no_grad():
        ids = torch.from_numpy(tokenize(model.tokenizer, prompts, 77).input_ids)
        cond = model.text_encoder(ids)[0].repeat_interleave(k, dim=0)
        empty = torch.from_numpy(tokenize(model.tokenizer, [""], 77).input_ids)
        uncond = model.text_encoder(empty)[0].expand(len(x), -1, -1)
    return x, cond, uncond


def _unet(model, x, t, c):
    with torch.no_grad():
        return model.unet(x, t, encoder_hidden_states=c).sample


def _score(model, name, **kw):
    return Scorer(model, ScoreConfig(name, tuple(model.default_layers), **kw)).score(PROMPTS)


def test_to_epsilon_formulas():
    x, out = torch.tensor([[2.0]]), torch.tensor([[0.5]])
    ab = 0.36  # sqrt 0.6, sqrt(1 - ab) 0.8
    assert to_epsilon(out, x, ab, "epsilon").item() == 0.5
    assert to_epsilon(out, x, ab, "v_prediction").item() == pytest.approx(0.6 * 0.5 + 0.8 * 2.0)
    assert to_epsilon(out, x, ab, "sample").item() == pytest.approx((2.0 - 0.6 * 0.5) / 0.8)
    assert to_epsilon(out, x, 0.0, "v_prediction").item() == 2.0  # zero terminal SNR: eps = x_t
    with pytest.raises(ValueError, match="flow"):
        to_epsilon(out, x, ab, "flow")


def test_noise_magnitude_epsilon_model_by_hand(tiny_model):
    res = _score(tiny_model, "noise_magnitude", noise_draws=2)
    x, cond, uncond = _by_hand(tiny_model, PROMPTS, k=2)
    d = (_unet(tiny_model, x, 981, cond) - _unet(tiny_model, x, 981, uncond)).flatten(1).norm(dim=1)
    np.testing.assert_allclose(res["noise_magnitude"], d.view(2, 2).mean(dim=1).numpy(), rtol=1e-4)
    np.testing.assert_array_equal(res["risk"], res["noise_magnitude"])


def test_alpha_bar_at_eulers_fractional_timesteps_is_its_own_sigma():
    """SD 2.0's Euler configuration (linspace spacing) steps through fractional timesteps (t_lo = 40.78 for
    guidance_geometry); alpha_bar there is 1 / (1 + sigma^2) with Euler's own interpolated sigma (it was
    alphas_cumprod[40], 0.96189 against 0.96110), and alphas_cumprod[t] at integer timesteps."""
    from diffusers import EulerDiscreteScheduler

    from audit.scorers.parametrization import alpha_bar

    s = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               prediction_type="v_prediction", timestep_spacing="linspace")
    s.set_timesteps(50)
    fractional = [i for i, t in enumerate(s.timesteps) if float(t) != int(t)]
    assert len(fractional) > 40 and float(s.timesteps[-3]) == pytest.approx(40.7755, abs=1e-4)
    for i, t in enumerate(s.timesteps):
        assert alpha_bar(s, t) == pytest.approx(1 / (1 + float(s.sigmas[i]) ** 2), rel=1e-6), (i, float(t))
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ddim.set_timesteps(50)
    assert [alpha_bar(ddim, t) for t in ddim.timesteps] == [float(ddim.alphas_cumprod[int(t)]) for t in ddim.timesteps]


def test_noise_magnitude_v_prediction_model_is_converted_to_eps(tiny_model_dir, tmp_path):
    model = _variant(tiny_model_dir, tmp_path, prediction_type="v_prediction")
    res = _score(model, "noise_magnitude")
    x, cond, uncond = _by_hand(model, PROMPTS)
    ab = float(DDIMScheduler.from_config(model.scheduler_config).alphas_cumprod[981])
    v_c, v_u = _unet(model, x, 981, cond), _unet(model, x, 981, uncond)
    eps_c = math.sqrt(ab) * v_c + math.sqrt(1 - ab) * x  # Salimans & Ho 2022, eps from v
    eps_u = math.sqrt(ab) * v_u + math.sqrt(1 - ab) * x
    expected = (eps_c - eps_u).flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(res["noise_magnitude"], expected, rtol=1e-4)
    raw = (v_c - v_u).flatten(1).norm(dim=1).numpy()  # the old, unconverted quantity differs by sqrt(ab) ~ 0.076
    np.testing.assert_allclose(res["noise_magnitude"] / raw, math.sqrt(ab), rtol=1e-4)
    assert 0.07 < math.sqrt(ab) < 0.08


def test_noise_magnitude_is_refused_at_a_zero_terminal_snr_first_step(tiny_model_dir, tmp_path):
    """There eps = x_t for every prompt, so Wen's d was 0.0 for every prompt and the run exited 0 with a ranking
    that carried nothing (SD 3.x was refused for the same reason). guidance_geometry keeps its cosine term."""
    from audit.errors import ModelError
    from audit.scorers.parametrization import to_epsilon

    model = _variant(tiny_model_dir, tmp_path, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                     timestep_spacing="trailing")
    with pytest.raises(ModelError, match=r"first timestep \(999\) alpha_bar = 0 .*0 for every prompt"):
        Scorer(model, ScoreConfig("noise_magnitude", tuple(model.default_layers)))
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(to_epsilon(v, x, 0.0, "v_prediction"), x)  # why: the prompt's v drops out
    geometry = Scorer(model, ScoreConfig("guidance_geometry", tuple(model.default_layers)))
    res = geometry.score(PROMPTS)
    np.testing.assert_array_equal(res["guidance_norm"], [0.0, 0.0])
    assert np.isfinite(res["guidance_cosine"]).all()


def test_guidance_geometry_by_hand(tiny_model):
    res = _score(tiny_model, "guidance_geometry", noise_draws=2)
    x, cond, uncond = _by_hand(tiny_model, PROMPTS, k=2)
    norm = (_unet(tiny_model, x, 981, cond) - _unet(tiny_model, x, 981, uncond)).flatten(1).norm(dim=1)
    u = _unet(tiny_model, x, 41, uncond)  # t_lo = timesteps[-3] = 41 (50 leading steps, offset 1), same x
    g = _unet(tiny_model, x, 41, cond) - u
    cos = (u * g).sum(dim=1) / (u.norm(dim=1) * g.norm(dim=1))  # over the 4 channels, per pixel [N, H, W]
    cos = cos.flatten(1).mean(dim=1)
    norm, cos = norm.view(2, 2).mean(dim=1).numpy(), cos.view(2, 2).mean(dim=1).numpy()
    np.testing.assert_allclose(res["guidance_norm"], norm, rtol=1e-4)
    np.testing.assert_allclose(res["guidance_cosine"], cos, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["guidance_geometry"], 1.0 * norm + 2.0 * cos, rtol=1e-4)  # SD 1.x weights
    np.testing.assert_array_equal(res["risk"], res["guidance_geometry"])


def test_guidance_geometry_weights_per_family(tiny_model):
    assert weights_for(tiny_model, "sd1") == (1.0, 2.0)
    assert weights_for(tiny_model, "sd2") == (1.0, 0.1)

    class Wide:  # an SD 2.x UNet loaded through the SD 1.x pipeline class
        extra = {}
        unet = type("U", (), {"config": type("C", (), {"cross_attention_dim": 1024})()})()

    assert weights_for(Wide(), "sd1") == (1.0, 0.1)
    with pytest.raises(ValueError, match="no published weights for model family 'sdxl'"):
        weights_for(tiny_model, "sdxl")


def test_full_forward_scorers_write_every_layers_entropy_and_bos_mass(tiny_model):
    res = _score(tiny_model, "noise_magnitude")
    layers = cross_attention_layers(tiny_model.unet)
    assert len(layers) == 7
    x, cond, _ = _by_hand(tiny_model, PROMPTS)
    with CrossAttentionCapture(tiny_model.unet, layers, early_exit=False) as cap, torch.no_grad():
        probs = cap.run(lambda: tiny_model.unet(x, 981, encoder_hidden_states=cond))
    for i, name in enumerate(layers):
        a = probs[name].double().numpy()
        np.testing.assert_allclose(res[f"attn_entropy_l{i:02d}"], -(a * np.log(a)).sum(axis=1), rtol=1e-6)
        np.testing.assert_allclose(res[f"bos_mass_l{i:02d}"], a[:, 0], rtol=1e-5)
    assert np.isnan(res["attn_entropy_l07"]).all() and np.isnan(res["bos_mass_l15"]).all()  # past the 7th layer
    default = layers.index(tiny_model.default_layers[0])
    np.testing.assert_allclose(res["attn_entropy"], res[f"attn_entropy_l{default:02d}"], rtol=1e-12)
    partial = _score(tiny_model, "attention_entropy")
    assert np.isnan(partial["attn_entropy_l00"]).all()  # a partial forward writes no per-layer column
    np.testing.assert_allclose(partial["attn_entropy"], res["attn_entropy"], rtol=1e-6)


def test_attention_entropy_late_is_ren_d_on_a_short_sampling_loop(tiny_model):
    n = 5  # 50 by default; the late window is the last n // 5 steps (40..49 of 50): here step 4
    res = _score(tiny_model, "attention_entropy_late", num_inference_steps=n)
    layers = cross_attention_layers(tiny_model.unet)
    sched = DDIMScheduler.from_config(tiny_model.scheduler_config)
    sched.set_timesteps(n)
    x, cond, uncond = _by_hand(tiny_model, PROMPTS)
    lengths = tokenize(tiny_model.tokenizer, PROMPTS, 77).n_kept  # BOS + words + EOS
    per_step = []
    latents = x
    for i, t in enumerate(sched.timesteps):
        with CrossAttentionCapture(tiny_model.unet, layers, early_exit=False) as cap, torch.no_grad():
            probs = cap.run(lambda: tiny_model.unet(latents, t, encoder_hidden_states=cond).sample)
            out_c = cap.output
        a = np.mean([probs[name].double().numpy() for name in layers], axis=0)  # [B, 77], equal layer weights
        e = -(a * np.log(a)).sum(axis=1)
        h = np.array([-(a[j, lengths[j] - 1:] * np.log(a[j, lengths[j] - 1:])).sum() for j in range(len(a))])
        per_step.append((e, h))
        out_u = _unet(tiny_model, latents, t, uncond)
        latents = sched.step(out_u + 7.5 * (out_c - out_u), t, latents).prev_sample
    (e4, h4), (_, h0) = per_step[4], per_step[0]
    np.testing.assert_allclose(res["late_entropy"], e4, rtol=1e-6)
    np.testing.assert_allclose(res["summary_entropy_change"], h4 - h0, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(res["attention_entropy_late"], e4 + (h4 - h0), rtol=1e-6)


def test_registry_costs_and_forwards():
    costs = {name: (s.forward, s.unet_forwards) for name, s in SCORERS.items()}
    assert costs == {"attention_entropy": ("partial_conditional", 1.0),
                     "noise_magnitude": ("full_conditional_unconditional", 2.0),
                     "guidance_geometry": ("several_timesteps", 4.0),
                     "attention_entropy_late": ("full_sampling", 100.0)}


def test_late_window_is_the_last_fifth_of_the_steps():
    """Ren et al. (detect.py mode D): the last N/5 steps, 40..49 of 50; at least one step."""
    from audit.scorers.attention_entropy_late import late_steps

    assert late_steps(50) == range(40, 50)
    assert late_steps(20) == range(16, 20)
    assert late_steps(5) == range(4, 5)
    assert late_steps(3) == range(2, 3) and late_steps(1) == range(0, 1)


def test_ren_d_with_two_draws_and_a_four_step_late_window(tiny_model):
    """D by hand at n = 20 (late window = steps 16..19, so a MEAN over 4 steps) with K = 2 noise
    draws (D per draw, then the mean over a prompt's draws, prompt-major)."""
    n, k = 20, 2
    res = Scorer(tiny_model, ScoreConfig("attention_entropy_late", tuple(tiny_model.default_layers),
                                         num_inference_steps=n, noise_draws=k)).score(PROMPTS)
    layers = cross_attention_layers(tiny_model.unet)
    sched = DDIMScheduler.from_config(tiny_model.scheduler_config)
    sched.set_timesteps(n)
    x, cond, uncond = _by_hand(tiny_model, PROMPTS, k=k)  # rows: p0d0, p0d1, p1d0, p1d1
    lengths = np.repeat(tokenize(tiny_model.tokenizer, PROMPTS, 77).n_kept, k)
    per_step, latents = [], x
    for t in sched.timesteps:
        with CrossAttentionCapture(tiny_model.unet, layers, early_exit=False) as cap, torch.no_grad():
            probs = cap.run(lambda: tiny_model.unet(latents, t, encoder_hidden_states=cond).sample)
            out_c = cap.output
        a = np.mean([probs[name].double().numpy() for name in layers], axis=0)
        e = -(a * np.log(a)).sum(axis=1)
        h = np.array([-(a[j, lengths[j] - 1:] * np.log(a[j, lengths[j] - 1:])).sum() for j in range(len(a))])
        per_step.append((e, h))
        out_u = _unet(tiny_model, latents, t, uncond)
        latents = sched.step(out_u + 7.5 * (out_c - out_u), t, latents).prev_sample
    late = [16, 17, 18, 19]  # the last 20 // 5 = 4 steps
    e_late = np.mean([per_step[i][0] for i in late], axis=0)
    change = np.mean([per_step[i][1] for i in late], axis=0) - per_step[0][1]
    per_prompt = lambda v: v.reshape(len(PROMPTS), k).mean(axis=1)  # noqa: E731
    np.testing.assert_allclose(res["late_entropy"], per_prompt(e_late), rtol=1e-5)
    np.testing.assert_allclose(res["summary_entropy_change"], per_prompt(change), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["attention_entropy_late"], per_prompt(e_late + change), rtol=1e-5)


def test_stochastic_step_generators_are_seeded_one_past_the_prompt_seed():
    """Draw j of a prompt of seed s: (s + 1 + j) mod 2^63 (apart from the first-step noise, seed s)."""
    from audit.scorers.attention_entropy_late import draw_generators

    gens = draw_generators([5, 2**63 - 1], 2, "cpu")
    assert [g.initial_seed() for g in gens] == [6, 7, 0, 1]


def test_sample_prediction_at_alpha_bar_one_is_refused():
    """eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab) is undefined at ab = 1: a ValueError, not inf/NaN."""
    from audit.scorers.parametrization import to_epsilon

    with pytest.raises(ValueError, match="alpha_bar = 1"):
        to_epsilon(torch.tensor([[0.5]]), torch.tensor([[2.0]]), 1.0, "sample")


def test_per_layer_columns_average_the_noise_draws(tiny_model):
    """attn_entropy_lNN / bos_mass_lNN with K = 2: a is the mean over the 2 draws before the entropy."""
    config = ScoreConfig("noise_magnitude", tuple(tiny_model.default_layers), noise_draws=2)
    res = Scorer(tiny_model, config).score(PROMPTS)
    layers = cross_attention_layers(tiny_model.unet)
    x, cond, _ = _by_hand(tiny_model, PROMPTS, k=2)
    with CrossAttentionCapture(tiny_model.unet, layers, early_exit=False) as cap, torch.no_grad():
        probs = cap.run(lambda: tiny_model.unet(x, 981, encoder_hidden_states=cond))
    for i, name in enumerate(layers):
        a = probs[name].double().numpy().reshape(2, 2, -1).mean(axis=1)
        np.testing.assert_allclose(res[f"attn_entropy_l{i:02d}"], -(a * np.log(a)).sum(axis=1), rtol=1e-6)
        np.testing.assert_allclose(res[f"bos_mass_l{i:02d}"], a[:, 0], rtol=1e-5)


def test_several_layers_are_averaged_before_the_entropy(tiny_model):
    """ScoreConfig with two layers: a = (a_l1 + a_l3) / 2 (equal weights), then E."""
    layers = cross_attention_layers(tiny_model.unet)
    chosen = (layers[1], layers[3])
    res = Scorer(tiny_model, ScoreConfig("attention_entropy", chosen)).score(PROMPTS)
    x, cond, _ = _by_hand(tiny_model, PROMPTS)
    with CrossAttentionCapture(tiny_model.unet, list(chosen), early_exit=False) as cap, torch.no_grad():
        probs = cap.run(lambda: tiny_model.unet(x, 981, encoder_hidden_states=cond))
    a = (probs[chosen[0]].double().numpy() + probs[chosen[1]].double().numpy()) / 2
    np.testing.assert_allclose(res["attn_entropy"], -(a * np.log(a)).sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(res["bos_mass"], a[:, 0], rtol=1e-5)



def test_layer_entropies_average_the_noise_draws(tiny_model):
    """eval --layers all with K = 2: a per layer is the mean over the 2 draws, then E."""
    from audit.evaluate import layer_entropies

    scorer = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers), noise_draws=2))
    layers = cross_attention_layers(tiny_model.unet)
    got = layer_entropies(scorer, PROMPTS, layers, batch_size=4)
    x, cond, _ = _by_hand(tiny_model, PROMPTS, k=2)
    with CrossAttentionCapture(tiny_model.unet, layers, early_exit=False) as cap, torch.no_grad():
        probs = cap.run(lambda: tiny_model.unet(x, 981, encoder_hidden_states=cond))
    for name in layers:
        a = probs[name].double().numpy().reshape(2, 2, -1).mean(axis=1)
        np.testing.assert_allclose(got[name], -(a * np.log(a)).sum(axis=1), rtol=1e-6)
