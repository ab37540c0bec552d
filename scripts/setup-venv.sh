#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned dependencies. torch first, pinned, so pip takes the CPU build
# instead of resolving a multi-GB CUDA build for an open range.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[test,rtx]"
