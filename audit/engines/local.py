"""The local engine: groups of units one after another in this process, with the driver's scorer; the next group
is read while the model scores the current one, and a watchdog fails a run that stops making progress.

Owns only where and in what order units run here. Must not import ray, the driver or the merge.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from audit.faults import StallWatchdog, raise_pending_termination, run_unit_with_retries, sigint_raises
from audit.unit import as_group, prepare_group, process_units

IN_PROCESS = True  # scores with the driver's own Scorer


def run(job) -> list:
    """Run ``job.units`` (an :class:`audit.engines.EngineJob`: units or groups of units) here; returns their
    :class:`audit.unit.UnitStats`, one per unit.

    Raises:
        audit.errors.RunError: a group failed after its retries, or no progress for ``--stall-timeout`` s.
    """
    cfg, scorer = job.cfg, job.scorer
    groups = [as_group(w) for w in job.units]
    stats = []
    with sigint_raises(), StallWatchdog(cfg.stall_timeout, "the run") as watchdog, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="memaudit-read") as pool:
        progress = watchdog.wrap(job.progress)
        nxt = pool.submit(prepare_group, groups[0], cfg) if groups else None
        for i, group in enumerate(groups):
            first = [nxt]  # the read under way, consumed by the first attempt; a retry reads the group again
            nxt = pool.submit(prepare_group, groups[i + 1], cfg) if i + 1 < len(groups) else None

            def attempt(group=group):
                read, first[0] = first[0], None
                prep = read.result() if read is not None else None  # its errors are the attempt's, retried, named
                return process_units(group, scorer, cfg, job.shard_dir, progress=progress, prepared=prep)

            stats.extend(run_unit_with_retries(attempt, group))
            raise_pending_termination()  # a SIGTERM swallowed while the group ran (a finalizer's "Exception ignored")
    return stats
