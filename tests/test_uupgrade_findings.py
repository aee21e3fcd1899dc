"""Findings of upgrading memaudit under a nightly job: run folders, calibration files and caches written by older
versions, used by this one. Each must work with the numbers of a fresh run, or be refused in one line that says
what to do. The old shapes are written by hand here (as the older versions wrote them), not taken from git
history. Each test fails on the code before its fix."""

from __future__ import annotations

import polars as pl
import pyarrow.parquet as pq
import pytest

from helpers import prompts_file, run_audit

# the risk columns memaudit wrote before the per-layer and guidance columns (schemas/risk.json of 2026-12-03)
_OLD_RISK_COLUMNS = ["rank", "prompt_id", "prompt", "prompt_raw", "risk", "attn_entropy", "bos_mass",
                     "noise_magnitude", "trigger_tokens", "n_tokens", "truncated", "source", "row", "prompt_hash",
                     "flagged", "risk_percentile"]


def _as_old_shards(out) -> int:
    """Rewrite every committed risk shard of run folder ``out`` with the older version's columns only; returns how
    many were rewritten."""
    shards = sorted((out / "shards").glob("*.risk.parquet"))
    for path in shards:
        table = pq.read_table(path)
        meta = table.schema.metadata
        kept = [c for c in table.column_names if c not in _OLD_RISK_COLUMNS and not c.startswith(("attn_", "bos_"))
                and c not in ("guidance_geometry", "guidance_norm", "guidance_cosine", "attention_entropy_late",
                              "late_entropy", "summary_entropy_change")]  # the --keep-columns, last
        pq.write_table(table.select(_OLD_RISK_COLUMNS + kept).replace_schema_metadata(meta), path)
    return len(shards)


def test_a_folder_with_shards_of_an_older_table_is_resumed_with_this_versions_columns(tmp_path, tiny_model_dir):
    """A run folder interrupted under an older memaudit, whose risk shards lacked the columns added since
    (attn_entropy_l00.., guidance_geometry, ...), then rerun after the upgrade: the rerun scored every unit left,
    then failed at the merge with a pyarrow error ("Schema at index N was different", exit 1), the night's
    scoring lost. Now those units are scored again (a note says how many) and the tables equal a fresh run's."""
    lines = prompts_file(tmp_path / "p.txt", 24, seed=3).read_text().splitlines()
    src = tmp_path / "p.csv"  # a kept column too (after the schema's columns), and a rejected row: a rejects shard
    src.write_text("prompt,app\n" + "".join(f"{p},app{i % 3}\n" for i, p in enumerate(lines)) + ",web\n")
    fresh, _ = run_audit([src], tiny_model_dir, tmp_path / "fresh", unit_rows=4, batch_size=4, keep_columns=("app",))
    old = tmp_path / "old"
    run_audit([src], tiny_model_dir, old, unit_rows=4, batch_size=4, keep_columns=("app",))
    assert _as_old_shards(old) == 7
    for name in ("risk.parquet", "rejects.parquet", "manifest.json"):  # as if it was cut before the merge
        (old / name).unlink(missing_ok=True)
    notes = []
    from audit.pipeline import RunConfig
    from audit.runner import execute

    cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(old), unit_rows=4, batch_size=4,
                    keep_columns=("app",))
    _, manifest = execute(cfg, progress=False, log=notes.append)
    assert f"memaudit: 7 units of {old} were committed by an earlier memaudit whose tables had other columns: " \
           "scored again with this version" in notes
    assert manifest["counts"]["scored"] == 24 and manifest["counts"]["rejected_by_reason"] == {"null_prompt": 1}
    got, want = pl.read_parquet(old / "risk.parquet"), pl.read_parquet(fresh / "risk.parquet")
    assert pl.read_parquet(old / "rejects.parquet").equals(pl.read_parquet(fresh / "rejects.parquet"))
    assert got.columns == want.columns and got.columns[-1] == "app"
    assert got.equals(want)
    # every shard now has this version's columns: a second rerun scores nothing again
    notes.clear()
    execute(cfg, progress=False, log=notes.append)
    assert f"memaudit: resuming {old}: 7 of 7 units already done" in notes
    assert not any("earlier memaudit" in n for n in notes)


def _model_with_sentencepiece_file(tmp_path, tiny_model_dir, settings: bool = False):
    """A copy of the tiny model with one more tokenizer file (``.model``, as T5's ``spiece.model``), which this
    memaudit's fingerprint covers and that of an earlier version did not; and that earlier fingerprint. With
    ``settings``, the folder's memaudit.json also sets a score setting, which the earlier fingerprint of 2026-12-05
    covered (before 2026-12-05 none did)."""
    import hashlib
    import json
    import shutil

    from audit.models.base import fingerprint_files

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "tokenizer" / "extra.model").write_bytes(b"sentencepiece model bytes")
    chosen = {"guidance_geometry_weights": [1.0, 2.0]}
    if settings:
        (model / "memaudit.json").write_text(json.dumps({"description": "tiny", **chosen}))
    # the earlier fingerprint, by hand: SHA-256 over "<component>/<file>\0" and the bytes of each .safetensors,
    # .json and .txt file of the scoring components, in component order and file name order
    digest = hashlib.sha256()
    for comp in ("tokenizer", "text_encoder", "unet", "scheduler"):
        for p in sorted(q for q in (model / comp).iterdir() if q.suffix in (".safetensors", ".json", ".txt")):
            digest.update(f"{comp}/{p.name}\0".encode() + p.read_bytes())
    if settings:
        digest.update(f"memaudit.json\0{json.dumps(chosen, sort_keys=True)}".encode())
    earlier = digest.hexdigest()[:16]
    assert earlier != fingerprint_files(model)
    return model, earlier


@pytest.mark.parametrize("settings", [False, True], ids=["before-2026-12-05", "2026-12-05"])
def test_a_folder_fingerprinted_by_an_earlier_memaudit_is_refused_as_the_same_model(tmp_path, tiny_model_dir,
                                                                                    settings):
    """memaudit's model fingerprint came to cover more files (memaudit.json's score settings, then sentencepiece
    files), so after the upgrade a run folder of the very same model was refused as "a different run:
    model_fingerprint ... Choose another --out, or rerun the original command to resume it": the original command
    is what was refused, and the model had not changed. The refusal now says the model is the same, why the
    fingerprints differ, and to run into a new --out. A folder of another model keeps the old message."""
    import json

    import pytest

    from audit.errors import RunError

    model, earlier = _model_with_sentencepiece_file(tmp_path, tiny_model_dir, settings)
    src = prompts_file(tmp_path / "p.txt", 8, seed=4)
    out, manifest = run_audit([src], model, tmp_path / "run", unit_rows=4, batch_size=4)
    now = manifest["model"]["fingerprint"]
    run_json = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(run_json | {"model_fingerprint": earlier}))  # as the earlier one wrote it
    with pytest.raises(RunError) as err:
        run_audit([src], model, out, unit_rows=4, batch_size=4)
    assert str(err.value) == (
        f"{out} holds a different run: model_fingerprint: '{earlier}' -> '{now}'. The model is the same: an earlier "
        f"memaudit fingerprinted this model's same files as [{earlier}], before the fingerprint also covered "
        "memaudit.json's score settings, sentencepiece tokenizer files and SDXL's model_index.json and VAE settings, "
        "or left out weight files the load does not read (a fp16 variant beside the weights). "
        "This memaudit cannot resume or rerun that folder: run into a new --out (memaudit report and diff still read "
        "the old folder).")
    (out / "run.json").write_text(json.dumps(run_json | {"model_fingerprint": "0123456789abcdef"}))  # another model
    with pytest.raises(RunError) as err:
        run_audit([src], model, out, unit_rows=4, batch_size=4)
    assert str(err.value) == (f"{out} holds a different run: model_fingerprint: '0123456789abcdef' -> '{now}'. "
                              f"It was scored with a model with fingerprint 0123456789abcdef; this command names "
                              f"model {model} [{now}], another model or checkpoint (each model's run needs its own "
                              "--out; memaudit diff compares two runs). "
                              "Choose another --out, or rerun the original command to resume it.")


def test_a_calibration_fingerprinted_by_an_earlier_memaudit_says_how_to_make_one_that_matches(tmp_path, tiny_model_dir):
    """A calibration file made before the upgrade, for the same model, was refused as made "for model M [old], not
    M [new]: calibrate on a reference run of this model": calibrating the old reference run folder again gave the
    old fingerprint again, refused again. The refusal now says the model is the same and that the reference
    prompts must be scored again with this memaudit before calibrating."""
    import pytest

    from audit.calibrate import CalibrationError, calibrate, write_calibration

    model, earlier = _model_with_sentencepiece_file(tmp_path, tiny_model_dir)
    src = prompts_file(tmp_path / "p.txt", 8, seed=5)
    ref, manifest = run_audit([src], model, tmp_path / "ref", unit_rows=4, batch_size=4)
    now = manifest["model"]["fingerprint"]
    cal = calibrate(ref, fpr=0.5)
    cal["model"]["fingerprint"] = earlier
    path = write_calibration(cal, tmp_path / "cal.json")
    with pytest.raises(CalibrationError) as err:
        run_audit([src], model, tmp_path / "night", unit_rows=4, batch_size=4, calibration=str(path))
    assert str(err.value) == (
        f"--calibration {path} was made for model {model} [{earlier}], not [{now}], but the model is the same: an "
        f"earlier memaudit fingerprinted this model's same files as [{earlier}], before the fingerprint also covered "
        "memaudit.json's score settings, sentencepiece tokenizer files and SDXL's model_index.json and VAE settings, "
        "or left out weight files the load does not read (a fp16 variant beside the weights). "
        "Score the reference prompts again with this memaudit into a new --out, then `memaudit calibrate` that run (a "
        "reference run folder of the earlier memaudit gives a calibration with the earlier fingerprint)")
    assert not (tmp_path / "night" / "risk.parquet").exists()


def _set_fingerprint(run, manifest: dict, fingerprint: str) -> None:
    """Record ``fingerprint`` as run folder ``run``'s model fingerprint, in manifest.json and in its tables'
    metadata, as a version computing it so would have written them."""
    import json

    manifest["model"]["fingerprint"] = fingerprint
    (run / "manifest.json").write_text(json.dumps(manifest))
    for name in ("risk.parquet", "rejects.parquet"):
        table = pq.read_table(run / name)
        meta = dict(table.schema.metadata)
        if b"memaudit.model" in meta:
            meta[b"memaudit.model"] = json.dumps(json.loads(meta[b"memaudit.model"]) | {"fingerprint": fingerprint})
        pq.write_table(table.replace_schema_metadata(meta), run / name)


def test_diff_of_a_night_before_and_after_the_upgrade_does_not_call_the_same_model_another(tmp_path, tiny_model_dir):
    """`memaudit diff` of the last night before the upgrade and the first after warned "the runs used different
    models (M [old] vs M [new])": same name, same files, equal risks. It now says the fingerprints differ and
    why, not the model; two truly different fingerprints keep the old warning."""

    from audit.diff import diff_runs

    model, earlier = _model_with_sentencepiece_file(tmp_path, tiny_model_dir)
    src = prompts_file(tmp_path / "p.txt", 8, seed=6)
    old, manifest = run_audit([src], model, tmp_path / "old", unit_rows=4, batch_size=4)
    new, _ = run_audit([src], model, tmp_path / "new", unit_rows=4, batch_size=4)
    now = manifest["model"]["fingerprint"]
    _set_fingerprint(old, manifest, earlier)  # as the earlier memaudit wrote it
    note = (f"an earlier memaudit fingerprinted this model's same files as [{earlier}], before the fingerprint also "
            "covered memaudit.json's score settings, sentencepiece tokenizer files and SDXL's model_index.json and "
            "VAE settings, or left out weight files the load does not read (a fp16 variant beside the weights)")
    want = f"the runs' model fingerprints differ ([{earlier}] vs [{now}]), but not their model files: {note}"
    assert diff_runs(old, new).warnings == [want]
    backwards = diff_runs(new, old).warnings  # (with a note that the old run started after the new one)
    assert backwards[0] == (f"the runs' model fingerprints differ ([{now}] vs [{earlier}]), but not their model "
                            f"files: {note}")
    assert not any("different models" in w for w in backwards)
    _set_fingerprint(old, manifest, "0123456789abcdef")
    assert diff_runs(old, new).warnings == [
        f"the runs used different models ({model} [0123456789abcdef] vs {model} [{now}])"]


def test_run_folders_and_calibrations_record_the_build_and_a_resume_across_an_upgrade_says_so(tmp_path,
                                                                                              tiny_model_dir):
    """run.json recorded no memaudit version and manifest.json's memaudit_version was "0.1.0" in every version, so an
    ops engineer could not tell which code made a folder or whether a resumed night mixed two versions. run.json
    (the build that started the folder), manifest.json (the one that finished it) and calibration files now record
    memaudit_build, a hash of the package's code; a resumed folder started by another build, or by a memaudit from
    before builds were recorded, says so, and is still resumed (the build is not part of the run's identity)."""
    import json

    from audit.build import memaudit_build
    from audit.calibrate import calibrate
    from audit.pipeline import RunConfig
    from audit.runner import execute

    build = memaudit_build()
    assert len(build) == 12 and int(build, 16) >= 0
    src = prompts_file(tmp_path / "p.txt", 8, seed=7)
    out, manifest = run_audit([src], tiny_model_dir, tmp_path / "run", unit_rows=4, batch_size=4)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["memaudit_build"] == build and manifest["memaudit_build"] == build
    assert json.loads((out / "manifest.json").read_text())["memaudit_build"] == build
    assert calibrate(out, fpr=0.5)["memaudit_build"] == build
    cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(out), unit_rows=4, batch_size=4)
    for started_by, said in ((None, "a memaudit from before builds were recorded"),
                             ("0123456789ab", "build 0123456789ab")):
        old = {k: v for k, v in run_json.items() if k != "memaudit_build"}
        (out / "run.json").write_text(json.dumps(old if started_by is None else old | {"memaudit_build": started_by}))
        notes = []
        _, again = execute(cfg, progress=False, log=notes.append)
        assert notes[:2] == [f"memaudit: resuming {out}: 2 of 2 units already done",
                             f"memaudit: note: {out} was started by another memaudit ({said}; this is build {build}): "
                             "its units keep the scores that version gave"]
        assert again["counts"]["scored"] == 8 and again["memaudit_build"] == build
    notes = []
    (out / "run.json").write_text(json.dumps(run_json))
    execute(cfg, progress=False, log=notes.append)
    assert not any("another memaudit" in n for n in notes)


def test_a_folder_of_an_older_run_schema_is_refused_saying_so_and_stays_readable(tmp_path, tiny_model_dir):
    """A run folder of run schema version 1 (before prompt_raw and rejects.detail) rerun after the upgrade was
    refused as "a different run: schema_version: 1 -> 2. Choose another --out, or rerun the original command to
    resume it", though no command of this memaudit resumes it. The refusal now names the earlier memaudit and
    says to run into a new --out, and a newer folder's the newer one; report, diff and calibrate still read the
    version-1 folder (its tables hand-written in the old shape), with its counts."""
    import json

    import pytest

    from audit.calibrate import calibrate
    from audit.diff import diff_runs
    from audit.errors import RunError
    from audit.report import build_report

    src = prompts_file(tmp_path / "p.txt", 8, seed=8)
    src.write_text(src.read_text() + "\n")  # one empty_prompt reject
    new, _ = run_audit([src], tiny_model_dir, tmp_path / "new", unit_rows=4, batch_size=4)
    old, manifest = run_audit([src], tiny_model_dir, tmp_path / "old", unit_rows=4, batch_size=4)
    for name, column in (("risk.parquet", "prompt_raw"), ("rejects.parquet", "detail")):  # version 1's tables
        table = pq.read_table(old / name)
        pq.write_table(table.drop([column]).replace_schema_metadata(table.schema.metadata), old / name)
    (old / "manifest.json").write_text(json.dumps(manifest | {"schema_version": 1}))
    run_json = json.loads((old / "run.json").read_text())
    for version, which in ((1, "an earlier memaudit"), (3, "a newer memaudit")):
        (old / "run.json").write_text(json.dumps(run_json | {"schema_version": version}))
        with pytest.raises(RunError) as err:
            run_audit([src], tiny_model_dir, old, unit_rows=4, batch_size=4)
        assert str(err.value) == (
            f"{old} was made by {which} (run folder schema version {version}; this memaudit writes version 2), which "
            "this one cannot resume or rerun: run into a new --out (memaudit report, diff and calibrate still read "
            "the old folder).")
    report = build_report(old)
    assert report.counts["scored"] == 8 and report.counts["rejected_by_reason"] == {"empty_prompt": 1}
    d = diff_runs(old, new)
    assert (d.summary["in_both"], d.summary["only_new"], d.summary["only_old"]) == (8, 0, 0)
    assert calibrate(old, fpr=0.5)["reference"]["size"] == 8


def test_a_folder_or_calibration_lacking_what_this_version_records_is_refused_as_an_earlier_ones(tmp_path,
                                                                                               tiny_model_dir):
    """memaudit of 2026-11-29 recorded no first_timestep in the score configuration and no limit in run.json. Its
    calibration was refused as "made for another score configuration (first_timestep: calibration None, run 981):
    rerun with the calibration's options or calibrate again" (no option gives None), and its run folder as "a
    different run: limit: None -> None; ... rerun the original command to resume it". Both now say an earlier
    memaudit made them, what it did not record, and what to do."""
    import json

    import pytest

    from audit.calibrate import CalibrationError, calibrate, write_calibration
    from audit.errors import RunError

    src = prompts_file(tmp_path / "p.txt", 8, seed=9)
    out, _ = run_audit([src], tiny_model_dir, tmp_path / "run", unit_rows=4, batch_size=4)
    cal = calibrate(out, fpr=0.5)
    del cal["score_config"]["first_timestep"]  # as the first calibration files were written
    path = write_calibration(cal, tmp_path / "cal.json")
    with pytest.raises(CalibrationError) as err:
        run_audit([src], tiny_model_dir, tmp_path / "night", unit_rows=4, batch_size=4, calibration=str(path))
    assert str(err.value) == (
        f"--calibration {path} was made by an earlier memaudit, which did not record the score configuration's "
        "first_timestep: it cannot be checked against this run; score the reference prompts again with this "
        "memaudit into a new --out, then `memaudit calibrate` that run")
    run_json = json.loads((out / "run.json").read_text())
    del run_json["limit"], run_json["score_config"]["first_timestep"]
    (out / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(RunError) as err:
        run_audit([src], tiny_model_dir, out, unit_rows=4, batch_size=4)
    assert str(err.value) == (
        f"{out} was made by an earlier memaudit, which did not record limit, score_config.first_timestep in its "
        "run.json: this one cannot resume or rerun it; run into a new --out (memaudit report, diff and calibrate "
        "still read the old folder).")


def test_diff_names_a_score_setting_the_older_run_did_not_record_as_unrecorded():
    """`memaudit diff` of a 2026-11-29 night (no first_timestep recorded) and a night after the upgrade warned
    "different score settings (first_timestep None -> 981)", as if the old run had chosen no first step. It now
    says the earlier memaudit did not record it."""
    from audit.diff import _comparability

    model = {"name": "m", "fingerprint": "f"}
    counts = {"rows_read": 3, "scored": 3, "rejected": 0}
    old = {"model": model, "counts": counts,
           "score_config": {"scorer": "attention_entropy", "layers": ["x"], "seed": 0}}
    new = {"model": model, "counts": counts,
           "score_config": {"scorer": "attention_entropy", "layers": ["x"], "seed": 0, "first_timestep": 981}}
    assert _comparability(old, new) == ["the runs used different score settings (first_timestep (not recorded by "
                                        "that run's earlier memaudit) -> 981)"]
    assert _comparability(new, old) == ["the runs used different score settings (first_timestep 981 -> (not "
                                        "recorded by that run's earlier memaudit))"]
    none = {**new, "score_config": {**new["score_config"], "first_timestep": None}}
    assert _comparability(none, new) == ["the runs used different score settings (first_timestep None -> 981)"]
    assert _comparability(new, new) == []
