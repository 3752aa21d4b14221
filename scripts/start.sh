#!/usr/bin/env bash
# Install NanoStream (when needed) and start the app. Works offline: the bundled backbones and sample project.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh requirements.txt
cat >&2 <<'NOTE'
NanoStream opens at http://localhost:8501 (no browser starts by itself: open that address).
It listens on 127.0.0.1 only, so only this machine can reach it. To let others in, start it with
  bash scripts/start.sh --server.address 0.0.0.0
and know that anyone who can reach it can then edit every project, publish models and create API keys.
NOTE
exec python -m streamlit run app.py "$@"
