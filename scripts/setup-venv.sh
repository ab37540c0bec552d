#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned dependencies. torch first, pinned, so pip takes the CPU build
# instead of resolving a multi-GB CUDA build for an open range. pip's chatter goes to $VENV/pip.log.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
log="$VENV/pip.log"
{
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0
  python -m pip install -q -c constraints.txt -e ".[test,rtx,ray]"
} >"$log" 2>&1 || { cat "$log" >&2; echo "error: installing dependencies failed (log: $log)" >&2; exit 1; }
