#!/usr/bin/env bash
# Install NanoStream and the given requirements file into the current Python, but only when
# something changed since the last install from this checkout: a pip run that finds everything
# present still costs ~10 s of resolving, which start.sh would otherwise pay on every launch.
# Usage: bash scripts/install.sh requirements.txt|requirements-dev.txt
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="$1"
# What the install depends on: the requirement files, the package's metadata, this Python and
# this checkout (the editable install points at it).
key=$( { cat requirements.txt "$requirements" pyproject.toml; python -VV; pwd; } | sha256sum | cut -c1-16)
stamp="$(python -c 'import sys; print(sys.prefix)')/.nanostream-installed-$key"
# The stamp is not enough: another checkout's install may have moved the editable link since.
here="$PWD/nanostream"
if [ -f "$stamp" ] && (cd / && python -c "import sys, torch, torchvision, streamlit, nanostream
sys.exit(nanostream.__path__[0] != sys.argv[1])" "$here") 2>/dev/null; then
  exit 0
fi
echo "installing NanoStream and $requirements (once; later launches skip this) ..." >&2
# torch and torchvision install from the local disk on NanoStream's machines (see README).
python -m pip install -q torch==2.14.1 torchvision==0.29.1 -r "$requirements" -e .
touch "$stamp"
