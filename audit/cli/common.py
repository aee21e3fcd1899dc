"""What every ``memaudit`` command shares: one-line errors (:func:`fail`, :func:`guarded`) and list options.

Owns the mapping of known exceptions (:data:`audit.errors.KNOWN_ERRORS`) to one-line messages. Must not
import any command module or heavy library: :mod:`audit.cli`, :mod:`audit.cli.report` and the lab's
CLI import it.
"""

from __future__ import annotations

import errno
import re
import sys
from typing import Optional

import typer

from audit.errors import KNOWN_ERRORS, RunFolderBusyError
from audit.text import visible

_STATE = {"debug": False}
_LINE_BREAKS = re.compile(r"[ \t]*[\r\n]+[ \t]*")


def say(message: str) -> None:
    """Print a line to stderr, with control characters escaped (:func:`audit.text.visible`): messages carry
    file names, column names and other text from the inputs, which must not drive the terminal."""
    try:
        typer.echo(visible(message), err=True)
    except OSError:  # stderr is gone (the terminal closed: SIGHUP): the exit code still says what happened
        pass


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr (escaped as :func:`say` does) and exit with ``code``. A line break in
    ``message`` (a library's exception text: the hub client's "Please check your internet connection" under its
    error) becomes a space, so that the error stays one line."""
    say("memaudit: error: " + _LINE_BREAKS.sub(" ", message.strip()))
    raise typer.Exit(code)


def guarded(fn, resumable: bool = True, output_option: str | None = None):
    """Run ``fn`` mapping known exceptions to one-line errors and their exit codes (2 for a known error, 1 for
    anything unexpected); with ``--debug`` the traceback is printed first, and the exit code stays the same.
    ``resumable``: an interruption says how to resume (``run``); False for a command that keeps nothing to resume
    from (``eval``, ``report``, ...), whose interruption says only that. ``output_option``: the option that writes
    elsewhere (``"-o / --output"`` for ``report``, ``calibrate``, ``diff``), named when the file system written is
    read-only, a file reached ``ulimit -f`` or the folder is not this user's to write: `memaudit report RUN --format
    md` on a read-only run folder said "make it writable (or write elsewhere)" and not how to write elsewhere.
    SIGTERM and SIGHUP unwind as Ctrl-C does (:func:`audit.faults.terminate_as_interrupt`) in every command:
    `report -o`, `calibrate -o` and `diff -o` took none, so a deploy's SIGTERM while one wrote its file ended it
    with no line said and left its temporary file."""
    from audit.faults import terminate_as_interrupt

    terminate_as_interrupt()
    try:
        return fn()
    except (typer.Exit, typer.BadParameter):  # a usage error found late: typer's own box and exit 2
        raise
    except KeyboardInterrupt as exc:
        from audit.faults import Terminated, resume_hint

        # `memaudit eval` said "rerun the same command with the same --out to resume": it has no --out, resumes nothing
        hint = f"; {resume_hint()}" if resumable else "; nothing was kept: rerun the command to start again"
        if isinstance(exc, Terminated):
            fail(f"terminated ({exc.signame}){hint}", exc.exit_code)
        fail(f"interrupted{hint}", 130)
    except Exception as exc:
        if isinstance(exc, BrokenPipeError):
            from audit.faults import stdout_closed, stdout_is_closed

            if stdout_is_closed():  # `memaudit ... | head`: the reader has what it wanted
                stdout_closed()
        if _STATE["debug"]:  # the traceback, then the same one line and exit code as without --debug
            import traceback

            traceback.print_exc(file=sys.stderr)
        if isinstance(exc, RunFolderBusyError):  # a scheduler's overlap: retry later (sysexits.h EX_TEMPFAIL)
            fail(str(exc).strip('"'), 75)
        if isinstance(exc, FileNotFoundError) and str(exc.strerror or "").startswith("No usable temporary directory"):
            # tempfile's, from torch's import (its compile cache folder) in a container with a read-only root file
            # system and no /tmp volume: "[Errno 2] No usable temporary directory found in [...]" said no remedy
            fail(f"{exc.strerror}: no folder for temporary files can be written, and torch needs one to load; set "
                 "TMPDIR to a writable folder (a container with a read-only root file system: mount a volume at "
                 "/tmp)")
        if isinstance(exc, KNOWN_ERRORS):
            text = str(exc).strip('"')
            if output_option and getattr(exc, "memaudit_path", None) and text.endswith(" or write elsewhere)"):
                text = f"{text[:-1]} with {output_option})"  # a folder this user may not write (atomic_path's)
            fail(text)
        from audit.faults import disk_fix, disk_problem

        what = disk_problem(exc) if isinstance(exc, OSError) else None  # the user's to fix (pyarrow sets no errno)
        if what:
            fix = disk_fix(what)
            # `memaudit report RUN -o out.md` into a read-only folder said "... writing .out.md.7bf848ea.tmp: ... a
            # run resumes from its finished units": a temporary name the user never gave, and a run's advice
            resume = "; a run resumes from its finished units" if resumable else ""
            written = getattr(exc, "memaudit_path", None) or exc.filename  # (audit.tables.atomic_path names it)
            elsewhere = " (or write elsewhere)"
            if output_option and fix.endswith(elsewhere):  # the option that does, by name
                fix = (f"{fix[:-len(elsewhere)]} and rerun the same command, or write elsewhere with "
                       f"{output_option}{resume}")
            else:
                fix = f"{fix} and rerun the same command{resume}"
            fail(f"{what}{f' writing {_written_name(written)}' if written else ''}: {fix}")
        from audit.faults import files_limit_fix, files_limit_problem

        if isinstance(exc, OSError) and (limit := files_limit_problem(exc)):  # the final merge's [Errno 24]: exit 1
            name = f" opening {_written_name(exc.filename)}" if exc.filename else ""
            fail(f"{limit}{name}: {files_limit_fix(limit)} and rerun the same command"
                 f"{'; a run resumes from its finished units' if resumable else ''}")
        from audit.faults import MEMORY_FIX, memory_problem

        if what := memory_problem(exc):  # a memory limit (ulimit -v, a container's) is the job's to raise, not a bug
            fail(f"{what}: {MEMORY_FIX}, then rerun the same command"
                 f"{'; a run resumes from its finished units' if resumable else ''}")
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:  # a path the user gave (--output, --config)
            name = visible(str(exc.filename)) if exc.filename else "a path given"
            fail(f"{name[:120]}{'...' if len(name) > 120 else ''}: a name in this path is longer than the file "
                 "system takes (255 bytes on most)")
        if isinstance(exc, KeyError):  # layer selection
            fail(str(exc.args[0]) if exc.args else str(exc))
        fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)


def terminal_width() -> int | None:
    """The width, in columns, that text on stdout is read at: ``COLUMNS`` where it is a positive integer (a shell
    sets it; ``COLUMNS=40`` for a narrow pane), else the width of the terminal stdout is, else None (a file or a
    pipe: no width, lines as long as they are). As rich and click read ``COLUMNS`` first."""
    import os

    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else None
    except (AttributeError, OSError, ValueError):  # a replaced or closed stdout (a test runner's)
        return None


def empty_path_line(label: str) -> str:
    """The refusal of an empty path given to the option or argument ``label`` (``-o / --output``, ``RUN_DIR``)."""
    return f"{label} is empty: give a file or folder name ('.' names the working folder)"


def _empty_paths_refused() -> None:
    """Refuse an empty value (``-o ''``, ``--out "$DIR"`` with DIR unset) for every path option and argument of
    every command (``report``, ``calibrate``, ``diff``, ``generate``, ``eval``, ``lab``, ``run --config``: those
    typed ``pathlib.Path``), in one line naming it (:func:`empty_path_line`), exit 2, before the command runs:
    ``Path('')`` is ``Path('.')``, so ``report RUN -o ''`` said "--output .: an HTML report is written to a .html
    file" and ``lab build --out ''`` trained into the working folder. typer 0.29 reads each value through
    ``_TyperParameter.process_value``, where the value is still the text given; a typer without it (or without
    ``type_descriptor.is_path``) is left as it is (tests/test_ufixcli_findings checks this one). ``run``'s
    ``--out``, ``--cache`` and ``--calibration`` are text: an empty ``--out`` is refused by
    :func:`audit.config.validate_config`, and ``--cache ''`` / ``--calibration ''`` drop the ``--config`` file's."""
    try:
        from typer.core import _TyperParameter
    except ImportError:
        return
    processed = getattr(_TyperParameter, "process_value", None)
    if processed is None or getattr(processed, "memaudit_empty_paths", False):
        return

    def process_value(self, ctx, value):
        if getattr(getattr(self, "type_descriptor", None), "is_path", False) and (
                value == "" or (isinstance(value, (list, tuple)) and "" in value)):
            opts = sorted(self.opts or [], key=len)
            label = " / ".join(opts) if self.param_type_name == "option" else (self.metavar or str(self.name).upper())
            fail(empty_path_line(label))
        return processed(self, ctx, value)

    process_value.memaudit_empty_paths = True
    _TyperParameter.process_value = process_value


_empty_paths_refused()


def _written_name(filename) -> str:
    """The file a failed write was for: ``filename`` itself, or for an atomic write's temporary file
    (``.NAME.1a2b3c4d.tmp``, :func:`audit.tables.tmp_path`) the file ``NAME`` it was to become, beside it."""
    from pathlib import Path

    from audit.tables import TMP_NAME

    path = Path(str(filename))
    match = TMP_NAME.fullmatch(path.name)
    return visible(str(path.with_name(match["name"]) if match else path))


def echo_path(path) -> None:
    """Print a path the command wrote (the run folder, a report, a calibration) on stdout: as given when stdout is
    a pipe or a file (a script reads it back, ``OUT=$(memaudit run ...)``), escaped on a terminal, so that control
    characters in an ``--out`` (an OSC title sequence, a carriage return) never drive it (:func:`visible`).
    To a pipe or a file it is written as the file system's bytes (:func:`os.fsencode`), whatever stdout's encoding:
    under ``PYTHONIOENCODING=cp1252`` a folder ``東京`` was printed ``\u6771\u4eac``, a path that does not exist,
    while under ``ascii`` click wrote its UTF-8 bytes. A stdout with no binary buffer under it (an ``io.StringIO``
    put in its place) gets the text."""
    import os

    text = str(path)
    if sys.stdout.isatty():
        typer.echo(visible(text, one_line=True))
    else:
        typer.echo(os.fsencode(text) if getattr(sys.stdout, "buffer", None) is not None else text)


def _split(values: Optional[list[str]], option: str) -> tuple[str, ...]:
    """The names in a repeatable, comma-separated option (``--keep-columns a,b --keep-columns c``), each value
    read as one CSV record, so a name holding a comma is given in double quotes: ``--keep-columns 'id,"a,b"'``
    (``""`` inside quotes for a quote). Spaces around a name are dropped, empty names skipped.

    Raises:
        typer.Exit: exit 2 after one line naming ``option``, for a value whose quotes do not close (``'"a,b'``), or
            a value that names nothing (``--by ''``, ``' , '``: :func:`audit.config.no_names_line`), which was read
            as no names at all, in silence.
    """
    from audit.config import no_names_line, split_names

    out: list[str] = []
    for v in values or []:
        try:
            names = split_names(v)
        except ValueError as exc:
            fail(f"{option} {v}: {exc}")
        if not names:
            fail(no_names_line(option, v))
        out += names
    return tuple(out)
