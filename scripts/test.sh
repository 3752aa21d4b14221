#!/usr/bin/env bash
# Install everything the tests need, then run them. README's test command; CI runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's Chromium drives the browser test (Playwright is told to use it; it never downloads one).
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
# torch and torchvision install from the local disk on NanoStream's machines (see README).
python -m pip install -q torch==2.14.1 torchvision==0.29.1 -r requirements-dev.txt -e .
python -m pytest -q "$@"
