#!/usr/bin/env bash
# Nightly prompt-log audit: run (cached), write the reports, and diff against the previous night.
#   pipelines/nightly.sh [extra `memaudit run` options...]      (--dry-run: only check the night, nothing written)
# Environment: CONFIG (default: nightly-prompt-log.toml beside this script), RUNS (the folder holding the nightly
# run folders, default audits/nightly: keep it in step with `out` in the config), MEMAUDIT (the memaudit command,
# default: memaudit on PATH; from cron, give the full path: MEMAUDIT=/path/to/clone/.venv/bin/memaudit).
# Exit code: memaudit run's. 3 (more rows flagged than fail_on_flagged) and 4 (too many rows failed to score or
# to read) come after the run's outputs are complete, so the reports and the diff are still written, then the
# script exits 3 or 4. A report or diff that cannot be written is a warning: it never replaces the run's code.
# SIGTERM, SIGINT and SIGHUP are passed on to memaudit run (exit 143 / 130 / 129, the next invocation resumes).
set -uo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/nightly-prompt-log.toml}
RUNS=${RUNS:-audits/nightly}
MEMAUDIT=${MEMAUDIT:-memaudit}
# pipelines/nightly.sh --dry-run checks the night before it is scheduled: memaudit run --dry-run prints what the
# run would read and whether its --out is new, resumable or refused, with the run's exit code; there is no run
# folder to report on or diff (the summary is not a folder's name)
# pipelines/nightly.sh -h (--help): this script's usage, then memaudit run's options; nothing is run. Passed on to a
# run, the help text was taken for the run folder: both reports and the diff were tried on it, with pages of errors
for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
    sed -n '2,10s/^# \{0,1\}//p' "$0"
    exec "$MEMAUDIT" run --help
  fi
done
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then
    exec "$MEMAUDIT" run --config "$CONFIG" "$@"
  fi
done
# memaudit run in the background, so that a SIGTERM or SIGINT sent to this script (a scheduler stopping the job,
# `timeout`, a container's PID 1 stopped by Kubernetes) reaches it: it stops cleanly and the script exits 143 or 130.
# Without it bash died at once and left memaudit running, holding the run folder's lock, so the retry was refused.
# memaudit run's stdout (the run folder) goes to a temporary file: in $TMPDIR (or /tmp), else the working folder,
# else RUNS, which the nights are written under (a container with a read-only root file system and no /tmp volume)
runout=$(mktemp 2>/dev/null || mktemp -p . 2>/dev/null || { mkdir -p "$RUNS" && mktemp -p "$RUNS" .nightly.XXXXXX; } \
  2>/dev/null)
if [ -z "$runout" ]; then
  echo "memaudit: error: nightly.sh found no folder to hold a temporary file for memaudit run's output: neither" \
    "\$TMPDIR (or /tmp), the working folder nor RUNS ($RUNS) can be written; set TMPDIR to a writable folder" >&2
  exit 2
fi
rc=0
# the traps are set before memaudit starts: a signal between its start and the traps killed bash alone, leaving
# memaudit running (a test saw it under load); one that arrives before its pid is known is passed on once it is
pid="" pending=""
forward() { if [ -n "$pid" ]; then kill -"$1" "$pid" 2>/dev/null; else pending=$1; fi; }
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP   # a closed terminal or ssh session (not trapped under nohup: ignored)
"$MEMAUDIT" run --config "$CONFIG" "$@" >"$runout" &
pid=$!
if [ -n "$pending" ]; then kill -"$pending" "$pid" 2>/dev/null; fi
wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for memaudit's own exit code
  rc=0
  wait "$pid" || rc=$?
done
trap - TERM INT HUP
new=$(cat "$runout")
rm -f "$runout"
if [ "$rc" -ne 0 ] && { [ "$rc" -ne 3 ] && [ "$rc" -ne 4 ] || [ -z "$new" ]; }; then
  exit "$rc"
fi
for fmt in html md; do
  "$MEMAUDIT" report "$new" --format "$fmt" >/dev/null \
    || echo "memaudit: warning: the $fmt report of $new could not be written (above)" >&2
done
# the previous night: memaudit picks, among the run folders in RUNS, the latest one first started before this one
# (manifest times, not file times: a copy or restore changes those) that scored a row (an outage night is no
# baseline), so a rerun of an earlier night is compared with the night before it
if [ -d "$RUNS" ]; then
  "$MEMAUDIT" diff "$RUNS" "$new" --format md -o "$new/diff.md" >/dev/null \
    && echo "memaudit: diff: $new/diff.md" >&2 \
    || echo "memaudit: warning: no diff written for $new (above)" >&2
fi
echo "$new"
exit "$rc"
