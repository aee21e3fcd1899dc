"""Findings of the ucmp new-user trial (one fine-tuning run's checkpoints scored side by side)."""

import json

from audit.pipeline import refusal


def _identity(fp):
    return {"schema_version": 2, "inputs": ["p.txt"], "files": {}, "units": 1, "prompt_column": "prompt",
            "model_fingerprint": fp, "score_config": {"scorer": "attention_entropy"}}


def test_refusal_of_another_checkpoint_names_both_models(tmp_path):
    """Rerunning another checkpoint into a finished run's --out said only two fingerprints; it names the models."""
    (tmp_path / "manifest.json").write_text(json.dumps({"model": {"name": "ckpt-1k", "fingerprint": "aaaa"}}))
    why = refusal(tmp_path, _identity("aaaa"), _identity("bbbb"), model_path="models/ckpt-2k")
    assert "It was scored with model ckpt-1k [aaaa]; this command names model models/ckpt-2k [bbbb]" in why
    assert "another model or checkpoint" in why


def test_refusal_without_manifest_names_the_fingerprint(tmp_path):
    """A folder whose run wrote no manifest (killed early) still says which model the command names."""
    why = refusal(tmp_path, _identity("aaaa"), _identity("bbbb"), model_path="ck2k")
    assert "It was scored with a model with fingerprint aaaa; this command names model ck2k [bbbb]" in why


def test_refusal_names_a_model_name_visibly(tmp_path):
    """A model name with a control character is shown escaped, as every name memaudit prints."""
    (tmp_path / "manifest.json").write_text(json.dumps({"model": {"name": "ck\x1b[2J", "fingerprint": "aaaa"}}))
    why = refusal(tmp_path, _identity("aaaa"), _identity("bbbb"), model_path="ck2k")
    assert "\x1b" not in why
