"""Session 54's ufixcache list, checked: a compacted score cache keeps what each row was scored with (two runs at
different batch sizes sharing a cache, a compaction, then a third run served by it), and the model fingerprint
leaves out a LoRA or fp16 variant beside the weights while keeping audit.tiny's recorded value."""

from __future__ import annotations

import torch

from helpers import prompts_file, run_audit


def test_a_run_served_by_a_compacted_cache_reports_only_its_rows_batch_size(tmp_path, tiny_model_dir):
    """Two runs filled one cache at batch 4 and at batch 8; a compaction merged every part into one that recorded
    both batch sizes, so a third run served only batch-4 rows reported batch sizes 4 and 8 (mixed: its report and a
    diff warned of float rounding between settings it was never scored with). Each merged part now holds the rows
    of one record: the third run reports batch 4 alone, and a run served rows of both is still told it is mixed."""
    from audit.cache import ScoreCache

    first = prompts_file(tmp_path / "a.txt", 12, seed=0)
    second = prompts_file(tmp_path / "b.txt", 12, seed=1)
    assert not set(first.read_text().splitlines()) & set(second.read_text().splitlines())
    cache = tmp_path / "xc"
    _, ma = run_audit([first], tiny_model_dir, tmp_path / "ra", device="cpu", batch_size=4, cache=str(cache))
    _, mb = run_audit([second], tiny_model_dir, tmp_path / "rb", device="cpu", batch_size=8, cache=str(cache))
    assert (ma["cache"]["scored"], mb["cache"]["scored"]) == (12, 12)
    (folder,) = [d for d in cache.iterdir() if d.is_dir()]
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) >= 2
    compacted = ScoreCache.existing(str(cache), folder.name)
    assert compacted.compact(max_files=1) == len(parts)
    assert len(compacted.files()) == 2  # one part per batch size, not one claiming both
    device = f"cpu:{torch.get_num_threads()}"
    _, mc = run_audit([first], tiny_model_dir, tmp_path / "rc", device="cpu", batch_size=8, cache=str(cache))
    assert (mc["cache"]["hits"], mc["cache"]["scored"]) == (12, 0)
    assert mc["scored_with"] == {"batch_size": [4], "compile": [False], "device": [device], "engine": ["local"],
                                 "mixed": []}
    _, md = run_audit([first, second], tiny_model_dir, tmp_path / "rd", device="cpu", batch_size=8,
                      cache=str(cache))
    assert (md["cache"]["hits"], md["cache"]["scored"]) == (24, 0)
    assert sorted(md["scored_with"]["batch_size"]) == [4, 8] and md["scored_with"]["mixed"] == ["batch_size"]


def _every_file_fingerprint(root) -> str:
    """The fingerprint as memaudit computed it before e572420, written out here independently of audit: SHA-256 over
    ``component/name\0`` and the bytes of every .safetensors, .json, .txt and .model file of the scoring components,
    in sorted order, first 16 hex characters (a folder without memaudit.json or SDXL settings). Computed, not a
    recorded constant: audit.tiny's files hold the installed diffusers' version, so a recorded value would change
    with an upgrade that changes no fingerprint rule."""
    import hashlib

    digest = hashlib.sha256()
    for comp in ("tokenizer", "text_encoder", "unet", "scheduler", "tokenizer_2", "text_encoder_2", "tokenizer_3",
                 "text_encoder_3", "transformer"):
        d = root / comp
        if d.is_dir():
            for p in sorted(p for p in d.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".txt",
                                                                                    ".model")):
                digest.update(f"{comp}/{p.name}\0".encode() + p.read_bytes())
    return digest.hexdigest()[:16]


def test_the_tiny_folders_fingerprint_is_its_earlier_value_with_a_lora_or_variant_beside_its_weights(
        tmp_path, tiny_model_dir):
    """A LoRA file or a fp16 variant lying in a component folder beside the plain weights is not loaded
    (model_notes warns of it); adding it left the cache and every calibration refusing the folder. The fingerprint
    is the folder's fingerprint before the change (computed here independently) with and without them, and the old
    rule's value (every file) is explained."""
    import shutil

    from audit.models.base import earlier_fingerprint_note, fingerprint_files, model_notes, unloaded_files

    root = tmp_path / "m"
    shutil.copytree(tiny_model_dir, root)
    before = _every_file_fingerprint(root)  # the folder's fingerprint before unloaded files were left out
    assert fingerprint_files(root) == before
    unet = root / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "pytorch_lora_weights.safetensors")
    shutil.copy(root / "text_encoder" / "model.safetensors", root / "text_encoder" / "model.fp16.safetensors")
    assert [p.name for p in unloaded_files(root / "unet")] == ["pytorch_lora_weights.safetensors"]
    assert fingerprint_files(root) == before
    old = fingerprint_files(root, loaded_only=False)
    assert old != before and old == _every_file_fingerprint(root)
    assert "left out weight files the load does not read" in earlier_fingerprint_note(root, old)
    (note,) = [n for n in model_notes("m", root, ("text_encoder", "unet"), config_keys=False) if "not loaded" in n]
    assert "text_encoder/model.fp16.safetensors, unet/pytorch_lora_weights.safetensors" in note
