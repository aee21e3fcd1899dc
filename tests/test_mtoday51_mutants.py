"""Mutation review (session 51, helper mtoday) of the code merged on 2026-12-07: the faults' words for the open-file
limit and for memory that ran out, the score cache's put lock and compaction, the sent markers, code_identity of
callable objects, the CSV reader's quoted "", the guides, the SDXL fingerprint settings and the 60-column report.
Each test pins a behaviour that a hand-made change of the code (named in its docstring) left passing."""

from __future__ import annotations

import errno

import pytest


# ------------------------------------------------------------------ audit.faults

@pytest.mark.parametrize("exc, said", [
    (OSError(errno.ENFILE, "Too many open files in system"), "the system's table of open files is full"),
    (OSError("IOError: Too many open files in system. Detail: [errno 23]"), "the system's table of open files is full"),
    (OSError(errno.EMFILE, "Too many open files"), "the process reached its open-file limit (ulimit -n 64)"),
    (OSError("IOError: Failed to open local file 'x.parquet'. Detail: [errno 24] Too many open files"),
     "the process reached its open-file limit (ulimit -n 64)"),
    (OSError(errno.ENOENT, "No such file or directory"), None),
])
def test_the_open_file_limit_and_the_systems_file_table_are_told_apart(exc, said, monkeypatch):
    """files_limit_problem checked EMFILE's words ("Too many open files") before ENFILE's, which hold them ("Too many
    open files in system"): the system's full file table (ENFILE) was told as the process's ulimit -n, and its own
    line was dead code. ENFILE is checked first; by errno and, for pyarrow's OSErrors, by the C library's words."""
    from audit import faults

    monkeypatch.setattr(faults, "_nofile_limit", lambda: "64")
    assert faults.files_limit_problem(exc) == said


def _raised_from(cause: BaseException, outer: BaseException, implicit: bool) -> BaseException:
    try:
        try:
            raise cause
        except BaseException:
            if implicit:
                raise outer
            raise outer from cause
    except BaseException as exc:  # noqa: BLE001 - the test's own
        return exc


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOMEM, "mmap failed"),  # by its errno alone (its words are not the C library's)
    RuntimeError("terminate called after throwing an instance of 'std::bad_alloc'"),
    RuntimeError("libfoo.so: failed to map segment from shared object"),
    _raised_from(MemoryError(), RuntimeError("the worker failed"), implicit=False),  # a cause
    _raised_from(MemoryError(), RuntimeError("the worker failed"), implicit=True),  # a context
])
def test_memory_that_ran_out_is_found_by_errno_by_words_and_through_the_causes(exc, monkeypatch):
    """memory_problem: an ENOMEM whose words are not 'Cannot allocate memory', a C++ std::bad_alloc, an import's
    'failed to map segment' and a MemoryError under the error raised from it (a cause or a context) each read as
    memory that ran out; dropping the errno check, a word of _OUT_OF_MEMORY_WORDS or the walk down the causes
    passed the suite."""
    from audit import faults

    monkeypatch.setattr(faults, "_address_space_limit", lambda: "0.954 GiB")
    assert faults.memory_problem(exc) == "memory ran out (the process may use 0.954 GiB: ulimit -v)"


def test_an_error_that_is_not_memory_is_not_called_so():
    from audit import faults

    assert faults.memory_problem(RuntimeError("the worker failed")) is None
    assert faults.memory_problem(OSError(errno.ENOSPC, "No space left on device")) is None
    assert faults.memory_problem(None) is None


# ------------------------------------------------------------------ audit.cache: the put lock

def test_a_put_waits_for_the_put_lock_and_then_leaves_out_what_the_holder_stored(tmp_path):
    """A put that finds the put lock held waits for it (up to PUT_LOCK_WAIT_S), then leaves out the prompts that
    the holder stored: here another instance stores 2 of 3 prompts after this one's lookup, and the lock is held
    (another open file description of key.json) until a timer releases it. Giving up at once instead of waiting
    (the put then writes unchecked, the prompts twice) passed the suite: its two-process tests never met the lock
    held."""
    import fcntl
    import threading

    from test_ucachefix_findings import HASHES, SC, _rows, _scores

    from audit.cache import PUT_LOCK_WAIT_S, ScoreCache

    assert PUT_LOCK_WAIT_S >= 5  # a release after 0.3 s is well within it
    mine = ScoreCache(tmp_path / "cache", "fp", SC)
    assert mine.lookup(HASHES[:3]).num_rows == 0
    ScoreCache(tmp_path / "cache", "fp", SC).put(HASHES[:2], _scores([7, 8]), [[]] * 2, tag="other")
    with open(mine.dir / "key.json", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        release = threading.Timer(0.3, fcntl.flock, (held, fcntl.LOCK_UN))
        release.start()
        try:
            mine.put(HASHES[:3], _scores([1, 2, 3]), [[]] * 3, tag="mine")
        finally:
            release.join()
    assert not mine.notes
    assert _rows(mine.files()) == [(HASHES[0], 7.0, 0.0), (HASHES[1], 8.0, 0.0), (HASHES[2], 3.0, 0.0)]


def test_a_failure_stored_since_the_lookup_does_not_keep_a_put_from_storing_the_prompts_score(tmp_path):
    """A part written since the lookup that holds a prompt only as a failure (nonfinite set, as an older memaudit
    stored them) is a miss, not a stored score: the put still stores the prompt's finite score, and a lookup then
    serves it. Reading the failure as stored (dropping the nonfinite filter) passed the suite, and left the prompt
    with no finite row, scored again by every later run."""
    from test_ucachefix_findings import HASHES, SC, _rows, _scores

    from audit.cache import ScoreCache, cached_scores

    mine = ScoreCache(tmp_path / "cache", "fp", SC)
    assert mine.lookup(HASHES[:2]).num_rows == 0
    ScoreCache(tmp_path / "cache", "fp", SC).put(HASHES[:2], _scores([5, 6], [1, 0]), [[]] * 2, tag="old")
    mine.put(HASHES[:2], _scores([1, 2]), [[]] * 2, tag="mine")
    assert not mine.notes
    assert _rows(mine.files()) == [(HASHES[0], 1.0, 0.0), (HASHES[0], 5.0, 1.0), (HASHES[1], 6.0, 0.0)]
    again = ScoreCache(tmp_path / "cache", "fp", SC)

    def never(prompts):
        raise AssertionError(f"scored again: {prompts}")

    scores, _, errors, hits = cached_scores(again, ["p0", "p1"], HASHES[:2], never)
    assert (hits, errors, scores["risk"].tolist()) == (2, {}, [1.0, 6.0])


def test_a_compaction_drops_a_prompts_later_copies_but_keeps_the_failures_beside_them(tmp_path):
    """A part holding both a prompt stored earlier (a later copy, dropped) and a failure (nonfinite set, kept as the
    docstring of _first_rows says): the merged part keeps the failure. Keeping only the finite first rows there
    (keep = none of the failures) passed the suite, whose failure rows sat in parts without a copy."""
    from test_ucachefix_findings import HASHES, SC, _rows, _scores

    from audit.cache import ScoreCache

    cache = ScoreCache(tmp_path / "cache", "fp", SC)
    cache.put(HASHES[:2], _scores([1, 2]), [[]] * 2, tag="a")  # no lookup: written unchecked
    cache.put(HASHES[1:4], _scores([20, 3, 4], [0, 1, 0]), [[]] * 3, tag="b")
    assert len(_rows(cache.files())) == 5
    assert cache.compact(max_files=0) == 2 and not cache.notes
    assert _rows(cache.files()) == [(HASHES[0], 1.0, 0.0), (HASHES[1], 2.0, 0.0), (HASHES[2], 3.0, 1.0),
                                    (HASHES[3], 4.0, 0.0)]


def test_a_compaction_keeps_the_first_of_a_prompts_copies_within_one_part(tmp_path):
    """A part holding a prompt twice (an older memaudit's compaction merged every copy into one part): the merged
    part keeps its first row only. Keeping every finite row of a batch not seen before (all of its copies) passed
    the suite, whose copies were always in different parts."""
    from test_ucachefix_findings import HASHES, SC, _rows, _scores

    from audit.cache import ScoreCache

    cache = ScoreCache(tmp_path / "cache", "fp", SC)
    cache.put([HASHES[0], HASHES[1], HASHES[0], HASHES[2], HASHES[1]], _scores([1, 2, 10, 3, 20]), [[]] * 5,
              tag="old")
    assert cache.compact(max_files=0) == 1 and not cache.notes
    assert _rows(cache.files()) == [(HASHES[0], 1.0, 0.0), (HASHES[1], 2.0, 0.0), (HASHES[2], 3.0, 0.0)]


# ------------------------------------------------------------------ audit.scorers.registry.code_identity

def _made_scorer(factor):
    def scaled(ctx):
        return {"uc_obj": factor * (1.0 - ctx.a[:, 0])}

    return scaled


def _weighted(ctx, weights=None, inner=None):
    return {"uc_obj": 1.0 - ctx.a[:, 0]}


def test_closures_and_partials_that_differ_in_a_setting_have_other_code_identities():
    """Two closures of one factory (_made_scorer(10.0), _made_scorer(3.0): one module file, one qualified name) had
    one code identity, so a run with the second was served the first's cached scores, as callable objects were
    before session 51 keyed their attributes; and a partial's arguments were keyed by their repr, which elides a
    NumPy array's middle past 1,000 values (two weight vectors differing there were one code) and names an object's
    memory address (another code in every process, so a cold cache and a refused resume). Now a closure's cell
    values are keyed, and a partial's arguments whose repr is not exact by _settings_text; a function without a
    closure and a partial of plain values keep the code they had."""
    import functools
    import hashlib

    import numpy as np
    from test_ucachefix_findings import Inner, obj_spec

    from audit.scorers.registry import code_identity

    def code(compute):
        return code_identity(obj_spec(compute))["code"]

    assert code(_made_scorer(10.0)) == code(_made_scorer(10.0))
    assert code(_made_scorer(10.0)) != code(_made_scorer(3.0))
    weights = np.arange(2000.0)
    other = weights.copy()
    other[1000] = -1.0  # repr(other) == repr(weights)
    assert repr(other) == repr(weights)
    assert code(functools.partial(_weighted, weights=weights)) != code(functools.partial(_weighted, weights=other))
    assert code(functools.partial(_weighted, weights=weights)) == code(functools.partial(_weighted,
                                                                                         weights=weights.copy()))
    assert code(functools.partial(_weighted, inner=Inner(1))) == code(functools.partial(_weighted, inner=Inner(1)))
    assert code(functools.partial(_weighted, inner=Inner(1))) != code(functools.partial(_weighted, inner=Inner(2)))
    with open(__file__, "rb") as f:
        body = f.read()
    assert code(_weighted) == hashlib.blake2b(body + f"{__name__}._weighted".encode(), digest_size=8).hexdigest()
    plain = repr(((), [("inner", None), ("weights", [1.0, 2.0])])).encode()
    assert code(functools.partial(_weighted, weights=[1.0, 2.0], inner=None)) == hashlib.blake2b(
        plain + body + f"{__name__}._weighted".encode(), digest_size=8).hexdigest()
    plain = repr(((), [("inner", {"k": (1, "a")})])).encode()
    assert code(functools.partial(_weighted, inner={"k": (1, "a")})) == hashlib.blake2b(
        plain + body + f"{__name__}._weighted".encode(), digest_size=8).hexdigest()


class _Slotted:
    __slots__ = ("factor",)

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, ctx):
        return {"uc_obj": self.factor * (1.0 - ctx.a[:, 0])}


class _OneSlot:
    __slots__ = "factor"  # a string: one slot, not one a letter

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, ctx):
        return {"uc_obj": self.factor * (1.0 - ctx.a[:, 0])}


def test_a_callable_object_with_slots_is_keyed_by_them():
    """An object with __slots__ and no __dict__: its slots are its attributes (_attributes). Reading no slot (the
    code of its class alone, _Slotted(10.0) and _Slotted(3.0) one code) passed the suite, whose objects had a
    __dict__; a __slots__ given as one string names one slot."""
    from test_ucachefix_findings import obj_spec

    from audit.scorers.registry import _attributes, code_identity

    def code(compute):
        return code_identity(obj_spec(compute))["code"]

    assert _attributes(_Slotted(10.0)) == {"factor": 10.0} and _attributes(_OneSlot(2)) == {"factor": 2}
    assert code(_Slotted(10.0)) == code(_Slotted(10.0)) != code(_Slotted(3.0))
    assert code(_OneSlot(10.0)) != code(_OneSlot(3.0))


def test_equal_settings_give_one_code_whatever_their_order_or_address():
    """Equal settings are one code: attributes set in another order (a dict's items are sorted), and an attribute
    with no attributes of its own whose repr names its memory address (object(): the address is cut). Keeping the
    insertion order, or the address, passed the suite."""
    from test_ucachefix_findings import Scaled, obj_spec

    from audit.scorers.registry import code_identity

    def code(compute):
        return code_identity(obj_spec(compute))["code"]

    first, second = Scaled(10.0), Scaled(10.0)
    first.a, first.b = 1, 2
    second.b, second.a = 2, 1
    assert list(vars(first)) != list(vars(second))
    assert code(first) == code(second)
    assert code(Scaled(10.0, object())) == code(Scaled(10.0, object()))
    assert code(Scaled(10.0, {"x": 1, "y": 2})) == code(Scaled(10.0, {"y": 2, "x": 1}))
    assert code(Scaled(10.0, {"a", "b"})) == code(Scaled(10.0, {"b", "a"})) != code(Scaled(10.0, {"a", "c"}))


def test_array_and_tensor_settings_are_keyed_by_their_values():
    """An attribute holding a NumPy array or a torch tensor is keyed by its dtype, shape and a digest of its values:
    two of 2,000 values differing in the middle (where their repr elides them) are two codes. A digest of nothing,
    or a tensor keyed by its repr, passed the suite."""
    import numpy as np
    import torch
    from test_ucachefix_findings import Scaled, obj_spec

    from audit.scorers.registry import _settings_text, code_identity

    def code(compute):
        return code_identity(obj_spec(compute))["code"]

    weights = np.arange(2000.0)
    other = weights.copy()
    other[1000] = -1.0
    assert code(Scaled(1.0, weights)) != code(Scaled(1.0, other))
    assert code(Scaled(1.0, torch.from_numpy(weights))) != code(Scaled(1.0, torch.from_numpy(other)))
    assert code(Scaled(1.0, torch.from_numpy(weights))) == code(Scaled(1.0, torch.from_numpy(weights.copy())))
    assert _settings_text(torch.from_numpy(weights)) == _settings_text(weights)


# ------------------------------------------------------------------ audit.sources: a quoted "" read record by record

def test_a_records_empty_field_stays_empty_beside_a_quoted_empty_one(tmp_path):
    """In a record holding both a quoted "" and an empty field (`"",,x`), the record reader marks the quoted one
    only: the empty field stays null, as pyarrow reads it; and text after a closing quote joins its field
    (`"a,b"c` is one field, `a,bc`), so the fields after it keep their places. Marking every empty field of such a
    record, or ending a quoted field at its closing quote, passed the suite, whose rows held one or the other."""
    from audit.sources import QUOTED_EMPTY, _csv_rows

    src = tmp_path / "t.csv"
    src.write_text('id,prompt,extra\n"",,x\n,"",y\n"a ""b""",,""\n"a,b"c,"",z\n')
    rows = list(_csv_rows(str(src), quoted_empty=True))
    assert rows == [["id", "prompt", "extra"], ["", "", "x"], ["", "", "y"], ['a "b"', "", ""], ["a,bc", "", "z"]]
    assert [[v is QUOTED_EMPTY for v in row] for row in rows[1:]] == [[True, False, False], [False, True, False],
                                                                      [False, False, True], [False, True, False]]


def test_a_put_holds_the_put_lock_exclusively_while_it_writes(tmp_path, monkeypatch):
    """While a put writes its part, no other put can take the lock, shared or not: an exclusive flock. A shared one
    (LOCK_SH) passed the suite, since its tests never ran two puts at the same moment; two puts would then both
    check, both find nothing stored, and both store the prompts."""
    import fcntl

    import pyarrow.parquet as pq
    from test_ucachefix_findings import HASHES, SC, _scores

    from audit.cache import ScoreCache

    cache = ScoreCache(tmp_path / "cache", "fp", SC)
    cache.lookup(HASHES[:2])
    real, tried = pq.write_table, []

    def write(table, where, **kw):
        with open(cache.dir / "key.json", "rb") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
                tried.append("had it")
            except BlockingIOError:
                tried.append("held by the put")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", write)
    cache.put(HASHES[:2], _scores([1, 2]), [[]] * 2, tag="a")
    assert tried == ["held by the put"] and not cache.notes and len(cache.files()) == 1


# ------------------------------------------------------------------ audit.report: the top prompts at 60-80 columns

def test_the_top_prompts_are_a_table_only_where_the_prompt_gets_its_cells(tmp_path):
    """top_table_fits estimated the prompt's share of the text columns as 4 in 9 (their ratios), but rich, fitting a
    table wider than the terminal, narrows the widest wrapping columns first: a calibrated run's top prompts were a
    table from 65 columns with 6 cells a text column (its id cut as "part-3 / .parqu / et#11", its header as
    "trigge / r"), under the MIN_PROMPT_CELLS of 8 the docstring promises. With an equal share they are blocks up to
    70 columns and a table from 71, where the prompt gets 8 cells. (Keying the number columns by their headers only,
    not their widest values, and a MIN_PROMPT_CELLS of 12 passed the suite.)"""
    from test_ufixpkg_findings import _calibrated_run, _render

    run = _calibrated_run(tmp_path)

    def top(width):
        lines = _render(run, width)
        i = next(i for i, line in enumerate(lines) if "Top 2 prompts" in line)
        if not lines[i + 1].startswith("┏"):
            return lines[i + 1:i + 3]
        head = next(line for line in lines[i:] if line.startswith("┡"))
        return [len(cell) - 2 for cell in head[1:-1].split("╇")]

    for width in (60, 65, 70):
        assert top(width) == ["#1  risk 5.07000  pct -  FLAG  rows 1", "prompt number 11 about a cat"], width
    assert top(71) == [4, 7, 3, 4, 8, 8, 4, 8]  # rank, risk, pct, flag, prompt, trigger tokens, rows, prompt_id
    assert top(80) == [4, 7, 3, 4, 11, 11, 4, 11]


# ------------------------------------------------------------------ audit.models.base: SDXL settings in the fingerprint

def _sdxl_like(root, index: dict, vae: dict | None = None):
    """A folder that fingerprint_files reads as SDXL's (no weights: its files are what is hashed)."""
    import json

    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"} | index))
    if vae is not None:
        (root / "vae").mkdir()
        (root / "vae" / "config.json").write_text(json.dumps(vae))
    return root


def test_sdxl_settings_read_the_pipelines_defaults_and_refuse_an_empty_vae(tmp_path):
    """A model_index.json without force_zeros_for_empty_prompt is at the pipeline's default (True): nothing outside
    the components, the files' fingerprint (a default of False passed the suite, whose tiny SDXL index sets the key);
    an empty block_out_channels list is a ModelError naming the file, not a scale factor of 2 ** -1 (dropping the
    emptiness check passed)."""
    from audit.errors import ModelError
    from audit.models.base import fingerprint_files, sdxl_vae_scale_factor, settings_outside_components

    bare = _sdxl_like(tmp_path / "bare", {})
    assert settings_outside_components(bare) == {}
    assert fingerprint_files(bare) == fingerprint_files(bare, index=False)
    empty = _sdxl_like(tmp_path / "empty", {}, {"block_out_channels": []})
    with pytest.raises(ModelError) as exc:
        sdxl_vae_scale_factor(empty)
    assert str(exc.value) == (f"{empty / 'vae' / 'config.json'}: no block_out_channels list, which sizes SDXL's "
                              "time_ids (a broken config)")


def test_an_sdxl_folder_with_a_sentencepiece_file_is_told_its_fingerprint_before_the_settings(tmp_path):
    """The third EARLIER_FINGERPRINTS entry (this week's suffixes with .model, memaudit.json's settings, no settings
    outside the components): an SDXL folder with force_zeros_for_empty_prompt off and a .model file, fingerprinted
    by yesterday's memaudit, gets the note, as the earlier entries (no .model suffix) cannot match it. Dropping the
    entry passed the suite, whose SDXL folder has no .model file."""
    from audit.models.base import earlier_fingerprint_note, fingerprint_files

    root = _sdxl_like(tmp_path / "m", {"force_zeros_for_empty_prompt": False})
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "spiece.model").write_bytes(b"a sentencepiece model")
    yesterday = fingerprint_files(root, index=False)
    assert fingerprint_files(root) != yesterday
    assert earlier_fingerprint_note(root, yesterday) == (
        f"an earlier memaudit fingerprinted this model's same files as [{yesterday}], before the fingerprint also "
        "covered memaudit.json's score settings, sentencepiece tokenizer files and SDXL's model_index.json and VAE "
        "settings, or left out weight files the load does not read (a fp16 variant beside the weights)")


# ------------------------------------------------------------------ audit.guides

def test_a_guide_is_found_as_written_in_a_link_and_titled_by_its_first_heading():
    """memaudit docs NAME reads a guide's name as a clone's links write it (lab.md, docs/lab.md, docs\\lab.md, any
    case: LAB.MD was 'no guide named', its suffix cut before the case was folded) and lists each guide by its
    first heading's text. Reading the name as given (lowered), or the heading line whole, passed the quick tests
    (only the wheel test, which builds a wheel, said otherwise)."""
    from pathlib import Path

    from audit import guides

    docs = Path(__file__).resolve().parents[1] / "docs"
    for name in ("mitigation", "mitigation.md", "docs/mitigation.md", "docs\\mitigation.md", " MITIGATION.MD "):
        assert guides.find(name) == docs / "mitigation.md", name
    assert guides.title(docs / "gpu.md") == "The GPU path"
    assert guides.title(docs / "ray.md") == "Scaling out with Ray"


def test_default_layers_named_by_memaudit_json_need_no_denoiser(monkeypatch):
    """default_layers_from_config returns memaudit.json's default_layers without building the denoiser from its
    config (no diffusers model class made, even on the meta device). Dropping that shortcut passed the suite: every
    family's default_layers reads memaudit.json too, so only the cost (and a config diffusers cannot build) showed."""
    from pathlib import Path

    from audit.models.base import ModelAdapter

    def never(self, root):
        raise AssertionError("the denoiser was built")

    monkeypatch.setattr(ModelAdapter, "denoiser_from_config", never)
    assert ModelAdapter().default_layers_from_config(Path("/nonexistent"), {"default_layers": ["a.attn2"]}) == [
        "a.attn2"]


# ------------------------------------------------------------------ audit.unit: the sent marker

def test_a_sent_marker_cut_short_by_a_kill_holds_its_whole_entries(tmp_path):
    """read_sent of a marker whose last entry the kill cut short (16 bytes a prompt): the whole entries are read, the
    cut one matches no prompt; an empty write removes the marker. (The explicit cut of the last entry was
    redundant, a mutant no test could catch: removed.)"""
    from audit.sources import Unit
    from audit.unit import read_sent, sent_path, write_sent

    unit = Unit(url="x.txt", fmt="txt", start=0, stop=3, index=7)
    hashes = [f"{i:032x}" for i in (1, 2, 3)]
    write_sent(tmp_path, unit, hashes[:2])
    path = sent_path(tmp_path, unit)
    assert path.name == "unit-000007.sent" and path.read_bytes() == bytes.fromhex(hashes[0] + hashes[1])
    path.write_bytes(path.read_bytes()[:16] + bytes.fromhex(hashes[1])[:9])
    assert read_sent(tmp_path, unit, hashes).tolist() == [True, False, False]
    write_sent(tmp_path, unit, [])
    assert not path.exists() and read_sent(tmp_path, unit, hashes).tolist() == [False, False, False]


def test_a_prompt_marked_sent_that_fails_when_resumed_is_a_reject_not_a_prompt_sent(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    """A unit's sent marker (left by a killed invocation) names a prompt that the resumed unit scores again and the
    model fails on: it is a scoring_error reject, so the cache counts do not count it as scored ("sent to the
    model" is of the prompts that got a score: the unit's cache hits and its sent prompts reconcile with its unique
    scored prompts). Counting the marker's failed prompts (dropping `& ~failed` at the unit's count) passed the
    suite. The kill is simulated: the unit's commit and shards removed, its marker written as a kill leaves it
    (its prompts, the failed one included, as if the cache's put had failed for it)."""
    import polars as pl

    from audit.scorers import prompt_hash
    from helpers import fail_batches_with, run_audit

    src = tmp_path / "p.txt"
    prompts = ["a red cat", "a blue dog", "a poison apple", "an old city"]
    src.write_text("\n".join(prompts) + "\n")
    fail_batches_with(monkeypatch, "poison")
    kw = dict(device="cpu", batch_size=4, unit_rows=10, max_error_fraction=0.5, cache=str(tmp_path / "cache"))
    run, first = run_audit([src], tiny_model_dir, tmp_path / "run", **kw)
    assert (first["cache"]["hits"], first["cache"]["scored"]) == (0, 3)
    shards = run / "shards"
    for p in shards.glob("unit-000000*"):
        p.unlink()
    (shards / "unit-000000.sent").write_bytes(b"".join(bytes.fromhex(prompt_hash(p)) for p in prompts))
    run, resumed = run_audit([src], tiny_model_dir, tmp_path / "run", **kw)
    assert (resumed["cache"]["hits"], resumed["cache"]["scored"]) == (0, 3)
    assert resumed["counts"]["rejected_by_reason"] == {"scoring_error": 1}
    assert sorted(pl.read_parquet(run / "risk.parquet")["prompt"].to_list()) == ["a blue dog", "a red cat",
                                                                                "an old city"]


@pytest.mark.parametrize("exc, said", [
    (OSError(errno.ENFILE, "Too many open files in system"),
     "memaudit: error: the system's table of open files is full: close files that other programs hold open, or raise "
     "the system's limit (sysctl fs.file-max) and rerun the same command\n"),
    (OSError(errno.EMFILE, "Too many open files"),
     "memaudit: error: the process reached its open-file limit (ulimit -n 64): raise it (ulimit -n 4096 in the job's "
     "shell, or its scheduler's nofile limit) and rerun the same command\n"),
])
def test_the_system_file_table_is_not_told_to_raise_ulimit(exc, said, monkeypatch, capsys):
    """With ENFILE told apart (files_limit_problem), its fix is not the process's: `ulimit -n 4096` does not raise
    the system's table of open files, which the machine's other programs fill or its fs.file-max limits."""
    from audit import faults
    from audit.cli.common import guarded

    monkeypatch.setattr(faults, "_nofile_limit", lambda: "64")

    def command():
        raise exc

    with pytest.raises(__import__("typer").Exit) as exit_:
        guarded(command, resumable=False)
    assert exit_.value.exit_code == 2
    assert capsys.readouterr().err == said


def test_the_vae_fingerprint_of_generate_is_of_the_vae_files_alone(tmp_path):
    """fingerprint_files(root, ("vae",), settings=False), memaudit generate's VAE fingerprint, hashes the VAE's
    files only, not an SDXL folder's settings outside its components (force_zeros_for_empty_prompt is no VAE
    setting): two folders with one VAE and another model_index.json share it. Hashing the settings whatever
    `settings` says passed the suite."""
    from audit.models.base import fingerprint_files

    vae = {"block_out_channels": [32, 64, 64]}
    on = _sdxl_like(tmp_path / "on", {}, vae)
    off = _sdxl_like(tmp_path / "off", {"force_zeros_for_empty_prompt": False}, vae)
    assert fingerprint_files(on, ("vae",), settings=False) == fingerprint_files(off, ("vae",), settings=False)
    assert fingerprint_files(on) != fingerprint_files(off)
