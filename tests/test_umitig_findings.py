"""Findings of a new-user trial (session 44, umitig): memaudit's mitigation used from a user's own Python code
(a diffusers pipeline, a calibration from `memaudit calibrate`, a fine-tuning loop).

Tiny seeded models (audit.tiny): random weights exercise the code paths and the exact formulas."""

from __future__ import annotations

import json

import pytest
import torch

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


def _calibration(tmp_path, **score_config):
    """A valid `memaudit calibrate` file (3 reference risks 1, 2, 3 at fpr 0.5: threshold 2.0) for the tiny model."""
    sc = {"scorer": "attention_entropy", "layers": [LAYER], "noise_draws": 1, "seed": 0, "num_inference_steps": 50,
          "dtype": "float32", "first_timestep": 981} | score_config
    cal = {"kind": "memaudit.calibration", "version": 2, "fpr": 0.5, "threshold": 2.0,
           "model": {"name": "tiny", "fingerprint": "0123456789abcdef"}, "score_config": sc,
           "reference": {"size": 3}, "reference_cdf": {"risk": [1.0, 2.0, 3.0], "at_or_below": [1, 2, 3]}}
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    return path


def _batch(tok, te, t):
    ids = tok(["a red cat", "an old boat on the lake"], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        c = te(ids)[0]
    g = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return c, latents, noise, torch.as_tensor(t)


def test_training_filter_from_calibration_scores_at_the_calibrated_timestep(parts, tmp_path):
    """The documented training step applied a threshold calibrated at t0 = 981 (`memaudit calibrate`: pure noise
    at the first DDIM step) to the entropy at the batch's random training timesteps, where the entropy's scale
    differs (on the lab model a 5% FPR threshold flagged 13% of ordinary samples at random timesteps, 32% at
    t = 10). MemorizationFilter.from_calibration takes the file's threshold, layers and timestep, and refuses a
    batch scored elsewhere; at t0 its scores are the hand-built filter's."""
    from diffusers import DDPMScheduler

    from audit.mitigation.training import MemorizationFilter

    tok, te, unet, _, _ = parts
    filt = MemorizationFilter.from_calibration(_calibration(tmp_path))
    assert (filt.threshold, filt.score, filt.layers, filt.timestep) == (2.0, "attention_entropy", [LAYER], 981)
    assert MemorizationFilter.from_calibration(json.loads((tmp_path / "cal.json").read_text())).timestep == 981
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    c, latents, noise, t = _batch(tok, te, [10, 700])
    with pytest.raises(ValueError, match=r"calibrated at timestep 981, and the batch is scored at timesteps 10, 700: "
                                         r"the score's scale depends on t"):
        filt(unet, c, sched.add_noise(latents, noise, t), t)
    mixed = torch.tensor([981, 10])  # one sample at t0 is not the batch at t0
    with pytest.raises(ValueError, match="scored at timesteps 10, 981: "):
        filt(unet, c, sched.add_noise(latents, noise, mixed), mixed)
    with pytest.raises(ValueError, match="calibrated at timestep 981"):  # the zero-cost capture: the same check
        with filt.capturing(unet) as cap:
            unet(sched.add_noise(latents, noise, t), t, c)
        filt.from_capture(cap)
    t0 = torch.full_like(t, filt.timestep)
    x0 = sched.add_noise(latents, noise, t0)
    res = filt(unet, c, x0, t0)
    hand = MemorizationFilter(2.0, layers=[LAYER])(unet, c, x0, t0)  # no timestep: scores where it is told
    assert torch.equal(res.scores, hand.scores) and res.keep.tolist() == (hand.scores <= 2.0).tolist()
    with filt.capturing(unet) as cap:  # a forward at t0 itself passes
        unet(x0, t0, c)
    assert torch.allclose(filt.from_capture(cap).scores, hand.scores, rtol=0, atol=1e-6)


def test_training_filter_from_calibration_refusals(tmp_path):
    """A calibration the filter cannot apply is refused in one line naming why."""
    from audit.mitigation.training import MemorizationFilter

    with pytest.raises(ValueError, match="is for scorer 'guidance_geometry'; the training filter scores "
                                         "attention_entropy or noise_magnitude"):
        MemorizationFilter.from_calibration(_calibration(tmp_path, scorer="guidance_geometry"))
    with pytest.raises(ValueError, match="averages 4 noise draws; a training sample has one"):
        MemorizationFilter.from_calibration(_calibration(tmp_path, noise_draws=4))
    with pytest.raises(ValueError, match="records no first_timestep"):
        MemorizationFilter.from_calibration(_calibration(tmp_path, first_timestep=None))
    with pytest.raises(ValueError, match="layers: set by the calibration"):
        MemorizationFilter.from_calibration(_calibration(tmp_path), layers=["x"])
    with pytest.raises(ValueError, match="noise_magnitude needs uncond_embeddings"):
        MemorizationFilter.from_calibration(_calibration(tmp_path, scorer="noise_magnitude"))
    nm = MemorizationFilter.from_calibration(_calibration(tmp_path, scorer="noise_magnitude"),
                                             uncond_embeddings=torch.zeros(1, 77, 32))
    assert (nm.score, nm.layers, nm.timestep, nm.threshold) == ("noise_magnitude", None, 981, 2.0)
    with pytest.raises(ValueError, match="timestep must be a non-negative integer"):
        MemorizationFilter(2.0, timestep=981.5)


def _call(pipe, prompts, steps=3, **kw):
    g = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, generator=g, output_type="np", **kw).images


def test_detect_and_mitigate_calibration_checks_each_call(pipe, tmp_path):
    """From Python, DetectAndMitigate took only a threshold, so a call at another num_inference_steps, with another
    scheduler (DPM-Solver's linspace spacing starts at 999, the calibration's DDIM at 981) or in another dtype
    applied the calibrated threshold to another first step without a word (`memaudit generate` refuses all three).
    With calibration=, the call is refused at its first UNet forward, before any step; a matching call flags
    exactly as threshold= and layers= from the same file."""
    from diffusers import DPMSolverMultistepScheduler

    from audit.mitigation import DetectAndMitigate, MitigationError

    prompts = ["a red cat", "an old boat on the lake at sunset"]
    with DetectAndMitigate(pipe, threshold=0.0, layers=[LAYER], mode="off") as probe:  # the entropies at 3 steps
        _call(pipe, prompts)
    tau = float(probe.entropy.mean())  # between the two: one prompt flagged, one not
    assert probe.entropy.min() < tau < probe.entropy.max()
    cal = json.loads(_calibration(tmp_path, num_inference_steps=3, first_timestep=667).read_text())
    cal["threshold"] = tau
    with DetectAndMitigate(pipe, calibration=cal) as dm:
        images = _call(pipe, prompts)
    with DetectAndMitigate(pipe, threshold=tau, layers=[LAYER]) as ref:
        expected = _call(pipe, prompts)
    assert dm.flagged.tolist() == ref.flagged.tolist() == (probe.entropy > tau).tolist()
    assert sorted(dm.flagged.tolist()) == [False, True] and (images == expected).all()
    assert dm.detect_layers == [LAYER] and dm.threshold == tau
    with DetectAndMitigate(pipe, calibration=cal) as dm, pytest.raises(
            MitigationError, match=r"scored at first timestep 667; this call's first step is at 751 \(another "
                                   r"num_inference_steps or scheduler\), where its threshold does not apply: call "
                                   r"with the calibration's num_inference_steps \(3\)"):
        _call(pipe, prompts, steps=4)
    assert dm.forwards == 0  # refused before the first step
    dpm = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(dpm.config, timestep_spacing="linspace")
    try:
        with DetectAndMitigate(pipe, calibration=cal) as dm, pytest.raises(
                MitigationError, match="scored at first timestep 667; this call's first step is at 999"):
            _call(pipe, prompts)
    finally:
        pipe.scheduler = dpm
    cal16 = cal | {"score_config": cal["score_config"] | {"dtype": "bfloat16"}}
    with DetectAndMitigate(pipe, calibration=cal16) as dm, pytest.raises(
            MitigationError, match="calibration was scored in bfloat16; this UNet runs in float32"):
        _call(pipe, prompts)
    with DetectAndMitigate(pipe, calibration=cal, mode="always") as dm:  # no detection: nothing to check
        _call(pipe, prompts, steps=4)
    assert dm.mitigated.tolist() == [True, True]
    with pytest.raises(MitigationError, match="give calibration, or threshold and layers, not both"):
        DetectAndMitigate(pipe, calibration=cal, threshold=tau)
    with pytest.raises(MitigationError, match="is for scorer 'noise_magnitude'"):
        DetectAndMitigate(pipe, calibration=cal | {"score_config": cal["score_config"] | {"scorer": "noise_magnitude"}})
    path = _calibration(tmp_path, num_inference_steps=3, first_timestep=667)  # a path: threshold 2.0 flags none
    with DetectAndMitigate(pipe, calibration=path) as dm:
        _call(pipe, prompts)
    assert dm.threshold == 2.0 and dm.flagged.tolist() == (probe.entropy > 2.0).tolist()


def test_one_step_generation_reports_flagged_images_unmitigated(pipe, gen_pipeline, tmp_path):
    """In "flagged" mode the rule applies from the second UNet forward, so a one-step call mitigates nothing; yet
    dm.mitigated (and `memaudit generate --steps 1 --mitigate flagged`'s `mitigated` column and summary) said True
    for every flagged image, whose pixels equal the unmitigated image's. It now says True only where a mitigated
    forward ran."""
    import polars as pl

    from audit.cli.generate import run_generate
    from audit.mitigation import DetectAndMitigate

    prompts = ["a red cat", "an old boat on the lake at sunset"]
    with DetectAndMitigate(pipe, threshold=0.0, layers=[LAYER]) as dm:  # threshold 0: every image flagged
        _call(pipe, prompts, steps=1)
    assert dm.flagged.tolist() == [True, True] and dm.mitigated.tolist() == [False, False] and dm.forwards == 1
    with DetectAndMitigate(pipe, threshold=0.0, layers=[LAYER]) as dm:
        _call(pipe, prompts, steps=2)
    assert dm.flagged.tolist() == [True, True] and dm.mitigated.tolist() == [True, True]
    with DetectAndMitigate(pipe, threshold=0.0, layers=[LAYER], mode="always") as dm:  # from step 0: one step is one
        _call(pipe, prompts, steps=1)
    assert dm.mitigated.tolist() == [True, True]

    from audit.models import fingerprint_files

    model_dir, (gpipe, loaded) = gen_pipeline
    cal = json.loads(_calibration(tmp_path, num_inference_steps=1, first_timestep=1,
                                  layers=list(loaded.default_layers)).read_text())
    cal["threshold"], cal["reference_cdf"]["risk"] = 0.0, [-1.0, 0.0, 1.0]  # flags every image
    cal["model"]["fingerprint"] = fingerprint_files(model_dir)
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    (tmp_path / "p.txt").write_text("a red cat\nblue sky\n")
    summary = run_generate(tmp_path / "p.txt", str(model_dir), tmp_path / "gen", mitigate="flagged",
                           calibration=tmp_path / "cal.json", steps=1, _pipeline=(gpipe, loaded))
    rows = pl.read_parquet(tmp_path / "gen" / "generations.parquet")
    assert rows["flagged"].to_list() == [True, True] and rows["mitigated"].to_list() == [False, False]
    assert (summary["flagged"], summary["mitigated"], summary["images"]) == (2, 0, 2)


def test_generate_fetches_the_vae_weights_of_a_hub_model(gen_pipeline, tmp_path, monkeypatch):
    """`memaudit generate --model owner/name` (a hub id, as the help says it takes) fetched only what scoring reads,
    the VAE's config but not its weights, then refused every hub model: "no vae/ folder with .safetensors weights".
    The hub is replaced by a copy of a local folder, filtered by the allow_patterns asked for (no network)."""
    import fnmatch
    import shutil

    import huggingface_hub

    from audit.cli.generate import build_pipeline

    model_dir, _ = gen_pipeline
    asked = []

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        asked.append(allow_patterns)
        snap = tmp_path / "hub" / repo_id.replace("/", "--")
        for f in model_dir.rglob("*"):
            rel = f.relative_to(model_dir).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, snap / rel)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.chdir(tmp_path)
    pipe, loaded = build_pipeline("owner/tiny-sd", device="cpu", dtype="float32")
    assert loaded.name == "owner/tiny-sd" and type(pipe.vae).__name__ == "AutoencoderKL"
    assert "vae/*.safetensors" in asked[0]
    assert (tmp_path / "hub" / "owner--tiny-sd" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_generate_names_the_model_family_it_refuses(gen_pipeline, tmp_path):
    """An SDXL, PixArt or SD 3.x folder was loaded whole (weights hashed and read) and then refused as
    "StableDiffusionPipeline: unet is a PixArtTransformer2DModel" or "...: a second text encoder (SDXL family)",
    naming the class generate had built rather than the folder's. It is refused first, naming the declared class."""
    import shutil

    from audit.cli.generate import GenerateError, build_pipeline

    model_dir, _ = gen_pipeline
    for cls in ("StableDiffusionXLPipeline", "PixArtAlphaPipeline", "StableDiffusion3Pipeline"):
        folder = tmp_path / cls
        shutil.copytree(model_dir, folder)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": cls}))
        with pytest.raises(GenerateError, match=f"model_index.json declares {cls}; generate makes images with "
                                                r"StableDiffusionPipeline, for Stable Diffusion 1.x/2.x folders only"):
            build_pipeline(str(folder), device="cpu", dtype="float32")


def test_training_filter_refuses_a_transformer_denoiser(family_models):
    """A PixArt transformer passed as the UNet was refused with "encoder_hidden_states have width 32; this UNet's
    cross_attention_dim is 24" (its captions are projected first: 24 is internal), and with width 24 failed inside
    diffusers (its forward takes encoder_hidden_states second). It is refused naming the class."""
    from audit.mitigation.training import MemorizationFilter

    tr = family_models["pixart"].unet
    c, x = torch.randn(2, 120, 32), torch.randn(2, 4, 8, 8)
    with pytest.raises(TypeError, match="PixArtTransformer2DModel is a transformer denoiser: the training filter "
                                        "scores a UNet2DConditionModel"):
        MemorizationFilter(1.0)(tr, c, x, torch.tensor([981, 981]))
    with pytest.raises(TypeError, match="PixArtTransformer2DModel is a transformer denoiser"):
        with MemorizationFilter(1.0).capturing(tr):
            pass

    class Wrapped(torch.nn.Module):  # as DDP or accelerate wrap it (.module)
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    with pytest.raises(TypeError, match="PixArtTransformer2DModel is a transformer denoiser"):
        MemorizationFilter(1.0)(Wrapped(tr), c, x, torch.tensor([981, 981]))


def test_detect_and_mitigate_refuses_a_calibration_of_another_model(gen_pipeline, tmp_path):
    """A calibration made for another model applied its threshold to this one's entropies without a word. With
    calibration=, a pipeline loaded from a local folder (from_pretrained records it in pipe.name_or_path) is checked
    against the calibration's fingerprint, memaudit run's fingerprint of that folder."""
    from diffusers import StableDiffusionPipeline

    from audit.mitigation import DetectAndMitigate, MitigationError
    from audit.models import fingerprint_files

    model_dir, (_, loaded) = gen_pipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert loaded.fingerprint == fingerprint_files(model_dir)
    cal = json.loads(_calibration(tmp_path, num_inference_steps=3, first_timestep=667,
                                  layers=list(loaded.default_layers)).read_text())  # fingerprint 0123456789abcdef
    with pytest.raises(MitigationError, match=rf"made for another model \[0123456789abcdef\], not this pipeline's "
                                              rf"{model_dir} \[{loaded.fingerprint}\]"):
        DetectAndMitigate(pipe, calibration=cal)
    cal["model"]["fingerprint"] = loaded.fingerprint
    with DetectAndMitigate(pipe, calibration=cal) as dm:
        _call(pipe, ["a red cat"])
    assert dm.flagged.tolist() == [True]  # threshold 2.0 < ln 77 ~ 4.34 on random weights

    import shutil

    from audit.mitigation.detect import folder_fingerprint

    copy = tmp_path / "copy"  # the fingerprint is computed once per process, but again when a file changes
    shutil.copytree(model_dir, copy)
    assert folder_fingerprint(copy) == loaded.fingerprint
    with open(copy / "scheduler" / "scheduler_config.json", "a") as fh:
        fh.write(" ")
    assert folder_fingerprint(copy) == fingerprint_files(copy) != loaded.fingerprint


def test_noise_magnitude_filter_from_calibration_refuses_the_training_forwards_prediction(parts, tmp_path):
    """docs/mitigation.md says to pass the training forward's model_pred to Wen's filter; with a filter scoring at
    its calibration's t0 that prediction is at the batch's own timesteps, and d mixed eps(x_t, c) at t with
    eps(x_t0, "") at t0 without a word. It is refused; without it the filter runs both forwards at t0, as a hand
    computation does."""
    from diffusers import DDPMScheduler

    from audit.mitigation.training import MemorizationFilter

    tok, te, unet, _, _ = parts
    with torch.no_grad():
        empty = te(tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    filt = MemorizationFilter.from_calibration(_calibration(tmp_path, scorer="noise_magnitude"),
                                               uncond_embeddings=empty)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    c, latents, noise, t = _batch(tok, te, [10, 700])
    with torch.no_grad():
        pred = unet(sched.add_noise(latents, noise, t), t, c).sample  # the training forward
    t0 = torch.full_like(t, filt.timestep)
    x0 = sched.add_noise(latents, noise, t0)
    with pytest.raises(ValueError, match="model_pred with a filter scoring at its calibration's timestep 981"):
        filt(unet, c, x0, t0, model_pred=pred)
    res = filt(unet, c, x0, t0)
    with torch.no_grad():
        hand = (unet(x0, t0, c).sample - unet(x0, t0, empty.expand(2, -1, -1)).sample).flatten(1).norm(dim=1)
    assert torch.allclose(res.scores, hand.double(), rtol=0, atol=1e-6)
    assert res.keep.tolist() == (hand < 2.0).tolist()


def test_sd2_euler_folder_generate_detects_with_its_calibration(family_folders, tmp_path):
    """An SD 2.0 folder (Euler, no timestep_spacing in its config: Euler's default linspace starts at 999, DDIM's
    leading at 981) is scored at 999, and `memaudit generate --mitigate flagged` refused each of its calibrations
    (it sampled with DDIM). generate now samples with the scheduler the scorer took and detects with them; a
    pipeline on another scheduler is still refused, saying which to sample with; from Python, a pipeline on the
    folder's own scheduler detects with that calibration."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from audit.cli.generate import build_pipeline, run_generate
    from audit.mitigation import DetectAndMitigate, MitigationError
    from audit.scorers import ScoreConfig, Scorer
    from audit.tiny import tiny_vae

    folder = tmp_path / "sd20"
    shutil.copytree(family_folders["sd2_v_euler"], folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.pop("timestep_spacing", None)  # as stabilityai/stable-diffusion-2 ships it
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    tiny_vae(0).save_pretrained(folder / "vae", safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"vae": ["diffusers", "AutoencoderKL"]}))
    pipe, loaded = build_pipeline(str(folder), device="cpu", dtype="float32")
    t0 = Scorer(loaded, ScoreConfig("attention_entropy", tuple(loaded.default_layers))).first_timestep
    assert t0 == 999
    cal = json.loads(_calibration(tmp_path, num_inference_steps=50, first_timestep=t0,
                                  layers=list(loaded.default_layers)).read_text())
    cal["model"]["fingerprint"] = loaded.fingerprint
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    (tmp_path / "p.txt").write_text("a red cat\n")
    summary = run_generate(tmp_path / "p.txt", str(folder), tmp_path / "gen", mitigate="flagged",
                           calibration=tmp_path / "cal.json", _pipeline=(pipe, loaded), progress=False,
                           log=lambda m: None)
    assert summary["images"] == 1 and summary["flagged"] == 1 and summary["mitigated"] == 1
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # starts at 981
    with pytest.raises(MitigationError, match=r"scored at first timestep 999; this generation's sampler starts at 981 "
                                              r"\(another scheduler or timestep spacing\), so its threshold does not "
                                              r"apply: sample with the scheduler the scorer took, as memaudit "
                                              r"generate does"):
        run_generate(tmp_path / "p.txt", str(folder), tmp_path / "gen2", mitigate="flagged",
                     calibration=tmp_path / "cal.json", _pipeline=(pipe, loaded))
    own = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    own.set_progress_bar_config(disable=True)
    assert type(own.scheduler).__name__ == "EulerDiscreteScheduler"
    with DetectAndMitigate(own, calibration=tmp_path / "cal.json") as dm:
        _call(own, ["a red cat"], steps=50)
    assert dm.flagged.tolist() == [True] and dm.mitigated.tolist() == [True]


def test_generate_refuses_a_calibration_with_mitigate_always(tmp_path):
    """`--mitigate always --calibration F` checked the calibration (a mismatched one refused the run) and then used
    nothing of it: always mitigates from step 0, so no first step is scored and nothing is flagged. The pair is
    refused before the model is looked for, naming both options; off and flagged keep their calibration."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.cli.generate import GenerateError, run_generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    cal = tmp_path / "cal.json"
    cal.write_text("{}")
    with pytest.raises(GenerateError, match=r"^--calibration with --mitigate always: every image is mitigated from "
                                            r"step 0, so no unmitigated first step is scored"):
        run_generate(prompts, str(tmp_path / "no-model"), tmp_path / "out", mitigate="always", calibration=cal)
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["generate", str(prompts), "--model", str(tmp_path / "no-model"), "--out",
                                   str(tmp_path / "o2"), "--mitigate", "always", "--calibration", str(cal)])
    assert res.exit_code == 2 and "--calibration with --mitigate always" in res.output
