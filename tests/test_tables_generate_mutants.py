"""What a mutation review of audit/tables.py (schemas, atomic writes, the finished-run check) and audit/cli/generate.py
(`memaudit generate`) found untested, and the bugs behind some of it. Tables are built by hand from the schemas,
generation is stubbed where no image is needed; CPU, seconds."""

from __future__ import annotations

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audit.cli import app


# --- audit/cli/generate.py --------------------------------------------------------------------------------------
def _row(i, seed, status="image", reason=None):
    """One generations row of prompt ``i`` (an image row unless ``status`` says otherwise)."""
    return {"prompt_index": i, "prompt": f"p{i}", "seed": seed,
            "image_path": f"images/{i:08d}_s{seed}.png" if status == "image" else None, "risk": 0.5,
            "flagged": None, "mitigated": False, "status": status, "reason": reason}


def _oom(i, prompt):
    raise RuntimeError("CUDA out of memory (simulated)")


OFF = {"mitigate": "off", "calibration": None}


def test_a_damaged_part_whose_prompt_fails_again_is_not_read_as_its_rows(tmp_path):
    """A part copied over from another prompt (or cut short) is generated again; when that generation failed, the
    failed placeholder was written beside the damaged part, and _finalize read the damaged part first: another
    prompt's rows listed twice (the failure hidden, 2 images counted for 1), or an ArrowInvalid traceback."""
    from audit.cli.generate import _finalize, _generate_missing

    (tmp_path / "parts").mkdir()
    rows_in = [("p0", None), ("p1", None)]
    assert _generate_missing(tmp_path, rows_in, 1, False, lambda i, p: [_row(i, 0)]) == 2
    parts = tmp_path / "parts"
    shutil.copy(parts / "00000000.parquet", parts / "00000001.parquet")  # prompt 0's part copied over prompt 1's
    assert _generate_missing(tmp_path, rows_in, 1, False, _oom) == 0
    assert sorted(p.name for p in parts.iterdir()) == ["00000000.parquet", "00000001.failed.parquet"]
    summary = _finalize(tmp_path, 2, 1, OFF, 0, 1.0)
    assert (summary["images"], summary["rejected_by_reason"]) == (1, {"generation_failed": 1})
    rows = pq.read_table(tmp_path / "generations.parquet").to_pylist()
    assert [(r["prompt_index"], r["status"]) for r in rows] == [(0, "image"), (1, "rejected")]
    assert rows[1]["reason"] == "generation_failed: RuntimeError: CUDA out of memory (simulated)"
    (parts / "00000001.parquet").write_bytes(b"PAR1 not a whole file")  # cut short, then fails again
    _generate_missing(tmp_path, rows_in, 1, False, _oom)
    assert _finalize(tmp_path, 2, 1, OFF, 0, 1.0)["rejected_by_reason"] == {"generation_failed": 1}
    # and once it generates, the placeholder goes
    assert _generate_missing(tmp_path, rows_in, 1, False, lambda i, p: [_row(i, 0)]) == 1
    assert sorted(p.name for p in parts.iterdir()) == ["00000000.parquet", "00000001.parquet"]


def test_the_rate_of_a_run_that_made_no_image_or_took_no_time_is_null(tmp_path):
    """this_run.images_per_second: the images over the seconds, null when none was made (a rerun that only merged)
    and when no time was measured (no division by zero)."""
    from audit.cli.generate import _finalize, _write_table_atomic

    (tmp_path / "parts").mkdir()
    _write_table_atomic([_row(0, 0), _row(0, 1)], tmp_path / "parts" / "00000000.parquet")
    for made, seconds, rate in ((2, 0.5, 4.0), (0, 2.0, None), (2, 0.0, None)):
        assert _finalize(tmp_path, 1, 2, OFF, made, seconds)["this_run"] == {
            "images": made, "seconds": seconds, "images_per_second": rate}


def test_a_folder_claimed_by_another_generate_meanwhile_is_refused(tmp_path):
    """check_out_dir saw no generate.json, but another process wrote one before this one took the lock: refused,
    and that process's options are kept (they were overwritten)."""
    from audit.cli.generate import GenerateError, _claim_folder

    theirs = {"seeds": 2, "steps": 50}
    (tmp_path / "generate.json").write_text(json.dumps(theirs))
    with pytest.raises(GenerateError, match=r"another memaudit generate made this folder its own meanwhile; rerun to "
                                            r"resume it with the same options, or use another --out"):
        _claim_folder(tmp_path, {"seeds": 1, "steps": 50}, None)
    assert json.loads((tmp_path / "generate.json").read_text()) == theirs
    (tmp_path / "new").mkdir()
    _claim_folder(tmp_path / "new", {"seeds": 1}, None)  # a new folder takes the options
    assert json.loads((tmp_path / "new" / "generate.json").read_text()) == {"seeds": 1}


def test_read_prompts_keeps_a_non_string_value_as_text_beside_its_reason(tmp_path):
    """A JSON number or list where the prompt should be is rejected with its type, as `memaudit run` rejects it (its
    reader reads generate's prompts: no text kept), and a null as null_prompt."""
    from audit.cli.generate import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": 7}\n{"prompt": [1, "a"]}\n{"prompt": null}\n{"prompt": " a cat "}\n')
    assert read_prompts(path) == [(None, "prompt_not_string:int"), (None, "prompt_not_string:list"),
                                  (None, "null_prompt"), ("a cat", None)]


def test_a_prompt_column_for_a_text_file_is_refused_whatever_the_suffix_case(tmp_path):
    from audit.cli.generate import GenerateError, run_generate

    prompts = tmp_path / "P.TXT"
    prompts.write_text("a red cat\n")
    with pytest.raises(GenerateError, match=r"--prompt-column 'text': .*P\.TXT is a \.txt file, one prompt a line"):
        run_generate(prompts, str(tmp_path / "no-such-model"), tmp_path / "out", prompt_column="text")
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_be_found_is_one_line_exit_2(tmp_path):
    """A ModelError (no such folder) is a usage error as documented: one line, exit 2, no traceback, nothing written."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    res = CliRunner().invoke(app, ["generate", str(prompts), "--model", str(tmp_path / "none"), "--out",
                                   str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.stderr.splitlines() == [
        f"memaudit: error: --model {tmp_path / 'none'}: no such folder, and not a hub id of the form owner/name"]
    assert not (tmp_path / "o").exists()


def test_when_every_row_failed_to_generate_only_the_error_is_said(tmp_path, monkeypatch):
    """Exit 4 with one error line; the 'rerun to try them again' warning is for a run that made some images."""
    import audit.cli.generate as gen

    summary = {"rows": 2, "images": 0, "rejected": 2, "rejected_by_reason": {"generation_failed": 2}}
    monkeypatch.setattr(gen, "run_generate", lambda *a, **kw: summary)
    res = CliRunner().invoke(app, ["generate", "p.txt", "--model", "m", "--out", str(tmp_path / "o")])
    assert res.exit_code == 4 and json.loads(res.stdout) == summary
    assert res.stderr.splitlines() == ["memaudit: error: nothing was generated: all 2 rows were rejected "
                                       "(generation_failed 2); generations.parquet says why for each"]


def test_the_options_are_compared_with_generate_json_as_it_is_now(tmp_path):
    """check_out_dir read generate.json before the lock was taken; another process may have rewritten it since:
    _claim_folder compares with the file, not with what was read then."""
    from audit.cli.generate import GenerateError, _claim_folder

    read_then = {"seeds": 1, "steps": 2}
    (tmp_path / "generate.json").write_text(json.dumps({"seeds": 3, "steps": 2}))
    with pytest.raises(GenerateError, match=r"holds a generation with other options \(seeds\); use another --out"):
        _claim_folder(tmp_path, {"seeds": 1, "steps": 2}, read_then)
    _claim_folder(tmp_path, {"seeds": 3, "steps": 2}, read_then)


def test_a_generation_failure_is_one_line_of_at_most_500_characters(tmp_path):
    from audit.cli.generate import _generate_missing

    (tmp_path / "parts").mkdir()

    def fails(i, prompt):
        raise RuntimeError("first line\nsecond line " + "x" * 1000)

    _generate_missing(tmp_path, [("p0", None)], 2, False, fails)
    rows = pq.read_table(tmp_path / "parts" / "00000000.failed.parquet").to_pylist()
    reason = "generation_failed: RuntimeError: first line second line " + "x" * 1000
    assert [(r["seed"], r["status"], r["reason"]) for r in rows] == [(0, "rejected", reason[:500]),
                                                                     (1, "rejected", reason[:500])]


def test_finalize_refuses_parts_that_do_not_hold_a_row_per_prompt_and_seed(tmp_path):
    from audit.cli.generate import _finalize, _write_table_atomic

    (tmp_path / "parts").mkdir()
    _write_table_atomic([_row(0, 0)], tmp_path / "parts" / "00000000.parquet")
    with pytest.raises(RuntimeError, match=r"^generate bug: 1 rows for 1 prompts x 2 seeds$"):
        _finalize(tmp_path, 1, 2, OFF, 0, 1.0)
    assert not (tmp_path / "summary.json").exists()


def test_an_os_error_without_a_file_name_names_none(tmp_path, monkeypatch):
    """A full disk met outside a named file: the message says why, with no 'None: ' in front; it says the finished
    prompts are kept only when a part was written (it said so of a run that failed before any)."""
    import audit.cli.generate as gen

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gen, "run_generate", full)
    res = CliRunner().invoke(app, ["generate", "p.txt", "--model", "m", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.stderr.splitlines() == [f"memaudit: error: --out {tmp_path / 'o'}: no space left on the device: free "
                                       "some, then rerun the same command"]
    (tmp_path / "o" / "parts").mkdir(parents=True)
    (tmp_path / "o" / "parts" / "00000000.parquet").write_bytes(b"")
    res = CliRunner().invoke(app, ["generate", "p.txt", "--model", "m", "--out", str(tmp_path / "o")])
    assert res.stderr.splitlines() == [f"memaudit: error: --out {tmp_path / 'o'}: no space left on the device: free "
                                       "some, then rerun the same command to resume; the finished prompts are kept in "
                                       f"{tmp_path / 'o'}/parts"]


def test_generate_json_records_every_option_and_a_rerun_with_another_is_refused(tmp_path, gen_pipeline):
    """generate.json holds the options as given (steps, prompt column, layers, the calibration's threshold and fpr):
    with steps recorded as another value a rerun at other --steps resumed a folder sampled with other steps."""
    import hashlib

    from audit.cli.generate import GenerateError, run_generate

    model_dir, (pipe, loaded) = gen_pipeline
    prompts = tmp_path / "p.csv"
    prompts.write_text("")  # no rows: no sampling, only the folder's options
    layers = list(loaded.default_layers)
    cal = _tiny_calibration(tmp_path / "cal.json", loaded, steps=3)
    out = tmp_path / "out"
    kw = dict(steps=3, seeds=2, guidance=5.0, c1=2.0, prompt_column="text", calibration=cal, progress=False,
              _pipeline=(pipe, loaded), log=lambda m: None)
    assert run_generate(prompts, str(model_dir), out, **kw)["rows"] == 0
    options = json.loads((out / "generate.json").read_text())
    assert {k: v for k, v in options.items() if k not in ("model", "vae_fingerprint")} == {
        "model_fingerprint": loaded.fingerprint, "prompts": str(prompts),
        "prompts_sha256": hashlib.sha256(b"").hexdigest()[:16], "prompt_column": "text", "mitigate": "off",
        "c1": 2.0, "mask_summary": True, "mask_eos": False, "seeds": 2, "steps": 3, "guidance": 5.0,
        "layers": layers, "calibration": {"path": str(cal), "threshold": 0.25, "fpr": 0.05,
                                          "sha256": hashlib.sha256(cal.read_bytes()).hexdigest()[:16]},
        "dtype": "torch.float32", "scheduler": "DDIMScheduler"}
    meta = pq.read_schema(out / "generations.parquet").metadata  # the options travel with the table
    assert json.loads(meta[b"memaudit.generate"]) == options and meta[b"memaudit.schema"] == b"generations/1"
    for other, named in (({"prompt_column": "prompt"}, "prompt_column"), ({"c1": 1.25}, "c1"),
                         ({"seeds": 1}, "seeds"), ({"calibration": None}, "calibration")):
        with pytest.raises(GenerateError, match=rf"other options \({named}\)"):
            run_generate(prompts, str(model_dir), out, **{**kw, **other})


def test_a_json_line_nested_too_deep_is_one_invalid_json_row(tmp_path):
    """json.loads raises RecursionError (not a JSONDecodeError) for arrays nested deeper than Python reads: generate
    ended in a RecursionError traceback (exit 1); `memaudit run` rejects the line as invalid_json."""
    from audit.cli.generate import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text("[" * 100_000 + '\n{"prompt": "a red cat"}\n')
    assert read_prompts(path) == [("[" * 100_000, "invalid_json"), ("a red cat", None)]  # the line kept, as run's


def test_a_json_prompt_with_a_lone_surrogate_is_an_invalid_utf8_row(tmp_path, gen_pipeline):
    """A JSON escape cut from an emoji pair ("\ud83d") reads as a str that cannot be written as UTF-8: generate took it
    for a prompt and ended in a UnicodeEncodeError traceback (exit 1) when its part was written. It is rejected as
    invalid_utf8, as `memaudit run` rejects it, its row keeping the text with the surrogate escaped."""
    import polars as pl

    from audit.cli.generate import read_prompts, run_generate

    model_dir, pipeline = gen_pipeline
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "half \\ud83d"}\n{"prompt": "a red cat"}\n')
    line = '{"prompt": "half \\ud83d"}'  # the reject keeps its line, JSON escapes and all, as run's rejects
    assert read_prompts(path) == [(line, "invalid_utf8"), ("a red cat", None)]
    summary = run_generate(path, str(model_dir), tmp_path / "out", steps=2, progress=False, _pipeline=pipeline,
                           log=lambda m: None)
    assert (summary["rows"], summary["images"], summary["rejected_by_reason"]) == (2, 1, {"invalid_utf8": 1})
    rows = pl.read_parquet(tmp_path / "out" / "generations.parquet")
    assert rows["prompt"].to_list() == [line, "a red cat"]
    assert rows["status"].to_list() == ["rejected", "image"]


def _tiny_calibration(path, loaded, steps=2, **score_config):
    """A calibration file for the tiny generation model at ``steps`` (threshold 0.25 at FPR 0.05)."""
    path.write_text(json.dumps({
        "kind": "memaudit.calibration", "threshold": 0.25, "fpr": 0.05,
        "reference_quantiles": [0.25 + (i - 950) / 1000 for i in range(1001)], "reference": {"size": 100},
        "model": {"name": "tiny", "fingerprint": loaded.fingerprint},
        "score_config": {"scorer": "attention_entropy", "layers": list(loaded.default_layers), "noise_draws": 1,
                         "seed": 0, "num_inference_steps": steps, "dtype": "float32", **score_config}}))
    return path


def test_a_calibration_scored_at_another_first_timestep_is_refused(tmp_path, gen_pipeline):
    """DDIM over 1000 training steps starts at t=501 for --steps 2 (steps_offset 1): a calibration recording t0 501
    applies, one recording 667 (the t0 of 3 steps, or of another scheduler) does not."""
    from audit.cli.generate import run_generate
    from audit.errors import MitigationError

    model_dir, pipeline = gen_pipeline
    prompts = tmp_path / "p.txt"
    prompts.write_text("")
    kw = dict(steps=2, progress=False, _pipeline=pipeline, log=lambda m: None)
    good = _tiny_calibration(tmp_path / "good.json", pipeline[1], first_timestep=501)
    assert run_generate(prompts, str(model_dir), tmp_path / "a", calibration=good, **kw)["rows"] == 0
    other = _tiny_calibration(tmp_path / "other.json", pipeline[1], first_timestep=667)
    with pytest.raises(MitigationError, match=r"was scored at first timestep 667; this generation's sampler starts "
                                              r"at 501 \(another scheduler or timestep spacing\)"):
        run_generate(prompts, str(model_dir), tmp_path / "b", calibration=other, **kw)
    assert not (tmp_path / "b").exists()


def test_a_pipeline_of_another_family_is_refused_before_the_folder_is_made(tmp_path, gen_pipeline):
    from audit.cli.generate import run_generate
    from audit.errors import MitigationError

    model_dir, (_, loaded) = gen_pipeline

    class PixArtAlphaPipeline:  # a transformer denoiser, no UNet
        transformer = object()

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    with pytest.raises(MitigationError, match=r"^PixArtAlphaPipeline has a transformer denoiser \(joint or DiT "
                                              r"attention\): the cross-attention mitigation is defined for Stable"):
        run_generate(prompts, str(model_dir), tmp_path / "out", steps=2, progress=False,
                     _pipeline=(PixArtAlphaPipeline(), loaded), log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_the_vae_fingerprint_is_that_of_the_vae_folder_alone(tmp_path, gen_pipeline):
    from audit.cli.generate import _vae_fingerprint
    from audit.models.base import fingerprint_files

    model_dir, _ = gen_pipeline
    assert _vae_fingerprint(model_dir) == fingerprint_files(model_dir, ("vae",), settings=False)
    assert _vae_fingerprint(model_dir) != fingerprint_files(model_dir)
    assert _vae_fingerprint(tmp_path) is None  # no vae/: a pipeline built by the caller


def test_the_command_prints_no_sampler_progress_bar(tmp_path, gen_pipeline):
    """diffusers' per-prompt tqdm bar is turned off: with --no-progress, stderr holds nothing for a clean run."""
    model_dir, _ = gen_pipeline
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    res = CliRunner().invoke(app, ["generate", str(prompts), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                                   "--steps", "2", "--device", "cpu", "--dtype", "float32", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and json.loads(res.stdout)["images"] == 1


def test_the_options_reach_the_detector_and_the_sampler(tmp_path, gen_pipeline, monkeypatch):
    """--guidance, --steps, --seeds, --c1, --mask-eos, --mitigate and the calibration's threshold and layers are what
    the detector and the pipeline are called with (each was replaceable by its default, unnoticed)."""
    import audit.mitigation.detect as detect
    from audit.capture import cross_attention_layers
    from audit.cli.generate import run_generate

    model_dir, (pipe, loaded) = gen_pipeline
    layers = cross_attention_layers(pipe.unet)[:2]
    assert layers != list(loaded.default_layers)
    cal = _tiny_calibration(tmp_path / "cal.json", loaded, layers=layers)
    made, sampled = [], []

    class Recording(detect.DetectAndMitigate):
        def __init__(self, pipe, **kw):
            made.append(kw)
            super().__init__(pipe, **kw)

    real_call = type(pipe).__call__

    def recording_call(self, prompt=None, **kw):
        sampled.append(kw | {"prompt": prompt, "generator": [g.initial_seed() for g in kw["generator"]]})
        return real_call(self, prompt, **kw)

    monkeypatch.setattr(detect, "DetectAndMitigate", Recording)
    monkeypatch.setattr(type(pipe), "__call__", recording_call)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    summary = run_generate(prompts, str(model_dir), tmp_path / "out", mitigate="flagged", calibration=cal, seeds=2,
                           steps=2, guidance=3.0, c1=2.0, mask_eos=True, progress=False, _pipeline=(pipe, loaded),
                           log=lambda m: None)
    assert summary["images"] == 2
    assert made == [{"threshold": 0.25, "layers": layers, "c1": 2.0, "mask_eos": True, "mode": "flagged"}]
    assert sampled == [{"prompt": "a red cat", "num_images_per_prompt": 2, "generator": [0, 1],
                        "num_inference_steps": 2, "guidance_scale": 3.0, "output_type": "np"}]


def test_the_command_passes_its_defaults_and_options_to_run_generate(tmp_path, monkeypatch):
    from pathlib import Path

    import audit.cli.generate as gen

    calls = []
    summary = {"rows": 1, "images": 1, "rejected": 0, "rejected_by_reason": {}}
    monkeypatch.setattr(gen, "run_generate", lambda *a, **kw: calls.append((a, kw)) or summary)
    base = ["generate", "p.txt", "--model", "m", "--out", "o"]
    assert CliRunner().invoke(app, base).exit_code == 0
    assert calls.pop() == ((Path("p.txt"), "m", Path("o")), {
        "mitigate": "off", "calibration": None, "seeds": 1, "steps": 50, "guidance": 7.5, "c1": 1.25,
        "mask_eos": False, "device": "auto", "dtype": "auto", "prompt_column": "prompt", "progress": None})
    res = CliRunner().invoke(app, base + ["--mitigate", "flagged", "--calibration", "c.json", "--seeds", "3",
                                          "--steps", "20", "--guidance", "4.5", "--c1", "2", "--mask-eos",
                                          "--prompt-column", "text", "--device", "cpu", "--dtype", "float16",
                                          "--progress"])
    assert res.exit_code == 0 and json.loads(res.stdout) == summary
    assert calls.pop() == ((Path("p.txt"), "m", Path("o")), {
        "mitigate": "flagged", "calibration": Path("c.json"), "seeds": 3, "steps": 20, "guidance": 4.5, "c1": 2.0,
        "mask_eos": True, "device": "cpu", "dtype": "float16", "prompt_column": "text", "progress": True})
    assert CliRunner().invoke(app, base + ["--no-progress"]).exit_code == 0 and calls.pop()[1]["progress"] is False


def test_json_lines_without_the_prompt_column_are_refused_naming_the_keys(tmp_path):
    """JSON lines of {"text": ...} without --prompt-column text: memaudit run refuses them at once ('no input has the
    prompt column'), as generate refuses such a CSV; generate loaded the model, then wrote a folder of
    missing_prompt_column rows and exited 4. Lines that are no object show no columns and refuse nothing."""
    from audit.cli.generate import GenerateError, read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a red cat", "id": 1}\n[1]\n{"text": "blue sky"}\nnot json\n')
    message = (f"PROMPTS {path}: no input has the prompt column 'prompt'; columns found: id, text. Choose one with "
               "--prompt-column.")
    with pytest.raises(GenerateError, match=f"^{re.escape(message)}$"):
        read_prompts(path)
    assert read_prompts(path, "text") == [("a red cat", None), ("[1]", "invalid_json"), ("blue sky", None),
                                          ("not json", "invalid_json")]
    path.write_text('[1]\nnot json\n')
    assert read_prompts(path) == [("[1]", "invalid_json"), ("not json", "invalid_json")]
    (tmp_path / "q.jsonl").write_text('{"text": "a"}\n')  # refused before the model (here none) is looked for
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "q.jsonl"), "--model", str(tmp_path / "no-model"),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.stderr.splitlines() == [
        f"memaudit: error: PROMPTS {tmp_path / 'q.jsonl'}: no input has the prompt column 'prompt'; columns found: "
        "text. Choose one with --prompt-column."]
    assert not (tmp_path / "o").exists()


def test_an_unreadable_table_of_prompts_is_refused_without_naming_an_option_generate_lacks(tmp_path):
    """The reader's refusal ended '(--skip-bad-files skips such files and goes on)': generate has no such option
    (typer: 'No such option'). The reason stays, the hint goes, and the file is named once (the reader's own
    'PATH: ' after generate's 'PROMPTS PATH: ' named it twice)."""
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet PAR1")
    (tmp_path / "q.csv").write_text('prompt\n"never closed\n')
    for name, reason in (("bad.parquet", "cannot read as parquet (ArrowInvalid: "),
                         ("q.csv", "cannot read as csv (ValueError: it ends inside a quoted field that never closes")):
        res = CliRunner().invoke(app, ["generate", str(tmp_path / name), "--model", str(tmp_path / "no-model"),
                                       "--out", str(tmp_path / "o")])
        (line,) = res.stderr.splitlines()
        assert res.exit_code == 2 and line.startswith(f"memaudit: error: PROMPTS {tmp_path / name}: {reason}"), line
        assert reason in line and "--skip-bad-files" not in line and line.endswith(")"), line
    assert not (tmp_path / "o").exists()


def test_prompts_as_a_folder_or_ndjson(tmp_path):
    """A folder given for PROMPTS was 'no such file' (memaudit run reads a folder's files: generate reads one);
    .ndjson is JSON lines."""
    from audit.cli.generate import GenerateError, read_prompts

    (tmp_path / "prompts.txt").mkdir()
    with pytest.raises(GenerateError, match=rf"^PROMPTS {re.escape(str(tmp_path / 'prompts.txt'))} is a folder: give "
                                            r"one prompts file \(\.txt, \.parquet, \.csv or \.jsonl\)$"):
        read_prompts(tmp_path / "prompts.txt")
    with pytest.raises(GenerateError, match=r"none\.txt: no such file$"):
        read_prompts(tmp_path / "none.txt")
    (tmp_path / "p.ndjson").write_text('{"prompt": "a red cat"}\n{"prompt": 3}\n')
    assert read_prompts(tmp_path / "p.ndjson") == [("a red cat", None), (None, "prompt_not_string:int")]  # as run reads it


def test_resume_compares_the_model_and_prompts_by_content_and_names_each_difference(tmp_path):
    """The model and prompts named by another path resume when their fingerprint and hash are the same; other weights
    or other prompts are refused, saying what each difference means."""
    from audit.cli.generate import GenerateError, _claim_folder

    mine = {"model": "/a/model", "model_fingerprint": "f1", "prompts": "p.txt", "prompts_sha256": "s1",
            "vae_fingerprint": "v1", "seeds": 1}
    (tmp_path / "generate.json").write_text(json.dumps(mine))
    _claim_folder(tmp_path, {**mine, "model": "../a/model", "prompts": "/abs/p.txt"}, mine)
    for other, said in (({"model": "/b/model", "model_fingerprint": "f2"}, "model, model_fingerprint: other model "
                                                                           "weights"),
                        ({"prompts_sha256": "s2"}, "prompts_sha256: the prompts file's content changed"),
                        ({"prompts": "q.txt", "prompts_sha256": "s2"}, "prompts, prompts_sha256: the prompts file's "
                                                                       "content changed"),
                        ({"vae_fingerprint": "v2", "seeds": 2}, "seeds, vae_fingerprint: another VAE")):
        with pytest.raises(GenerateError, match=rf"^--out {re.escape(str(tmp_path))} holds a generation with other "
                                                rf"options \({said}\); use another --out or the same options to resume$"):
            _claim_folder(tmp_path, {**mine, **other}, mine)
    assert json.loads((tmp_path / "generate.json").read_text()) == mine


# --- audit/tables.py --------------------------------------------------------------------------------------------
MODEL = {"name": "tiny", "fingerprint": "0123456789abcdef"}
CONFIG = {"scorer": "attention_entropy", "layers": ["L"]}


def _risk_rows(risks):
    """Risk-table rows, one per risk, ranked in the order given."""
    return [{"rank": k + 1, "prompt_id": f"p.txt#{k}", "prompt": f"prompt {k}", "risk": r, "attn_entropy": 1.0,
             "bos_mass": 0.5, "trigger_tokens": [], "n_tokens": 4, "truncated": False, "source": "p.txt", "row": k,
             "prompt_hash": f"{k:032x}"} for k, r in enumerate(risks)]


def _run_folder(path, risks=(0.9, 0.5), rejected=1, table_model=MODEL, risk_schema=None, calibration=None):
    """A finished run folder written by hand: risk.parquet (``risks``), rejects.parquet (``rejected`` rows) and a
    manifest.json that counts them, the tables carrying ``table_model`` and CONFIG in their metadata (and
    ``calibration``, as a calibrated run's risk table does)."""
    from audit.tables import arrow_schema, write_parquet_atomic

    path.mkdir()
    meta = {"memaudit.model": table_model, "memaudit.score_config": CONFIG}
    if calibration is not None:
        meta["memaudit.calibration"] = calibration
    schema = risk_schema or arrow_schema("risk")
    risk = pa.Table.from_pylist(_risk_rows(risks), schema=schema)
    if risk_schema is None:
        write_parquet_atomic(risk, path / "risk.parquet", "risk", metadata=meta)
    else:  # a table the schema would refuse (hand-edited)
        pq.write_table(risk.replace_schema_metadata({k: json.dumps(v) for k, v in meta.items()}), path / "risk.parquet")
    rejects = pa.Table.from_pylist([{"prompt_id": f"p.txt#{9 + k}", "source": "p.txt", "row": 9 + k,
                                     "reason": "empty_prompt"} for k in range(rejected)],
                                   schema=arrow_schema("rejects"))
    write_parquet_atomic(rejects, path / "rejects.parquet", "rejects", metadata=meta)
    manifest = {"counts": {"rows_read": len(risks) + rejected, "scored": len(risks), "rejected": rejected},
                "model": MODEL, "score_config": CONFIG}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _edit_manifest(run, **changes):
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(changes)
    (run / "manifest.json").write_text(json.dumps(manifest))


ALL = ("risk.parquet", "rejects.parquet", "manifest.json")


def test_a_hand_made_run_passes_and_a_table_of_another_model_is_refused(tmp_path):
    from audit.errors import ReportError
    from audit.tables import finished_run

    run = _run_folder(tmp_path / "run")
    assert finished_run(run, ALL)["counts"]["scored"] == 2
    other = _run_folder(tmp_path / "other", table_model={"name": "tiny", "fingerprint": "fedcba9876543210"})
    with pytest.raises(ReportError, match=r"risk.parquet was written with another model than manifest.json records: "
                                          r"the table comes from another run"):
        finished_run(other, ALL, ReportError)
    renamed = _run_folder(tmp_path / "renamed",
                          table_model={"name": "/other/path", "fingerprint": MODEL["fingerprint"]})
    assert finished_run(renamed, ALL)["model"] == MODEL  # the same weights named by another path: the same model


def test_a_null_risk_is_refused(tmp_path):
    """risk is not nullable: a hand-edited table with a null risk is refused like a NaN one."""
    from audit.tables import arrow_schema, finished_run

    schema = arrow_schema("risk")
    nullable = schema.set(schema.get_field_index("risk"), schema.field("risk").with_nullable(True))
    run = _run_folder(tmp_path / "run", risks=(0.9, None, float("nan")), risk_schema=nullable)
    with pytest.raises(Exception, match=r"risk.parquet: 2 of 3 risks are null or not finite numbers"):
        finished_run(run)


def test_a_run_without_rejects_is_finished_for_readers_of_its_risks(tmp_path):
    """diff and calibrate need risk.parquet and manifest.json only: a missing rejects.parquet is not read."""
    from audit.errors import RunError
    from audit.tables import finished_run

    run = _run_folder(tmp_path / "run")
    (run / "rejects.parquet").unlink()
    assert finished_run(run)["counts"]["rejected"] == 1
    with pytest.raises(RunError, match=r"is a finished memaudit run that lost its rejects.parquet: rerun its command "
                                       r"with the same --out"):
        finished_run(run, ALL)


def test_a_file_of_the_run_that_is_a_folder_is_named(tmp_path):
    from audit.errors import RunError
    from audit.tables import finished_run

    for name in ("manifest.json", "risk.parquet"):
        run = _run_folder(tmp_path / name)
        (run / name).unlink()
        (run / name).mkdir()
        with pytest.raises(RunError, match=rf"^{run / name} is a folder, not a file: not an intact memaudit run$"):
            finished_run(run, ALL)


@pytest.mark.parametrize("changes, message", [
    ({"counts": {"rows_read": 3, "scored": 2}}, "lacks the run's counts or model"),
    ({"counts": {"rows_read": 3, "scored": "2", "rejected": 1}}, "lacks the run's counts or model"),
    ({"model": "tiny"}, "lacks the run's counts or model"),
    ({"skipped_files": {"a": 1}}, "skipped_files is a dict, not a list: not an intact memaudit run"),
    ({"calibration": ["x"]}, "calibration is a list, not an object: not an intact memaudit run"),
    ({"calibration": {"threshold": True}}, "calibration.threshold True is not a finite number"),
    ({"calibration": {"threshold": "0.5"}}, "calibration.threshold '0.5' is not a finite number"),
    ({"calibration": {}}, "calibration.threshold None is not a finite number"),
    ({"counts": {"rows_read": True, "scored": True, "rejected": False}}, "lacks the run's counts or model"),
    ({"calibration": {"threshold": float("nan")}}, "calibration.threshold nan is not a finite number"),
    ({"calibration": {"threshold": float("inf")}}, "calibration.threshold inf is not a finite number"),
])
def test_manifest_fields_of_the_wrong_kind_are_refused(tmp_path, changes, message):
    from audit.errors import ReportError
    from audit.tables import finished_run

    run = _run_folder(tmp_path / "run")
    _edit_manifest(run, **changes)
    with pytest.raises(ReportError, match=f"^{run / 'manifest.json'}:? .*{message}"):
        finished_run(run, ALL, ReportError)


def test_a_calibration_with_a_number_threshold_and_null_optional_fields_pass(tmp_path):
    from audit.tables import finished_run

    run = _run_folder(tmp_path / "run", calibration={"threshold": 1})
    _edit_manifest(run, calibration={"threshold": 1}, skipped_files=None, score_config=None)
    assert finished_run(run, ALL)["calibration"] == {"threshold": 1}


def test_a_table_with_a_column_twice_is_refused_naming_it(tmp_path):
    """A risk.parquet edited outside memaudit to hold a column twice was said as 'Column risk does not exist in
    schema' (pyarrow's KeyError, exit 2): the column is there, twice."""
    from audit.cli import app
    from audit.errors import ReportError
    from audit.tables import finished_run

    run = _run_folder(tmp_path / "run")
    table = pq.read_table(run / "risk.parquet")
    twice = pa.Table.from_arrays(table.columns + [table["risk"]], names=table.column_names + ["risk"])
    pq.write_table(twice.replace_schema_metadata(table.schema.metadata), run / "risk.parquet")
    message = f"{run / 'risk.parquet'} has column(s) risk more than once: not an intact memaudit run"
    with pytest.raises(ReportError, match=f"^{re.escape(message)}$"):
        finished_run(run, ALL, ReportError)
    res = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "r.md")])
    assert res.exit_code == 2 and res.stderr.splitlines() == [f"memaudit: error: {message}"]


def test_a_folder_that_no_run_started_is_not_said_to_be_resumable_or_being_written(tmp_path):
    """Without run.json no memaudit run started in the folder: no 'rerun to resume', and a lock held there (a
    `memaudit generate` writing its own folder) is not 'being written by a memaudit run'."""
    from audit.errors import ReportError
    from audit.pipeline import out_lock
    from audit.tables import finished_run

    folder = tmp_path / "gen"
    message = f"^{re.escape(str(folder))} is not a finished memaudit run \\(no risk.parquet\\)$"
    with out_lock(folder, "memaudit generate"):
        with pytest.raises(ReportError, match=message):
            finished_run(folder, ALL, ReportError)
    with pytest.raises(ReportError, match=message):
        finished_run(folder, ALL, ReportError)
    (folder / "run.json").write_text("{}")  # a run started here and stopped
    with pytest.raises(ReportError, match="no risk.parquet\\): a run started there and did not finish; rerun its "
                                          "command with the same --out to resume it$"):
        finished_run(folder, ALL, ReportError)


def test_column_ranges_skip_the_empty_group_of_an_empty_file(tmp_path):
    """An empty file's one row group has no statistics: it is no group of ranges, not an inexact one (None)."""
    from audit.tables import column_ranges

    pq.write_table(pa.table({"n": pa.array([], pa.int64())}), tmp_path / "e.parquet")
    pq.write_table(pa.table({"n": [3, 1, 2, 7]}), tmp_path / "f.parquet", row_group_size=3)
    assert pq.read_metadata(tmp_path / "e.parquet").num_row_groups == 1
    assert column_ranges(pq.read_metadata(tmp_path / "e.parquet"), "n") == []
    assert column_ranges(pq.read_metadata(tmp_path / "f.parquet"), "n") == [(1, 3), (7, 7)]
    with pytest.raises(ValueError):
        column_ranges(pq.read_metadata(tmp_path / "f.parquet"), "m")


def test_an_atomic_write_is_on_disk_before_it_is_renamed(tmp_path, monkeypatch):
    """The temporary file is fsync'ed, then renamed onto the path: a power cut leaves the old file or the new one."""
    import os

    import audit.tables
    from audit.tables import write_json_atomic

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(audit.tables.os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(audit.tables.os, "replace", lambda a, b: calls.append(("replace", str(a), str(b)))
                        or real_replace(a, b))
    write_json_atomic({"a": 1}, tmp_path / "x.json")
    assert [c[0] for c in calls] == ["fsync", "replace"] and calls[0][1] == calls[1][1]
    assert calls[1][2] == str(tmp_path / "x.json") and json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def _manifest():
    """A manifest with every key schemas/manifest.json requires, its counts reconciling."""
    return {"schema_version": 1, "memaudit_version": "0.0", "inputs": [], "files": [], "skipped_files": [],
            "counts": {"rows_read": 3, "scored": 2, "rejected": 1, "rejected_by_reason": {"empty_prompt": 1},
                       "unique_prompts": 2, "duplicates": 0},
            "model": MODEL, "score_config": CONFIG, "versions": {}, "wall_time_s": 1, "throughput_rows_per_s": 1.5,
            "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z"}


def test_check_manifest_requires_each_key_of_its_kind_and_every_count():
    """A whole number of seconds is a float field's value; a string is not, a missing count is named."""
    from audit.errors import SchemaError
    from audit.tables import check_manifest

    check_manifest(_manifest())
    for key, value, message in (("wall_time_s", "1.0", "manifest.wall_time_s missing or not a float"),
                                ("inputs", {}, "manifest.inputs missing or not a list"),
                                ("started_at", None, "manifest.started_at missing or not a str")):
        with pytest.raises(SchemaError, match=f"^{re.escape(message)}$"):
            check_manifest({**_manifest(), key: value})
    for count in ("unique_prompts", "duplicates", "rejected_by_reason"):
        manifest = _manifest()
        del manifest["counts"][count]
        with pytest.raises(SchemaError, match=f"^manifest.counts.{count} missing$"):
            check_manifest(manifest)


def test_table_metadata_keeps_strings_as_given_and_writes_other_values_as_json(tmp_path):
    from audit.tables import arrow_schema, write_parquet_atomic

    table = pa.Table.from_pylist([{"prompt_id": "p#0", "source": "p", "row": 0, "reason": "empty_prompt", "user": "u"}],
                                 schema=arrow_schema("rejects", ("user",)))
    write_parquet_atomic(table, tmp_path / "r.parquet", "rejects", ("user",),
                         metadata={"memaudit.version": "1.2", "memaudit.model": {"fingerprint": "ab"}})
    schema = pq.read_schema(tmp_path / "r.parquet")
    assert schema.names == ["prompt_id", "source", "row", "reason", "detail", "prompt", "user"]
    assert dict(schema.metadata) == {b"memaudit.version": b"1.2", b"memaudit.model": b'{"fingerprint": "ab"}',
                                     b"memaudit.schema": b"rejects/2"}


def test_a_manifest_that_is_not_utf8_is_not_valid_json(tmp_path):
    from audit.errors import ReportError
    from audit.tables import finished_run

    run = _run_folder(tmp_path / "run")
    (run / "manifest.json").write_bytes(b'\xff\xfe{"counts": {}}')
    with pytest.raises(ReportError, match=rf"^{re.escape(str(run / 'manifest.json'))} is not valid JSON "
                                          r"\(UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0"):
        finished_run(run, ALL, ReportError)


def test_a_file_given_for_the_run_folder_names_its_folder_only_when_it_is_a_run_file(tmp_path):
    from audit.errors import ReportError
    from audit.tables import finished_run

    run = _run_folder(tmp_path / "run")
    with pytest.raises(ReportError, match=rf"^{re.escape(str(run / 'rejects.parquet'))} is a file: give the run folder "
                                          rf"\({re.escape(str(run))}\)$"):
        finished_run(run / "rejects.parquet", ALL, ReportError)
    (tmp_path / "notes.csv").write_text("x\n")
    with pytest.raises(ReportError, match=rf"^{re.escape(str(tmp_path / 'notes.csv'))} is a file: give the run "
                                          r"folder$"):
        finished_run(tmp_path / "notes.csv", ALL, ReportError)


def test_a_resumed_generation_starts_its_progress_bar_at_the_prompts_done(tmp_path, monkeypatch):
    import audit.cli.generate as gen

    bars = []
    real = gen._progress
    monkeypatch.setattr(gen, "_progress", lambda *a: bars.append(real(*a)) or bars[-1])
    (tmp_path / "parts").mkdir()
    rows_in = [(f"p{i}", None) for i in range(3)]
    gen._generate_missing(tmp_path, rows_in[:2], 1, False, lambda i, p: [_row(i, 0)])
    gen._generate_missing(tmp_path, rows_in, 1, True, lambda i, p: [_row(i, 0)])
    assert bars[0].bar is None  # --no-progress
    (task,) = bars[1].bar.tasks
    assert (task.total, task.completed) == (3, 3) and task.finished  # started at 2 of 3, one advanced


def test_a_vae_and_unet_of_other_latent_widths_are_refused_before_loading(tmp_path, gen_pipeline):
    """A model folder whose VAE makes latents of another channel count than its UNet takes loaded whole, then failed
    every prompt at its first image (generation_failed rows, exit 4); it is refused before any weight is read."""
    import shutil

    from audit.cli.generate import GenerateError, build_pipeline

    model_dir, _ = gen_pipeline
    other = tmp_path / "model"
    shutil.copytree(model_dir, other)
    cfg = other / "vae" / "config.json"
    vae = json.loads(cfg.read_text())
    unet = json.loads((other / "unet" / "config.json").read_text())["in_channels"]
    cfg.write_text(json.dumps(vae | {"latent_channels": unet + 4}))
    with pytest.raises(GenerateError, match=rf"its VAE makes latents of {unet + 4} channels and its UNet takes {unet}; "
                                            "generate needs the two of one Stable Diffusion model"):
        build_pipeline(str(other), device="cpu", dtype="float32")
    pipe, _ = build_pipeline(str(model_dir), device="cpu", dtype="float32")  # the matched pair builds
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == unet


def test_an_unfinished_run_says_when_it_started_and_how_many_units_finished(tmp_path):
    """A folder handed over after a kill said only 'a run started there and did not finish': whoever diagnoses it
    could not tell a run killed at its start from one killed near its end. The line now gives run.json's start time
    and the units committed (shards/unit-*.done.json) of those planned."""
    from audit.errors import ReportError
    from audit.tables import finished_run

    folder = tmp_path / "run"
    (folder / "shards").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"units": 20, "started_at": "2026-12-08T05:00:33+00:00"}))
    for i in range(16):
        (folder / "shards" / f"unit-{i:06d}.done.json").write_text("{}")
    (folder / "shards" / "unit-000016.risk.parquet").write_text("")  # a unit written but not committed
    with pytest.raises(ReportError) as err:
        finished_run(folder, ALL, ReportError)
    assert str(err.value) == (f"{folder} is not a finished memaudit run (no risk.parquet): a run started there at "
                              "2026-12-08T05:00:33+00:00 (16 of 20 units finished) and did not finish; rerun its "
                              "command with the same --out to resume it")
    for i in range(16, 20):  # every unit committed: stopped before its final tables (or one of them was lost)
        (folder / "shards" / f"unit-{i:06d}.done.json").write_text("{}")
    with pytest.raises(ReportError) as err:
        finished_run(folder, ALL, ReportError)
    assert "a run started there at 2026-12-08T05:00:33+00:00 (all 20 units finished, not its final tables) and did " \
           "not finish" in str(err.value)
