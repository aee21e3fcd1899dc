"""Mutation review (session 52, helper mnew52a) of session 51's changes: code identity of callables
(registry._code_text, _settings_text, _plain), the SDXL settings and the fingerprint, the score cache's put lock,
read-only lookups and the `.sent` marker, runner.dropped_calibration_note, sources._OTHER_MAGICS, build.is_code, the
report's mixed_settings_warning and cli._flags_show_no_type. Each test pins a behaviour that a hand-made change of
the code (named in its docstring) left passing."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest


# ------------------------------------------------------------------ audit.scorers.registry: code identity

def _code(compute) -> str:
    from test_ucachefix_findings import obj_spec

    from audit.scorers.registry import code_identity

    return code_identity(obj_spec(compute))["code"]


def _weighted(ctx, weights=None, inner=None):
    return {"uc_obj": 1.0 - ctx.a[:, 0]}


def test_a_held_function_is_keyed_by_the_names_it_uses_and_its_nested_code():
    """_code_text keys a held function's names (co_names: a.sum and a.mean are one bytecode) and its nested code
    objects by their own code, constants included, without their line: dropping the names, spelling a nested code
    object by its repr (which holds its line, so the same code on another line was another key), or cutting nested
    code at a shallower depth (its constant 2 and 3 then one key) each passed the suite."""
    from test_ucachefix_findings import Held

    assert _code(Held(lambda a: a.sum())) != _code(Held(lambda a: a.mean()))
    nested_two = _code(Held(lambda a: (lambda b: 2 * b)(a)))
    assert _code(Held(lambda a: (lambda b: 2 * b)(a))) == nested_two  # the same code on another line
    assert _code(Held(lambda a: (lambda b: 3 * b)(a))) != nested_two
    assert _code(Held(lambda a: (lambda b: (lambda c: 2 * c)(b))(a))) != _code(
        Held(lambda a: (lambda b: (lambda c: 3 * c)(b))(a)))


def test_array_settings_are_keyed_by_dtype_and_shape_and_a_bfloat16_tensor_is_keyed():
    """An array's text holds its dtype and shape beside the digest of its bytes: zeros of float32 and of int32 (the
    same bytes), or of shape (2, 3) and (3, 2), are other settings. A bfloat16 tensor (which NumPy cannot hold) is
    keyed by its values as floats. Dropping dtype and shape, or the bfloat16 fallback (code_identity then raised
    TypeError, so the scorer could not run), passed the suite."""
    import numpy as np
    import torch
    from test_ucachefix_findings import Scaled

    from audit.scorers.registry import _settings_text

    assert _code(Scaled(1.0, np.zeros(4, np.float32))) != _code(Scaled(1.0, np.zeros(4, np.int32)))
    assert _code(Scaled(1.0, np.zeros((2, 3)))) != _code(Scaled(1.0, np.zeros((3, 2))))
    half = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert _code(Scaled(1.0, half)) == _code(Scaled(1.0, half.clone()))
    assert _code(Scaled(1.0, half)) != _code(Scaled(1.0, torch.tensor([1.0, 3.0], dtype=torch.bfloat16)))
    assert _settings_text(half) == _settings_text(np.array([1.0, 2.0], np.float32))
    assert _settings_text([1, 2]) != _settings_text((1, 2))


def test_a_closure_with_an_empty_cell_and_an_object_with_an_unset_slot_are_keyed():
    """A closure whose captured name is not bound yet (a helper defined after it) is keyed with None for that cell,
    and an object whose slot is not set has no such attribute: catching another error than the cell's ValueError,
    or reading a slot that is not set (AttributeError), passed the suite, and each made code_identity raise."""
    from audit.scorers.registry import _attributes

    def make():
        def compute(ctx):
            return later(ctx)

        code = _code(compute)  # later's cell is empty here
        later = _weighted  # noqa: F841 - binds the cell
        return code

    assert make() == make() and len(make()) == 16

    class Slots:
        __slots__ = ("factor", "unset")

        def __init__(self, factor):
            self.factor = factor

        def __call__(self, ctx):
            return _weighted(ctx)

    assert _attributes(Slots(2.0)) == {"factor": 2.0}
    assert _code(Slots(2.0)) != _code(Slots(3.0))


class _ShortList(list):
    """A list whose repr hides its values."""

    def __repr__(self):
        return "_ShortList(...)"


class _Key:
    """A dict key with object's repr (its memory address)."""

    def __hash__(self):
        return 1

    def __eq__(self, other):
        return isinstance(other, _Key)


def test_a_partials_arguments_are_keyed_by_repr_only_where_it_spells_them():
    """_plain: bytes and complex numbers are spelled by repr (a partial binding them keeps the code it had); a list
    subclass whose repr hides its values, and a dict whose key's repr names its address, are not plain, so they are
    keyed by their values; a partial's positional arguments that are not plain are keyed too. Dropping bytes and
    complex, taking list subclasses as plain, not checking the keys, or keying a non-plain partial's keywords only,
    each passed the suite."""
    import hashlib

    import numpy as np

    import test_mnew52a_mutants as me

    with open(me.__file__, "rb") as f:
        body = f.read()
    plain = repr(((), [("inner", b"\x00k"), ("weights", 1j)])).encode()
    assert _code(functools.partial(_weighted, inner=b"\x00k", weights=1j)) == hashlib.blake2b(
        plain + body + f"{me.__name__}._weighted".encode(), digest_size=8).hexdigest()
    assert _code(functools.partial(_weighted, weights=_ShortList([1.0]))) != _code(
        functools.partial(_weighted, weights=_ShortList([2.0])))
    assert _code(functools.partial(_weighted, weights={_Key(): 1})) == _code(
        functools.partial(_weighted, weights={_Key(): 1}))
    weights = np.arange(2000.0)
    other = weights.copy()
    other[1000] = -1.0
    assert _code(functools.partial(_weighted, None, weights)) != _code(functools.partial(_weighted, None, other))


# ------------------------------------------------------------------ audit.models.base: SDXL settings, weight names

@pytest.mark.parametrize("channels", [4, "abcd", {"a": 1}])
def test_a_vae_block_out_channels_that_is_no_list_is_a_model_error_naming_the_file(tmp_path, channels):
    """block_out_channels must be a list: a number was a TypeError from len(), and a text or an object of 4 was read
    as 4 levels (a scale factor of 8) with no word. Dropping the list check passed the suite."""
    from test_mtoday51_mutants import _sdxl_like

    from audit.errors import ModelError
    from audit.models.base import fingerprint_files, sdxl_vae_scale_factor

    root = _sdxl_like(tmp_path / "m", {}, {"block_out_channels": channels})
    said = f"{root / 'vae' / 'config.json'}: no block_out_channels list, which sizes SDXL's time_ids (a broken config)"
    for read in (sdxl_vae_scale_factor, fingerprint_files):
        with pytest.raises(ModelError) as exc:
            read(root)
        assert str(exc.value) == said


def test_force_zeros_is_read_as_a_truth_value_and_a_folder_without_an_index_has_no_settings(tmp_path):
    """force_zeros_for_empty_prompt 0 is the pipeline's False (as its truth value is what the pipeline tests): the
    same settings and fingerprint as false (keeping the raw 0 made another fingerprint for one behaviour). A folder
    without model_index.json has no settings outside its components and the fingerprint of its files (reading the
    index as required raised). Each mutant passed the suite."""
    from test_mtoday51_mutants import _sdxl_like

    from audit.models.base import fingerprint_files, sdxl_settings, settings_outside_components

    zero = _sdxl_like(tmp_path / "zero", {"force_zeros_for_empty_prompt": 0})
    false = _sdxl_like(tmp_path / "false", {"force_zeros_for_empty_prompt": False})
    assert sdxl_settings(zero) == {"force_zeros_for_empty_prompt": False, "vae_scale_factor": 8}
    assert settings_outside_components(zero) == settings_outside_components(false) == {
        "force_zeros_for_empty_prompt": False}
    assert fingerprint_files(zero) == fingerprint_files(false) != fingerprint_files(false, index=False)
    (zero / "model_index.json").unlink()
    assert settings_outside_components(zero) == {}
    assert fingerprint_files(zero) == fingerprint_files(zero, index=False)


def test_a_safetensors_header_that_is_no_json_object_gives_no_check(tmp_path):
    """names_without_weights: a header that is JSON but not an object (a list of numbers) is no check (None; loading
    the model says what is wrong), not a TypeError from reading its items as names. Dropping the object check passed
    the suite."""
    from audit.models.base import names_without_weights

    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes((3).to_bytes(8, "little") + b"[1]")
    assert names_without_weights(tmp_path, ["mid_block.attentions.0"]) is None


# ------------------------------------------------------------------ audit.cache: read-only folders, the put's check

def test_not_writable_tells_a_read_only_mount_from_a_permission_and_passes_a_name_it_cannot_look_at(tmp_path,
                                                                                                 monkeypatch):
    """not_writable: a folder that cannot be written is 'on a read-only file system' where statvfs says ST_RDONLY,
    else 'no write permission'; a name longer than the file system takes (is_dir raises ENAMETOOLONG) is None, for
    the folder check to name it. Saying 'read-only' for both, or letting the OSError out, passed the suites the
    session's changes ran (the CLI's 300-byte --out test passes either way)."""
    import os
    import types

    from audit.cache import not_writable

    folder = tmp_path / "f"
    folder.mkdir()
    assert not_writable(folder) is None and not_writable(tmp_path / "missing") is None
    assert not_writable(tmp_path / ("n" * 300)) is None
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(folder) else real_access(p, mode))
    assert not_writable(folder) == "no write permission"
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_flag=os.ST_RDONLY) if str(p) == str(folder)
                        else real_statvfs(p))
    assert not_writable(folder) == "on a read-only file system"


def test_read_only_notes_of_several_units_are_one_line_with_their_sum():
    """merge_notes makes the read-only cache's lines of a run's groups (one ScoreCache each) one line, their counts
    summed, in the place of the first; keeping the last group's count passed the suite, whose read-only runs had one
    group."""
    from audit.cache import merge_notes

    head = ("score cache: /c/k cannot be written (on a read-only file system): lookups only, its scores are served "
            "and new scores are not stored (")
    tail = " this run; they are in this run's table, and scored again next time)"
    other = "score cache: /c/k/part-1.parquet cannot be read now (x); not read by this run"
    assert merge_notes([f"{head}2{tail}", other, f"{head}0{tail}", f"{head}5{tail}", other]) == [
        f"{head}7{tail}", other]


def test_a_put_stores_its_scores_when_a_part_written_since_its_lookup_cannot_be_read(tmp_path):
    """A part another run wrote since this one's lookup whose pages fail their checksum is not this put's to judge
    (the next lookup sets it aside): the put stores its prompts whole, with no note. Letting the read's error out
    (it reached the put's OSError handler: 'cannot store 3 new scores', nothing stored) passed the suite."""
    from helpers import flip_a_bit_in_the_risk_page
    from test_ucachefix_findings import HASHES, SC, _rows, _scores

    from audit.cache import ScoreCache

    mine = ScoreCache(tmp_path / "cache", "fp", SC)
    assert mine.lookup(HASHES[:3]).num_rows == 0
    other = ScoreCache(tmp_path / "cache", "fp", SC)
    other.put(HASHES[:2], _scores([7, 8]), [[]] * 2, tag="other")
    (part,) = other.files()
    flip_a_bit_in_the_risk_page(part)
    mine.put(HASHES[:3], _scores([1, 2, 3]), [[]] * 3, tag="mine")
    assert not mine.notes
    (stored,) = [f for f in mine.files() if f != part]
    assert _rows([stored]) == [(HASHES[0], 1.0, 0.0), (HASHES[1], 2.0, 0.0), (HASHES[2], 3.0, 0.0)]


# ------------------------------------------------------------------ audit.runner.dropped_calibration_note

@pytest.mark.parametrize("manifest", [
    "[1, 2]",  # a JSON list: no sections
    '"text"',
    '{"calibration": null}',  # never calibrated
    '{"calibration": {"path": "cal.json"}}',  # no threshold
    '{"calibration": {"path": "cal.json", "threshold": "0.5"}}',
    "{not json",
])
def test_a_manifest_without_a_calibration_threshold_gives_no_dropped_flags_note(tmp_path, manifest):
    """dropped_calibration_note reads the finished run's manifest: one that is no JSON object, or whose calibration
    has no number for a threshold, gives no note (the rerun goes on; there were no flags to drop) rather than an
    AttributeError or KeyError out of the rerun. Dropping AttributeError from the caught reasons, or the threshold
    check, passed the suite, whose manifests were all memaudit's own."""
    from audit.runner import dropped_calibration_note

    (tmp_path / "manifest.json").write_text(manifest)
    assert dropped_calibration_note(tmp_path) is None
    assert dropped_calibration_note(tmp_path / "missing") is None


def test_a_dropped_calibration_without_a_path_is_named_by_its_threshold(tmp_path):
    """A calibration section without a path (or with one that is no text) is named by its threshold alone, with the
    digits that read back as it (audit.text.threshold_text). Reading the path whatever it holds (a KeyError, or 'None') passed the suite."""
    from audit.runner import dropped_calibration_note

    tail = ("; this rerun gives none, so its flags are dropped (flagged null, and no --fail-on-flagged gate): rerun "
            "with the same --calibration to keep them")
    for section in ('{"threshold": 1.23456789}', '{"threshold": 1.23456789, "path": null}'):
        (tmp_path / "manifest.json").write_text(f'{{"calibration": {section}}}')
        assert dropped_calibration_note(tmp_path) == (
            f"{tmp_path} was flagged with --calibration (risk > 1.23456789){tail}")
    (tmp_path / "manifest.json").write_text('{"calibration": {"threshold": 2, "path": "/c/cal.json"}}')
    assert dropped_calibration_note(tmp_path) == (
        f"{tmp_path} was flagged with --calibration /c/cal.json (risk > 2){tail}")


# ------------------------------------------------------------------ audit.sources: signatures of other formats

@pytest.mark.parametrize("size", [b"\x24\x00\x00\x00", b"\x0a\x01\x00\x00", b"\x00\x0a\x00\x00"],
                         ids=["size-0x24", "size-0x10a", "size-0xa00"])
def test_a_webp_image_whose_size_holds_a_line_feed_byte_is_refused_under_a_text_name(tmp_path, size):
    """A WebP file begins RIFF, its size (4 bytes, little-endian) and WEBP: the signature's '....' matched any byte
    but a line feed (re.match without DOTALL), so a WebP whose size holds a 0x0A byte (one file in about 64) named
    .csv was read as a CSV of junk columns, not refused as one of 0x24 is."""
    from audit import sources

    path = tmp_path / "pic.csv"
    path.write_bytes(b"RIFF" + size + b"WEBPVP8 " + bytes(range(256)))
    files, _ = sources.discover([str(path)])
    with pytest.raises(sources.SourceError, match="pic.csv: cannot read as .*: it is a WebP image, not text"):
        sources.plan_units(files, "prompt", unit_rows=1000)


@pytest.mark.parametrize("first", ["PAR1 is a name", "%PDF is a format", "GIF8 and GIF89 are words", "PK is a name",
                                   "RIFF is a word, WEBP another", "BZh9 and more", "see %PDF-1.7 spec"],
                         ids=["par1", "pdf", "gif8", "pk", "riff", "bzh9", "pdf-inside"])
def test_a_text_file_that_begins_like_a_signature_is_read(tmp_path, first):
    """Only a format's whole signature at the file's first byte refuses it: prompts that begin with its first
    letters (PAR1 without its 0x15, %PDF without its dash, GIF8 without 7a/9a, PK without 03 04, RIFF without WEBP
    four bytes on), or that hold a signature after their first byte (see %PDF-1.7, within the 16 bytes checked), are
    read as ever. Shortening a signature, or searching for it anywhere in those bytes, passed the suite, whose
    look-alike prompts began with none of these."""
    from test_ufsspec_findings import _read

    from audit import sources

    path = tmp_path / "p.txt"
    path.write_text(f"{first}\n%PDF-1.7 is a version\n", encoding="utf-8")
    files, _ = sources.discover([str(path)])
    assert [p for _, _, p in _read(files)] == [first, "%PDF-1.7 is a version"]


# ------------------------------------------------------------------ the report's mixed-settings warning

def test_the_mixed_settings_warning_names_the_resolved_batch_sizes_and_comes_after_the_gates(tmp_path,
                                                                                         tiny_model_dir,
                                                                                         monkeypatch):
    """mixed_settings_warning names the batch sizes that differ, not 'auto' (a unit that scored nothing before auto
    was resolved): 'batch_size 16 / 32'. The report lists it last, after the run's gate verdicts (the docstring's
    order: a gate's failure is what a reader must see first). Naming auto, or putting the line first, passed the
    suite."""
    import json

    from helpers import fail_batches_with, run_audit

    from audit.pipeline import mixed_settings_warning
    from audit.report import build_report

    used = {"batch_size": ["auto", 16, 32], "compile": [False], "mixed": ["batch_size"]}
    said = ("this run's units were scored with different settings (batch_size 16 / 32: a rerun with other options, "
            "scores served by --cache that another run computed, "
            "or a batch size halved after an out-of-memory error): a prompt's risk may differ between them by float "
            "rounding (about 1e-7), so ranks of near-equal risks may differ from a run scored in one go")
    assert mixed_settings_warning({"scored_with": used}) == said
    src = tmp_path / "p.txt"
    src.write_text("a red cat\nold city street\npoison apple\nblue dog\n")
    fail_batches_with(monkeypatch)
    out, manifest = run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=4)
    assert manifest["counts"]["rejected"] == 1
    manifest["scored_with"] = used
    (out / "manifest.json").write_text(json.dumps(manifest))
    warnings = build_report(out).warnings
    assert len(warnings) == 2 and warnings[0].startswith("the run failed (exit 4): ") and warnings[1] == said


# ------------------------------------------------------------------ audit.cli._flags_show_no_type

def test_a_typer_without_display_type_rich_is_left_as_it_is(monkeypatch):
    """_flags_show_no_type patches typer 0.29's TyperOption.display_type_rich; on a typer without it (older or
    newer) it sets nothing, rather than installing a wrapper that calls None on every option's help row. Dropping
    the `shown is None` guard passed the suite, which runs one typer. Called twice, it wraps once."""
    from typer import core
    from typer.core import TyperOption

    from audit.cli import _flags_show_no_type

    installed = TyperOption.display_type_rich
    assert installed.memaudit_flags
    _flags_show_no_type()
    assert TyperOption.display_type_rich is installed
    monkeypatch.delattr(TyperOption, "display_type_rich")  # memaudit's, then typer's own (on its base class)
    monkeypatch.delattr(core._TyperParameter, "display_type_rich")
    _flags_show_no_type()
    assert not hasattr(TyperOption, "display_type_rich")


# ------------------------------------------------------------------ audit.runner.read_only_rerun_needs

def test_a_read_only_rerun_must_write_for_a_calibration_retry_failed_confirm_or_missing_outputs(tmp_path,
                                                                                                tiny_model_dir,
                                                                                                monkeypatch):
    """A complete run folder on a read-only mount is answered from its manifest only where the rerun changes
    nothing. Each other case is refused saying what it must write: a --calibration the run was not flagged with (its
    flags and verdict would be the old ones), --retry-failed with a failed row, --confirm, and outputs not all there.
    Dropping any of those four reasons passed the suite (its read-only runs tested units left to score only): the
    rerun then answered from the old manifest, e.g. a run flagged with no calibration reported as the verdict of a
    --calibration run."""
    import dataclasses

    from helpers import fail_batches_with, prompts_file
    from test_ureadonly_findings import _read_only

    from audit.calibrate import calibrate, write_calibration
    from audit.config import RunConfig
    from audit.errors import RunError
    from audit.runner import dry_run, execute

    src = prompts_file(tmp_path / "p.txt", 8, seed=11)
    with open(src, "a") as f:
        f.write("poison apple\n")
    out = tmp_path / "r"
    cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), device="cpu", batch_size=8, out=str(out),
                    unit_rows=5, max_error_fraction=0.5)
    with monkeypatch.context() as m:
        fail_batches_with(m)
        execute(cfg, progress=False, log=lambda m: None)
    cal = write_calibration(calibrate(out, fpr=0.25), tmp_path / "cal.json")
    _read_only(monkeypatch, out)

    def needs(**kw):
        return dry_run(dataclasses.replace(cfg, **kw), log=lambda m: None)["out_read_only"]["needs"]

    assert needs() == []
    assert needs(calibration=str(cal)) == ["its flags to set with this --calibration"]
    assert needs(retry_failed=True) == ["1 of 2 units to score"]
    assert needs(confirm="noise_magnitude", confirm_top="2") == [
        "its --confirm noise_magnitude stage to check and write"]
    with pytest.raises(RunError, match="this rerun must write there: its flags to set with this --calibration; "):
        execute(dataclasses.replace(cfg, calibration=str(cal)), progress=False, log=lambda m: None)
    monkeypatch.undo()
    (out / "rejects.parquet").unlink()
    _read_only(monkeypatch, out)
    assert needs() == ["its outputs to write (manifest.json, risk.parquet, rejects.parquet are not all there, or are "
                       "an older memaudit's)"]


def test_a_read_only_folder_holding_another_run_is_refused_as_a_writable_one_is(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """A rerun into a read-only run folder that holds another run (here another --seed) is refused with the
    writable folder's refusal, naming the difference, not answered with that other run's figures and verdict.
    Dropping the same-run check of _read_only_rerun passed the suite, whose read-only reruns were all the same
    run."""
    import dataclasses

    from test_ureadonly_findings import OLD, _read_only, _txt

    from audit.config import RunConfig
    from audit.errors import RunError
    from audit.runner import execute

    out = tmp_path / "r"
    cfg = RunConfig(inputs=(_txt(tmp_path / "p.txt", OLD),), model=str(tiny_model_dir), device="cpu", batch_size=8,
                    out=str(out))
    execute(cfg, progress=False, log=lambda m: None)
    other = dataclasses.replace(cfg, seed=cfg.seed + 1)
    with pytest.raises(RunError) as writable:
        execute(other, progress=False, log=lambda m: None)
    assert "seed" in str(writable.value)
    _read_only(monkeypatch, out)
    with pytest.raises(RunError) as read_only:
        execute(other, progress=False, log=lambda m: None)
    assert str(read_only.value) == str(writable.value)


# ------------------------------------------------------------------ audit.faults: the limits named, a stale signal

def test_the_limits_are_named_as_ulimit_prints_them(monkeypatch):
    """_nofile_limit says 'unlimited' for RLIM_INFINITY (not -1) and '?' where getrlimit fails; _address_space_limit
    is None when unlimited (the memory line then names no limit) and the soft limit in GiB otherwise. Printing
    RLIM_INFINITY as a number, or as a GiB figure ('memory ran out (the process may use -9.31e-10 GiB ...'), passed
    the suite, whose tests replace both functions or set a limit."""
    import resource

    from audit import faults

    limits = {resource.RLIMIT_NOFILE: resource.RLIM_INFINITY, resource.RLIMIT_AS: resource.RLIM_INFINITY}
    monkeypatch.setattr(resource, "getrlimit", lambda which: (limits[which], resource.RLIM_INFINITY))
    assert faults._nofile_limit() == "unlimited"
    assert faults._address_space_limit() is None
    assert faults.memory_problem(MemoryError()) == "memory ran out"
    limits.update({resource.RLIMIT_NOFILE: 1024, resource.RLIMIT_AS: 3 << 30})
    assert faults._nofile_limit() == "1024"
    assert faults._address_space_limit() == "3 GiB"

    def fails(which):
        raise ValueError("no such resource")

    monkeypatch.setattr(resource, "getrlimit", fails)
    assert faults._nofile_limit() == "?" and faults._address_space_limit() is None


def _raises_terminated(call) -> bool:
    """Whether ``call()`` raises Terminated (a KeyboardInterrupt, which would stop pytest itself)."""
    from audit.faults import Terminated

    try:
        call()
    except Terminated:
        return True
    return False


def test_a_signal_swallowed_in_an_earlier_command_does_not_stop_the_next_one(monkeypatch):
    """terminate_as_interrupt (the start of each command in a process: audit.run called twice in a notebook or
    service) forgets a swallowed SIGTERM left pending by an earlier command, which raise_pending_termination would
    otherwise raise at the new run's first group of units; a pending one is raised once. Not forgetting it passed
    the suite."""
    import signal
    import sys

    from audit import faults

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        monkeypatch.setitem(faults._PENDING, "signum", signal.SIGTERM)
        faults.terminate_as_interrupt()
        assert not _raises_terminated(faults.raise_pending_termination)  # nothing pending
        faults._PENDING["signum"] = signal.SIGTERM
        assert _raises_terminated(faults.raise_pending_termination)
        assert not _raises_terminated(faults.raise_pending_termination)  # raised once
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------ audit.text.encodable

def test_encodable_escapes_what_the_encoding_lacks_and_leaves_unknown_encodings_alone():
    """encodable: Latin-1 keeps é and escapes 東 as the stream's backslashreplace does; ASCII escapes both; UTF-8
    (any spelling) and no encoding (None: a console that names none) keep the text; an encoding Python does not know
    keeps it too, rather than a LookupError out of the report. Dropping the LookupError catch or the None default
    passed the suite."""
    from audit.text import encodable

    assert encodable("café 東京", "latin-1") == "café \\u6771\\u4eac"
    assert encodable("café 東京", "ascii") == "caf\\xe9 \\u6771\\u4eac"
    for name in ("utf-8", "UTF8", "utf_8", None, "x-no-such-codec"):
        assert encodable("café 東京", name) == "café 東京", name


# ------------------------------------------------------------------ audit.cli.cleared_lines

def test_an_empty_confirm_says_it_drops_the_files_cascade_and_its_share(tmp_path):
    """`--confirm ''` over a --config file with confirm and confirm_top: the line (the dry run's stdout, a run's
    stderr) names the dropped scorer with its confirm_top and says the run scores in one stage, after the cache and
    calibration lines. Dropping the confirm_top or the 'one-stage scoring' words passed the suite, whose tests
    cleared the cache and the calibration only."""
    from dataclasses import fields

    from audit.cli import cleared_lines
    from audit.config import RunConfig, build_run_config

    (tmp_path / "c.toml").write_text('inputs = ["logs/"]\nconfirm = "noise_magnitude"\nconfirm_top = "1%"\n'
                                     'cache = "team-cache"\n')
    defaults = {f.name: f.default for f in fields(RunConfig) if f.name != "inputs"} | {"inputs": ()}
    cleared: dict = {}
    build_run_config(defaults | {"confirm": None, "cache": ""}, {"confirm", "cache"}, tmp_path / "c.toml", cleared)
    assert cleared_lines(cleared) == [
        "cache: none: --cache '' runs without the --config file's (team-cache): every prompt read is sent to the model",
        "confirm: none: --confirm '' runs without the --config file's (noise_magnitude, confirm_top 1%): one-stage "
        "scoring"]


# ------------------------------------------------------------------ audit.runner: the missing-id-column note

def test_the_missing_id_column_note_names_the_json_reasons_when_any_file_lacking_it_is_json_lines(tmp_path):
    """A CSV and a JSON-lines file both lacking the --id-column: some of their rows (the JSON lines that are no
    object, or whose prompt is a number) are rejected for that first, so the note names those reasons as it does for
    the JSON-lines file alone. Naming them only when every file lacking the column is JSON lines passed the suite,
    whose notes had one file lacking it."""
    from audit.runner import missing_id_column_note
    from audit.sources import discover, plan_units

    (tmp_path / "a.csv").write_text("id,prompt\n1,a red cat\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\nnot json\n{"prompt": 5}\n')
    (tmp_path / "c.csv").write_text("prompt\na blue dog\nan owl\n")
    files, _ = discover([str(tmp_path / n) for n in ("a.csv", "b.jsonl", "c.csv")])
    note = missing_id_column_note(plan_units(files, "prompt", id_column="id"), "id")
    assert note == (f"2 of 3 input files have no column 'id', so their 5 rows are rejected as missing_id_column (or "
                    "as invalid_json, invalid_utf8 or prompt_not_string, a JSON line that is that first); the first: "
                    f"{tmp_path / 'b.jsonl'} (columns: prompt)")


# ------------------------------------------------------------------ audit.sources.discover: an empty input

def test_a_blank_input_that_names_an_existing_folder_is_read(tmp_path, monkeypatch):
    """An input of blanks is refused as empty only where nothing has that name: a folder named ' ' in the working
    folder is read as any other ('' and a missing ' ' are refused). Refusing every blank name passed the suite."""
    from audit import sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / " ").mkdir()
    (tmp_path / " " / "p.txt").write_text("a red cat\n")
    files, _ = sources.discover([" "])
    assert [Path(f.url).name for f in files] == ["p.txt"]
    for raw in ("", "  "):
        with pytest.raises(sources.SourceError, match=rf"an input is empty \({raw!r}\)"):
            sources.discover([raw])


# ------------------------------------------------------------------ code identity of a notebook's compute

_NOTEBOOK_FUNCTION = "def compute(ctx):\n    return {'uc_obj': FACTOR * (1.0 - ctx.a[:, 0])}\n"
_NOTEBOOK_CLASS = ("class Scaled:\n    def __init__(self, factor):\n        self.factor = factor\n\n"
                   "    def __call__(self, ctx):\n        return {'uc_obj': self.factor * self.bos(ctx)}\n\n"
                   "    def bos(self, ctx):\n        return 1.0 - ctx.a[:, 0]\n")


def _cell(source: str, file: str, blank_lines: int = 0) -> dict:
    """``source`` run as a notebook cell runs it: compiled under the cell's file in a module without __file__."""
    import sys
    import types

    module = types.ModuleType("uc_notebook")  # no __file__, as a notebook's __main__
    sys.modules["uc_notebook"] = module
    exec(compile("\n" * blank_lines + source, file, "exec"), module.__dict__)
    return module.__dict__


def test_a_notebook_compute_keeps_its_code_identity_in_another_kernel_and_instance():
    """A compute defined in a notebook cell (its module has no file) was keyed by its marshalled code, which holds
    the cell's file (/tmp/ipykernel_<pid>/<hash>.py, another in every kernel): after a kernel restart the same
    function was another code, so the cache was cold and its run folder not resumed. A callable object of a class
    defined there was keyed by its repr, which names its address: another code for each instance. Now the code is
    keyed without its file or lines, and a callable object by its class's methods' code: equal code is one key, and
    an edited method (even one __call__ calls) another."""
    import sys

    try:
        first = _cell(_NOTEBOOK_FUNCTION, "/tmp/ipykernel_101/2754.py")["compute"]
        again = _cell(_NOTEBOOK_FUNCTION, "/tmp/ipykernel_202/9120.py", blank_lines=3)["compute"]
        assert _code(first) == _code(again)
        assert _code(first) != _code(_cell(_NOTEBOOK_FUNCTION.replace("1.0", "2.0"), "/tmp/k/1.py")["compute"])
        one = _cell(_NOTEBOOK_CLASS, "/tmp/ipykernel_101/1.py")["Scaled"]
        other = _cell(_NOTEBOOK_CLASS, "/tmp/ipykernel_202/7.py", blank_lines=2)["Scaled"]
        a, b = one(2.0), other(2.0)
        assert _code(a) == _code(b) == _code(one(2.0))
        assert _code(a) != _code(one(3.0))
        edited = _cell(_NOTEBOOK_CLASS.replace("return 1.0 -", "return 0.5 -"), "/tmp/k/2.py")["Scaled"]
        assert _code(edited(2.0)) != _code(a)
    finally:
        sys.modules.pop("uc_notebook", None)
