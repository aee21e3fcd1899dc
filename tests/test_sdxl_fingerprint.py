"""An SDXL folder's score-changing settings outside its fingerprinted components (model_index.json's
force_zeros_for_empty_prompt, the VAE scale factor that sizes time_ids) are in its model fingerprint, so that a
score cache, a calibration or a resumed run made with one of them is never taken for the other's. Before, two
folders with the same weights but another unconditional branch or time_ids size had one fingerprint: a shared
--cache served one's risks for the other. Folders at SDXL base's values, and every other family, keep the
fingerprint they had. Tiny seeded SDXL model (test_families.build_sdxl), CPU only."""

from __future__ import annotations

import json
import shutil

import pytest

from audit.errors import ModelError
from audit.models import read_identity
from audit.models.base import (earlier_fingerprint_note, fingerprint_files, sdxl_vae_scale_factor,
                               settings_outside_components)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from test_families import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


def _edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_sdxl_base_values_keep_the_fingerprint_of_the_files(sdxl_dir, tmp_path):
    assert settings_outside_components(sdxl_dir) == {}
    assert fingerprint_files(sdxl_dir) == fingerprint_files(sdxl_dir, index=False)
    explicit = shutil.copytree(sdxl_dir, tmp_path / "m")
    _edit_json(explicit / "model_index.json", force_zeros_for_empty_prompt=True)  # as SDXL base's index says it
    (explicit / "vae").mkdir()
    (explicit / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))  # 2**3 = 8
    assert settings_outside_components(explicit) == {}
    assert fingerprint_files(explicit) == fingerprint_files(explicit, index=False)


def test_force_zeros_off_and_another_vae_scale_change_the_fingerprint(sdxl_dir, tmp_path):
    base = read_identity(str(sdxl_dir)).fingerprint
    empty = shutil.copytree(sdxl_dir, tmp_path / "empty")
    _edit_json(empty / "model_index.json", force_zeros_for_empty_prompt=False)
    assert settings_outside_components(empty) == {"force_zeros_for_empty_prompt": False}
    small = shutil.copytree(sdxl_dir, tmp_path / "small")
    (small / "vae").mkdir()
    (small / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64, 64]}))
    assert sdxl_vae_scale_factor(small) == 4
    assert settings_outside_components(small) == {"vae_scale_factor": 4}
    prints = {base, read_identity(str(empty)).fingerprint, read_identity(str(small)).fingerprint}
    assert len(prints) == 3
    # the same weights: what an earlier memaudit computed for them is the files' fingerprint, and the note says so
    note = earlier_fingerprint_note(empty, base)
    assert note == (f"an earlier memaudit fingerprinted this model's same files as [{base}], before the fingerprint "
                    "also covered memaudit.json's score settings, sentencepiece tokenizer files and SDXL's "
                    "model_index.json and VAE settings, or left out weight files the load does not read (a fp16 "
                    "variant beside the weights)")


def test_the_settings_do_not_touch_other_families(tiny_model_dir, tmp_path):
    """An SD 1.x folder's model_index.json with the key, or a 3-level VAE (the tiny test models have one), changes
    nothing: the SD 1.x adapter reads neither."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    before = fingerprint_files(model)
    _edit_json(model / "model_index.json", force_zeros_for_empty_prompt=False)
    (model / "vae").mkdir(exist_ok=True)
    (model / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64, 64]}))
    assert settings_outside_components(model) == {}
    assert fingerprint_files(model) == before


def test_a_vae_config_without_block_out_channels_is_a_model_error_naming_it(sdxl_dir, tmp_path):
    """It was a KeyError traceback at load."""
    model = shutil.copytree(sdxl_dir, tmp_path / "m")
    (model / "vae").mkdir()
    (model / "vae" / "config.json").write_text(json.dumps({"latent_channels": 4}))
    with pytest.raises(ModelError, match=r"vae/config.json: no block_out_channels list, which sizes SDXL's time_ids"):
        read_identity(str(model))


def test_a_shared_cache_does_not_serve_one_vae_scales_risks_for_the_other(sdxl_dir, tmp_path):
    """time_ids enter the conditional branch, so the default scorer's risks differ between the two folders; the
    second folder's run through the first's cache scores every prompt again and equals its run without a cache."""
    import pyarrow.parquet as pq

    from helpers import prompts_file, run_audit

    small = shutil.copytree(sdxl_dir, tmp_path / "small")
    (small / "vae").mkdir()
    (small / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64, 64]}))
    src = prompts_file(tmp_path / "p.txt", 6, seed=3)
    kw = dict(unit_rows=6, batch_size=6, device="cpu", dtype="float32")
    first, _ = run_audit([src], sdxl_dir, tmp_path / "a", cache=str(tmp_path / "cache"), **kw)
    through, _ = run_audit([src], small, tmp_path / "b", cache=str(tmp_path / "cache"), **kw)
    alone, _ = run_audit([src], small, tmp_path / "c", **kw)

    def risks(run):
        return dict(zip(*pq.read_table(run / "risk.parquet", columns=["prompt_id", "risk"]).to_pydict().values()))

    assert risks(through) == risks(alone)
    assert all(risks(first)[k] != v for k, v in risks(alone).items())
