"""audit.models.base's checks and small helpers (model folders, fingerprint, memaudit.json settings,
scheduler bounds, prediction type, safetensors-only weights, devices), each pinned by a value derived by hand.
CPU only, no network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from audit.errors import ModelError


# ---------------------------------------------------------------- model folder, device, memaudit.json

def test_a_name_that_is_neither_a_folder_nor_owner_slash_name_is_refused_without_the_hub(tmp_path, monkeypatch):
    """``--model nosuchfolder`` (no slash, not there) is refused as "not a hub id" before any hub call (it must
    not be sent to snapshot_download, which would answer offline with another message, online with a 404)."""
    import huggingface_hub

    from audit.models import resolve_model_dir

    called = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: called.append(a) or str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("nosuchfolder", "a/b/c"):
        with pytest.raises(ModelError, match="no such folder, and not a hub id of the form owner/name"):
            resolve_model_dir(name)
    assert called == []


def test_a_file_given_as_the_model_is_not_a_model_folder(tmp_path):
    from audit.models import resolve_model_dir

    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError, match="model.safetensors: not a folder in diffusers layout"):
        resolve_model_dir(str(tmp_path / "model.safetensors"))


def test_mps_that_is_not_there_is_a_model_error(monkeypatch):
    from audit.models import resolve_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ModelError, match="--device mps: no Apple MPS device is available"):
        resolve_device("mps")


def test_memaudit_json_default_layers_with_an_empty_name_is_refused(tmp_path):
    from audit.models import read_extra

    (tmp_path / "memaudit.json").write_text(json.dumps({"default_layers": ["down_blocks.0.attentions.0.x", ""]}))
    with pytest.raises(ModelError, match=r"default_layers must be a list of layer names \(got a list holding "
                                         r"other values\)"):
        read_extra(tmp_path)


# ---------------------------------------------------------------- fingerprint

def _folder(root, files):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_fingerprint_covers_tokenizer_text_files_and_their_component(tmp_path):
    """The fingerprint is over names (component/file) and contents of .safetensors, .json and .txt files: a
    changed merges.txt changes it, and so does the same file under another component folder."""
    from audit.models import fingerprint_files

    base = {"tokenizer/merges.txt": b"#version: 0.2\na b\n", "unet/config.json": b"{}"}
    a = fingerprint_files(_folder(tmp_path / "a", base))
    b = fingerprint_files(_folder(tmp_path / "b", base | {"tokenizer/merges.txt": b"#version: 0.2\nb a\n"}))
    moved = {"tokenizer_2/merges.txt": base["tokenizer/merges.txt"], "unet/config.json": b"{}"}
    c = fingerprint_files(_folder(tmp_path / "c", moved))
    assert len({a, b, c}) == 3
    # and exactly the documented hash: sha256 over "<component>/<file>\0" + bytes, sorted per component
    import hashlib

    d = hashlib.sha256()
    for rel in ("tokenizer/merges.txt", "unet/config.json"):  # FINGERPRINTED order: tokenizer before unet
        d.update(f"{rel}\0".encode())
        d.update(base[rel])
    assert a == d.hexdigest()[:16]


# ---------------------------------------------------------------- declared UNet mask

def test_declared_mask_refuses_an_unknown_value_and_bare_ids():
    from audit.models.base import declared_encoder_mask

    mask = torch.tensor([[1, 1, 1, 0, 0]])
    with pytest.raises(ModelError, match="unknown unet_encoder_attention_mask 'all_tokens'"):
        declared_encoder_mask({"unet_encoder_attention_mask": "all_tokens"}, mask)
    with pytest.raises(ModelError, match="pass Tokens"):
        declared_encoder_mask({"unet_encoder_attention_mask": "bos_and_prompt_tokens"}, None)
    got = declared_encoder_mask({"unet_encoder_attention_mask": "bos_and_prompt_tokens"}, mask)
    assert got.tolist() == [[1, 1, 0, 0, 0]]  # BOS and the prompt token; EOS and padding masked
    assert declared_encoder_mask({}, None) is None


# ---------------------------------------------------------------- components

def test_pickled_transformer_weights_are_refused_like_a_unets(tmp_path):
    """check_components refuses a transformer/ (PixArt, SD 3.x) with no .safetensors weights, as it does unet/."""
    from audit.models.base import check_components
    from audit.models.pixart import PIXART_COMPONENTS

    root = _folder(tmp_path / "m", {"tokenizer/tokenizer_config.json": b"{}",
                                    "text_encoder/model.safetensors": b"x", "scheduler/scheduler_config.json": b"{}",
                                    "transformer/config.json": b"{}",
                                    "transformer/diffusion_pytorch_model.bin": b"pickle"})
    with pytest.raises(ModelError, match=r"transformer/ has no \.safetensors weights"):
        check_components("m", root, "PixArtAlphaPipeline", PIXART_COMPONENTS)


# ---------------------------------------------------------------- schedulers

def test_num_train_timesteps_bounds_are_1_and_100000_inclusive():
    from audit.models.base import check_scheduler_config

    for ok in (1, 1000, 100_000):
        check_scheduler_config({"num_train_timesteps": ok})
    for bad in (0, -1, 100_001):
        with pytest.raises(ModelError, match=f"num_train_timesteps {bad} is not a whole number from 1 to 100,000"):
            check_scheduler_config({"num_train_timesteps": bad})


def test_every_flow_matching_scheduler_class_is_refused_for_ddpm_families():
    from audit.models import SD1, SD2

    for cls in ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        for adapter in (SD1, SD2):
            with pytest.raises(ModelError, match=f"scheduler {cls}: a flow-matching schedule"):
                adapter.scheduler({"_class_name": cls, "num_train_timesteps": 1000}, 50)


def _sigma(t: int) -> float:
    """Karras sigma of SD's scaled_linear schedule (beta 0.00085 to 0.012) at integer timestep t, by hand."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ab = np.cumprod(1 - betas)[t]
    return float(((1 - ab) / ab) ** 0.5)


@pytest.mark.parametrize("spacing, t0", [("linspace", 999), ("leading", 981)])
def test_first_input_is_the_pipelines_euler_latent_scaled_for_the_unet(spacing, t0):
    """The first denoiser input on an Euler folder (SD 2.0, SDXL) as the pipeline makes it: latents = noise *
    init_noise_sigma, then / sqrt(sigma_t0^2 + 1). With linspace spacing init_noise_sigma is sigma_max (= sigma at
    999): noise * s / sqrt(s^2 + 1); with leading spacing it is sqrt(s^2 + 1): the noise itself."""
    from audit.models import SD2

    config = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
              "timestep_spacing": spacing, "prediction_type": "epsilon"}
    sched = SD2.scheduler(config, 50)
    assert int(sched.timesteps[0]) == t0
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    x = SD2.first_input(sched, noise, sched.timesteps[0])
    s = _sigma(t0)
    factor = s / (s * s + 1) ** 0.5 if spacing == "linspace" else 1.0
    torch.testing.assert_close(x, noise * factor, rtol=1e-5, atol=1e-6)


def test_lms_is_one_of_the_schedulers_an_sd2_folder_may_name():
    from audit.models.sd2 import configured_scheduler

    sched = configured_scheduler({"_class_name": "LMSDiscreteScheduler", "beta_schedule": "scaled_linear",
                                  "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}, 50)
    assert type(sched).__name__ == "LMSDiscreteScheduler"


# ---------------------------------------------------------------- Conditioning batch operations

def test_conditioning_repeats_and_expands_its_mask_and_added_tensors():
    from audit.models.base import Conditioning

    c = Conditioning(torch.arange(6.0).view(1, 2, 3), torch.tensor([[1, 0]]), {"time_ids": torch.tensor([[7.0, 8.0]])})
    e = c.expand(3, -1, -1)
    assert e.shape == (3, 2, 3) and e.mask.tolist() == [[1, 0]] * 3 and e.added["time_ids"].tolist() == [[7.0, 8.0]] * 3
    two = Conditioning(torch.zeros(2, 2, 3), torch.tensor([[1, 0], [1, 1]]), {"t": torch.tensor([[1.0], [2.0]])})
    r = two.repeat_interleave(2, dim=0)
    assert r.mask.tolist() == [[1, 0], [1, 0], [1, 1], [1, 1]] and r.added["t"].flatten().tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError):
        two.repeat_interleave(2, dim=1)


def test_prediction_type_defaults_to_epsilon_when_the_scheduler_config_names_none():
    """diffusers' schedulers default to epsilon; a folder whose scheduler_config.json omits prediction_type (older
    SD 1.x exports) is an epsilon model, not v-prediction."""
    from types import SimpleNamespace

    from audit.models import SD1, SD2

    for adapter in (SD1, SD2):
        assert adapter.prediction_type(SimpleNamespace(scheduler_config={})) == "epsilon"
        assert adapter.prediction_type(SimpleNamespace(scheduler_config={"prediction_type": "v_prediction"})) \
            == "v_prediction"


def test_fingerprint_covers_a_sentencepiece_tokenizer_file(tmp_path, tiny_model_dir):
    """A T5 tokenizer kept as ``spiece.model`` (no tokenizer.json) is part of the model: two folders that differ
    only in it have different fingerprints, so a score cache or a calibration of one is never taken for the
    other's (the fingerprint hashed .safetensors, .json and .txt files only)."""
    import shutil

    from audit.models import fingerprint_files

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    before = fingerprint_files(model)
    (model / "tokenizer" / "spiece.model").write_bytes(b"one sentencepiece model")
    one = fingerprint_files(model)
    (model / "tokenizer" / "spiece.model").write_bytes(b"another sentencepiece model")
    assert len({before, one, fingerprint_files(model)}) == 3
