"""The local engine: units one after another in this process, with the driver's scorer; the next unit is
read while the model scores the current one, and a watchdog fails a run that stops making progress.

Owns only where and in what order units run here. Must not import ray, the driver or the merge.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from audit.faults import StallWatchdog, run_unit_with_retries, sigint_raises
from audit.unit import prepare_unit, process_unit

IN_PROCESS = True  # scores with the driver's own Scorer


def run(job) -> list:
    """Run ``job.units`` (an :class:`audit.engines.EngineJob`) here; returns their :class:`audit.unit.UnitStats`.

    Raises:
        audit.errors.RunError: a unit failed after its retries, or no progress for ``--stall-timeout`` s.
    """
    cfg, scorer, units = job.cfg, job.scorer, job.units
    stats = []
    with sigint_raises(), StallWatchdog(cfg.stall_timeout, "the run") as watchdog, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="memaudit-read") as pool:
        progress = watchdog.wrap(job.progress)
        nxt = pool.submit(prepare_unit, units[0], cfg) if units else None
        for i, unit in enumerate(units):
            first = [nxt]  # the read under way, consumed by the first attempt; a retry reads the unit again
            nxt = pool.submit(prepare_unit, units[i + 1], cfg) if i + 1 < len(units) else None

            def attempt(unit=unit):
                read, first[0] = first[0], None
                prep = read.result() if read is not None else None  # its errors are the attempt's, retried, named
                return process_unit(unit, scorer, cfg, job.shard_dir, progress=progress, prepared=prep)

            stats.append(run_unit_with_retries(attempt, unit))
    return stats
