#!/usr/bin/env bash
# The test suite: lint, then every test (CPU only; GPU / full-TensorRT tests skip with their reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
. "${VENV:-.venv}/bin/activate"
ruff check .
ruff format --check .
rc=0
python -m pytest -q -ra "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
