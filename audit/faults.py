"""Fault handling shared by the engines: bounded unit retries and a no-progress watchdog.

* :func:`run_unit_with_retries` runs one unit, retrying it a bounded number of times; a unit that keeps
  failing raises :class:`~audit.errors.RunError` naming it (finished units stay for the rerun).
* :class:`StallWatchdog` fails a run that makes no progress for ``--stall-timeout`` seconds with a message
  instead of letting it hang (the local engine; the Ray engine watches its progress tracker itself).

Owns retries, the stall watchdog and SIGTERM handling, for every engine, and the end of a command whose stdout
reader went away (:func:`stdout_closed`, which the command line's entry point gives rich's consoles). Must not
import torch, ray, the unit function or the engines.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import errno
import os
import _thread
import signal
import sys
import threading
import time

try:
    import resource
except ImportError:  # not POSIX
    resource = None

from audit.errors import IncompleteCaptureError, RunError, SourceError

DEFAULT_UNIT_RETRIES = 2  # attempts after the first one

# OSErrors that another attempt cannot cure: the disk is full, over quota or read-only, or a file reached the
# process's file size limit (`ulimit -f`, a container's or a batch system's: EFBIG, Python ignores SIGXFSZ). pyarrow
# raises them as a plain OSError whose errno is unset and whose message carries the C library's words.
_DISK_PROBLEMS = ((errno.ENOSPC, "No space left on device", "no space left on the device"),
                  (errno.EDQUOT, "Disk quota exceeded", "the disk quota is exceeded"),
                  (errno.EROFS, "Read-only file system", "the file system is read-only"),
                  (errno.EFBIG, "File too large", "a file reached the file size limit (ulimit -f)"))
# what the user does about each (:func:`disk_fix`), and before resuming a unit that could not be written
_DISK_FIXES = {"the file system is read-only": "make it writable (or write elsewhere)",
               "a file reached the file size limit (ulimit -f)": "raise the limit (or write elsewhere)"}
_UNIT_FIXES = {"the disk quota is exceeded": "free space within the quota",
               "the file system is read-only": "make the output's file system writable",
               "a file reached the file size limit (ulimit -f)": "raise the file size limit"}


def disk_problem(exc: BaseException | None) -> str | None:
    """What is wrong with the disk when ``exc`` (or an error it was raised from) is a full disk, an exceeded
    quota or a read-only file system (``"no space left on the device"``, ...); ``None`` for anything else.

    Reads ``errno`` (ENOSPC, EDQUOT, EROFS) and, for pyarrow's OSErrors that carry none, the C library's message
    for those codes.
    """
    for _ in range(8):  # the chain of causes, bounded
        if exc is None:
            break
        if isinstance(exc, OSError):
            for code, words, what in _DISK_PROBLEMS:
                if exc.errno == code or words in str(exc):
                    return what
        exc = exc.__cause__ or exc.__context__
    return None


def files_limit_problem(exc: BaseException | None) -> str | None:
    """What limit stopped a file from being opened when ``exc`` (or an error it was raised from) is the process's
    open-file limit (EMFILE: ``ulimit -n``, a scheduler's or a container's ``nofile``) or the system's open-file
    table (ENFILE); ``None`` for anything else. Neither says anything about the file: an input read under such a
    limit was rejected as ``unreadable_rows`` (``--skip-bad-files``, exit 0) or refused as a damaged file, and
    the final merge's ``OSError: [Errno 24]`` exited 1, as a bug does. Reads ``errno`` and, for pyarrow's
    OSErrors, the C library's words (``strerror(3)``)."""
    for _ in range(8):  # the chain of causes, bounded
        if exc is None:
            break
        if isinstance(exc, OSError):  # ENFILE first: its words hold EMFILE's ("Too many open files in system")
            if exc.errno == errno.ENFILE or "Too many open files in system" in str(exc):
                return SYSTEM_FILES
            if exc.errno == errno.EMFILE or "Too many open files" in str(exc):
                return f"the process reached its open-file limit (ulimit -n {_nofile_limit()})"
        exc = exc.__cause__ or exc.__context__
    return None


def _nofile_limit() -> str:
    """The process's soft open-file limit as ``ulimit -n`` prints it (``unlimited``; ``?`` where unknown)."""
    if resource is None:  # (imported with this module: at the limit, an import cannot open its file)
        return "?"
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return "?"
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


FILES_LIMIT_FIX = "raise it (ulimit -n 4096 in the job's shell, or its scheduler's nofile limit)"
SYSTEM_FILES = "the system's table of open files is full"  # (files_limit_problem, ENFILE)
# ulimit -n cannot raise the system's table: the machine's other programs hold it, or its limit is low
SYSTEM_FILES_FIX = "close files that other programs hold open, or raise the system's limit (sysctl fs.file-max)"


def files_limit_fix(problem: str) -> str:
    """What to do about :func:`files_limit_problem`'s ``problem``: raise the process's limit (``ulimit -n``), or
    for the system's full table (ENFILE), which no ``ulimit`` of this job raises, free or raise that."""
    return SYSTEM_FILES_FIX if problem == SYSTEM_FILES else FILES_LIMIT_FIX

# how running out of memory reads where it is not a MemoryError: a shared library that cannot be mapped (an import
# under `ulimit -v`, wrapped by diffusers in a RuntimeError), the C library's ENOMEM, torch's CPU allocator
_OUT_OF_MEMORY_WORDS = ("failed to map segment from shared object", "Cannot allocate memory",
                        "DefaultCPUAllocator: can't allocate memory", "std::bad_alloc")


def memory_problem(exc: BaseException | None) -> str | None:
    """``"memory ran out"`` (with the process's address-space limit, ``ulimit -v``, when one is set) when ``exc``
    or an error it was raised from is a MemoryError, an ENOMEM OSError or a library's words for one; ``None`` for
    anything else. Under ``ulimit -v 1000000`` a run exited 1, the code of a bug, with "RuntimeError: Failed to
    import diffusers.models.unets.unet_2d_condition ... _fblas...so: failed to map segment from shared object"."""
    for _ in range(8):  # the chain of causes, bounded
        if exc is None:
            break
        if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM) \
                or any(words in str(exc) for words in _OUT_OF_MEMORY_WORDS):
            limit = _address_space_limit()
            return f"memory ran out{f' (the process may use {limit}: ulimit -v)' if limit else ''}"
        exc = exc.__cause__ or exc.__context__
    return None


def _address_space_limit() -> str | None:
    """The process's soft address-space limit (``ulimit -v``) in GiB, e.g. ``"0.95 GiB"``; None when unlimited."""
    if resource is None:
        return None
    try:
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else f"{soft / 2**30:.3g} GiB"


MEMORY_FIX = "give the job more memory (raise ulimit -v, or the container's memory limit; a smaller --batch-size " \
             "lowers a run's peak)"


def disk_fix(what: str) -> str:
    """What to do about the disk problem ``what`` (:func:`disk_problem`'s words): ``"free some"`` for a full disk
    or quota, ``"make it writable (or write elsewhere)"``, ``"raise the limit (or write elsewhere)"``."""
    return _DISK_FIXES.get(what, "free some")

# the run folder of the run in progress in this process (its --out expanded: `runs/{date}-{time}` names a new
# folder at each invocation), so an interruption can say which --out resumes it; set by audit.runner.execute
RUN_FOLDER: dict = {"path": None}


def resume_hint() -> str:
    """How to resume the interrupted run: the expanded ``--out`` when a run folder was chosen, else the command."""
    path = RUN_FOLDER["path"]
    return f"rerun with --out {path} to resume" if path else "rerun the same command with the same --out to resume"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler stopping the job), or SIGHUP (the terminal or ssh session of the command
    closed): unwinds like Ctrl-C, so finished units stay committed and the command line says how to resume.

    Attributes:
        signum: the signal (``signal.SIGTERM`` unless given).
        signame: its name, as the command line prints it ("SIGTERM", "SIGHUP").
        exit_code: 128 + ``signum``, the status a shell reports for a command that signal ended (143, 129).
    """

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.signum = int(signum)

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# a SIGTERM or SIGHUP whose Terminated was swallowed: raised while Python ran a finalizer, a weakref or import-lock
# callback, or a __del__, it is printed as "Exception ignored in: ..." and the run went on to exit 0 (seen with a
# SIGTERM that arrived during an import); sys.unraisablehook (:func:`_noting_swallowed`) records it here and
# :func:`raise_pending_termination` raises it again
_PENDING: dict = {"signum": None}
# while :func:`termination_held` holds them, a SIGTERM or SIGHUP is noted here (``signum``) instead of raised
_HELD: dict = {"on": 0, "signum": None}


def _raise_terminated(signum, frame):
    if _HELD["on"]:
        _HELD["signum"] = _HELD["signum"] or signum
        return
    raise Terminated(signum)


@contextlib.contextmanager
def termination_held():
    """Hold SIGTERM and SIGHUP (where :func:`terminate_as_interrupt` took them) while the body runs: one that arrives is
    noted, and its :class:`Terminated` raised when the body ends (the first signal's), also in place of an exception the
    body raised after it (a SIGHUP's closed terminal fails the writes that follow with EIO: the command still exits 129,
    as it did when the signal ended the body at once). For lines that must be printed whole once the outputs exist: a
    run's summary and its run folder on stdout, which a scheduler reads (``OUT=$(memaudit run ...)``); a SIGTERM while
    the summary was printed ended it before the run folder's line. The handler only notes the signal, so a write that
    blocks (a stdout pipe nobody reads) is not interrupted by SIGTERM: the scheduler's SIGKILL after its grace period
    still ends it. Nests; the main thread only (a no-op elsewhere, where no handler runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _HELD["on"] += 1
    try:
        yield
    except BaseException as exc:
        if (signum := _release_held()) is not None and not isinstance(exc, Terminated):
            raise Terminated(signum) from exc  # a write that failed because of it (a closed terminal's EIO)
        raise
    if (signum := _release_held()) is not None:
        raise Terminated(signum)


def _release_held() -> int | None:
    """End one :func:`termination_held`; the signal it noted when it was the outermost, else None."""
    _HELD["on"] -= 1
    if _HELD["on"]:
        return None
    signum, _HELD["signum"] = _HELD["signum"], None
    return signum


def _noting_swallowed(previous):
    """A ``sys.unraisablehook`` that records a swallowed :class:`Terminated` in :data:`_PENDING`, then calls
    ``previous`` (which prints "Exception ignored in: ...", or pytest's)."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, Terminated):
            _PENDING["signum"] = unraisable.exc_value.signum
        previous(unraisable)

    hook.memaudit_notes_terminated = True
    return hook


def raise_pending_termination() -> None:
    """Raise :class:`Terminated` again for a SIGTERM or SIGHUP whose exception was swallowed where Python ignores
    exceptions (a finalizer, a callback: "Exception ignored in: ..."), so that it stops the command after all.
    Called between groups of units and before the final merge, where stopping keeps every committed unit."""
    signum, _PENDING["signum"] = _PENDING["signum"], None
    if signum is not None:
        raise Terminated(signum)


def terminate_as_interrupt() -> None:
    """Make SIGTERM, and SIGHUP unless it is ignored (``nohup``), raise :class:`Terminated` in the main thread
    (no-op elsewhere). Called before a run and again after ``ray.init``, whose driver otherwise aborts with a core
    dump on SIGTERM. SIGHUP (a closed terminal or ssh session) ended a run at once, exit 129 with no line said;
    finished units were kept, but a part being written was left as a temporary file."""
    if threading.current_thread() is threading.main_thread():
        _PENDING["signum"] = None  # (a signal an earlier command in this process took is not this one's)
        if not getattr(sys.unraisablehook, "memaudit_notes_terminated", False):
            sys.unraisablehook = _noting_swallowed(sys.unraisablehook)
        signal.signal(signal.SIGTERM, _raise_terminated)
        if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
            signal.signal(signal.SIGHUP, _raise_terminated)


@contextlib.contextmanager
def termination_handlers_kept():
    """For a library call (:func:`audit.run`, :func:`audit.score`): the SIGTERM and SIGHUP handlers and
    ``sys.unraisablehook`` as the caller had them, put back on exit, whatever happened inside. The Ray engine
    installs memaudit's after ``ray.init`` (:func:`terminate_as_interrupt`, for the run), and they stayed for the
    rest of the process: a service's own SIGTERM handler (its graceful shutdown) was replaced by one raising
    :class:`Terminated` wherever the main thread was. The command line installs memaudit's before it calls the run,
    so for it this puts back what it had. Off the main thread (where no handler can be installed) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    hook = sys.unraisablehook
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for signum, handler in saved.items():
            if handler is not None and signal.getsignal(signum) is not handler:  # None: installed outside Python
                signal.signal(signum, handler)


def finished_ignores_termination() -> None:
    """Ignore SIGTERM, and SIGHUP where :func:`terminate_as_interrupt` took it, once the command has finished and
    said so (its outputs written, its lines printed, its exit code known), for the rest of the process's exit. A
    SIGTERM there (a scheduler's, as the job ended) found Python's handler gone (the interpreter's finalization
    puts back the default action) and ended a finished run with exit 143 and no line, or raised
    :class:`Terminated` where nothing was left to catch it; the command's own exit code now stands. (An exit that
    hangs can still be ended with SIGKILL, as a scheduler does after its grace period.)"""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is _raise_terminated:
            signal.signal(signum, signal.SIG_IGN)


def sigint_not_ignored() -> None:
    """Give an inherited-ignored SIGINT Python's handler (KeyboardInterrupt), for the command line only (a library
    caller's own choice is left alone): a job started with ``&`` from a script or cron inherits SIGINT ignored,
    and a ``kill -INT`` before an engine took it (:func:`sigint_raises`: planning, the model's identity, ray.init)
    was dropped, the run going on to exit 0. Called first thing by the console script."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


STDOUT_CLOSED = 141  # 128 + SIGPIPE: the status of a tool that SIGPIPE ended (`git log | head`)


def stdout_closed():
    """End the command quietly with :data:`STDOUT_CLOSED` because the reader of its stdout went away
    (``memaudit report RUN | head``): that is the reader's choice, not an error to report. stdout is pointed at
    /dev/null first, so that the interpreter's final flush raises nothing. SIGPIPE itself is left ignored (Python's
    default): with its default action any closed socket (Ray, fsspec) would kill the process.

    Raises:
        SystemExit: always, with code 141.
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(STDOUT_CLOSED)


def stdout_is_closed() -> bool:
    """Whether stdout is a pipe whose reader went away (poll reports an error on its write end): tells a
    :class:`BrokenPipeError` of stdout from one of another pipe or socket. False where ``select.poll`` is missing
    (Windows)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def describe_unit(unit) -> str:
    """``unit 3 (data/a.parquet rows 40000-60000)``: how errors name a unit; a group of several units scored
    together (:class:`audit.unit.UnitGroup`) is ``units 3-302 (300 units scored together, data/a.parquet rows
    0-1 to data/z.parquet rows 0-1)`` (``units 1-5 (2 of them left, scored together, ...)`` where the units between
    were done before), a group of one as its unit."""
    units = getattr(unit, "units", None)
    if units is None or len(units) == 1:
        u = unit if units is None else units[0]
        return f"unit {u.index} ({u.url} rows {u.start}-{u.stop})"
    a, b = units[0], units[-1]
    how = (f"{len(units)} units scored together" if b.index - a.index + 1 == len(units)
           else f"{len(units)} of them left, scored together")  # a resumed group: units between were done before
    return f"units {a.index}-{b.index} ({how}, {a.url} rows {a.start}-{a.stop} to {b.url} rows {b.start}-{b.stop})"


def run_unit_with_retries(fn: Callable[[], object], unit, retries: int = DEFAULT_UNIT_RETRIES,
                          on_retry: Callable[[int, BaseException], None] | None = None):
    """Call ``fn()`` (which processes ``unit``) up to ``retries + 1`` times; return its result.

    A unit is idempotent (its shard is written atomically and only then committed), so retrying is safe.
    Errors that mean the scorer itself is broken (an incomplete attention capture), and an unreadable input
    (:class:`~audit.errors.SourceError`: :func:`audit.unit.prepare_unit` read it again already), are not retried,
    nor is a full, over-quota or read-only disk (:func:`disk_problem`): the run stops at once, saying so.

    Raises:
        audit.errors.RunError: the unit failed on every attempt, or once on a full disk; the message names it and
            the last error.
    """
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return fn()
        except (IncompleteCaptureError, RunError, SourceError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised below with the unit named
            what = disk_problem(exc)
            if what:
                fix = _UNIT_FIXES.get(what, "free space on the output's disk")
                raise RunError(f"{describe_unit(unit)} could not be written, {what} ({type(exc).__name__}: "
                               f"{str(exc)[:300]}); {fix}, then rerun the same command to resume: finished units "
                               "are kept") from exc
            last = exc
            if on_retry and attempt < retries:
                on_retry(attempt + 1, exc)
    raise RunError(f"{describe_unit(unit)} failed {retries + 1} times, last with "
                   f"{type(last).__name__}: {str(last)[:300]}; finished units are kept: rerun the same "
                   "command to resume") from last


@contextlib.contextmanager
def sigint_raises():
    """Inside the block SIGINT raises KeyboardInterrupt, whatever handler was installed or inherited before (a
    library's that swallows it; SIG_IGN, which a job started with ``&`` from a script inherits), so both engines stop
    on Ctrl-C or ``kill -INT`` alike. The handler is restored on exit; off the main thread it is a no-op."""
    try:
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class StallWatchdog:
    """Fail a run that reports no progress for ``timeout`` seconds: the one stall rule of every engine.

    Two ways to use it, same rule and same message:

    * polled (an engine that already loops, e.g. the Ray driver): call :meth:`beat` on progress and check
      :meth:`stalled` in the loop; raise ``RunError(watchdog.message(detail))``;
    * threaded (an engine that blocks, e.g. the local engine): enter it as a context manager and wrap the
      progress callback with :meth:`wrap`; on a stall a thread interrupts the main thread (SIGINT, again every
      ``timeout`` seconds while the stall lasts) and :meth:`__exit__` turns that interrupt into a
      :class:`~audit.errors.RunError`. Entered from the main thread, inside :func:`sigint_raises` (so
      that the interrupt raises KeyboardInterrupt whatever handler was installed before: one installed by a
      library loaded in the same process swallowed it once and left a stalled run running), as the local
      engine does. Entered from another thread (``audit.run`` called from a caller's worker thread), it sends
      nothing, as a SIGINT would interrupt the caller's main thread and not the block: the stall is recorded and
      :meth:`__exit__` raises the RunError when the block ends.

    Args:
        timeout: seconds without progress; ``None`` or ``<= 0`` disables the watchdog.
        what: the subject of the message ("the run", "the Ray run").
        clock: a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, timeout: float | None, what: str = "the run", clock: Callable[[], float] = time.monotonic):
        self.timeout = timeout if timeout and timeout > 0 else None
        self.what = what
        self.clock = clock
        self.last = clock()
        self.fired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interrupt = False  # whether a stall interrupts the main thread (entered from it)

    def beat(self) -> None:
        """Record progress now."""
        self.last = self.clock()

    def stalled(self) -> bool:
        """True when enabled and no progress was recorded for more than ``timeout`` seconds."""
        return self.timeout is not None and self.clock() - self.last > self.timeout

    def message(self, detail: str = "") -> str:
        """The stall error's text; ``detail`` (e.g. the units waited on) goes after the rule."""
        return (f"{self.what} made no progress for {self.timeout:g} s (--stall-timeout)"
                f"{'; ' + detail if detail else ''}; finished units are kept: rerun the same command to resume")

    def wrap(self, progress: Callable[[int], None]) -> Callable[[int], None]:
        """A progress callback that also records progress."""

        def advance(n: int) -> None:
            self.beat()
            progress(n)

        return advance

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if self.stalled():
                self.fired = True
                if self._interrupt:
                    try:  # a real SIGINT also interrupts a blocking call (sleep, I/O) of the main thread
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    except (AttributeError, OSError, ValueError):
                        _thread.interrupt_main()
                self.beat()  # if the interrupt was lost (a caught KeyboardInterrupt), send it again in `timeout` s

    def __enter__(self) -> "StallWatchdog":
        if self.timeout is not None:
            self.beat()
            self._interrupt = threading.current_thread() is threading.main_thread()
            self._thread = threading.Thread(target=self._watch, name="memaudit-stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.fired and (exc_type is None or issubclass(exc_type, KeyboardInterrupt)):
            raise RunError(self.message())
        return False
