#!/usr/bin/env bash
# Install headless Chromium from the Debian packages for the report's browser test
# (tests/test_report.py::test_report_html_in_chromium). Quiet; tolerates stale apt lists
# (refreshes them and retries once). Does nothing when Chromium is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1
}
if ! apt_install; then
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  apt_install
fi
command -v chromium >/dev/null 2>&1 || { echo "install-chromium: chromium not installed" >&2; exit 1; }
