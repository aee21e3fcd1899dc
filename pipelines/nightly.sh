#!/usr/bin/env bash
# Nightly prompt-log audit: run (cached), write the reports, and diff against the previous night.
#   pipelines/nightly.sh [extra `memaudit run` options...]
# Environment: CONFIG (default: nightly-prompt-log.toml beside this script), RUNS (the folder holding the nightly
# run folders, default audits/nightly: keep it in step with `out` in the config), MEMAUDIT (the memaudit command,
# default: memaudit on PATH; from cron, give the full path: MEMAUDIT=/path/to/clone/.venv/bin/memaudit).
# Exit code: memaudit run's. 3 (more rows flagged than fail_on_flagged) and 4 (too many rows failed to score) come
# after the run's outputs are complete, so the reports and the diff are still written, then the script exits 3 or 4.
set -euo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/nightly-prompt-log.toml}
RUNS=${RUNS:-audits/nightly}
MEMAUDIT=${MEMAUDIT:-memaudit}
rc=0
new=$("$MEMAUDIT" run --config "$CONFIG" "$@") || rc=$?
if [ "$rc" -ne 0 ] && { [ "$rc" -ne 3 ] && [ "$rc" -ne 4 ] || [ -z "$new" ]; }; then
  exit "$rc"
fi
"$MEMAUDIT" report "$new" --format html >/dev/null
"$MEMAUDIT" report "$new" --format md >/dev/null
# the previous run: the most recently finished other run folder (by its manifest's time, not its name, so a
# same-day rerun in 'runs/{date}-{time}' finds the night before it)
prev=""
while IFS= read -r manifest; do
  d=$(dirname "$manifest")
  [ "$(cd "$d" && pwd)" = "$(cd "$new" && pwd)" ] && continue
  prev=$d
  break
done < <(ls -1t "$RUNS"/*/manifest.json 2>/dev/null)
if [ -n "$prev" ]; then
  "$MEMAUDIT" diff "$prev" "$new" --format md -o "$new/diff.md" >/dev/null
  echo "memaudit: compared with $prev: $new/diff.md" >&2
fi
echo "$new"
exit "$rc"
