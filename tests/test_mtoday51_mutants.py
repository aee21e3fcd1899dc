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
