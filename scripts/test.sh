#!/usr/bin/env bash
# Install everything the tests need (when something changed), then run them. README's test command; CI runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's Chromium drives the browser test (Playwright is told to use it; it never downloads one).
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
bash scripts/install.sh requirements-dev.txt
# Two workers (pytest-xdist), each taking whole modules in conftest.py's order (end-to-end first):
# on two cores the run is ~25% shorter than one worker. The ten slowest tests are printed so the
# suite's cost stays visible.
python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10 "$@"
