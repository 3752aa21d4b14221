#!/usr/bin/env bash
# Install NanoStream and start the app. Works offline: the bundled backbones and sample project.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.14.1 torchvision==0.29.1 -r requirements.txt -e .
exec python -m streamlit run app.py "$@"
