#!/usr/bin/env bash
# The test suite: lint, then every test (CPU only; GPU / full-TensorRT tests skip with their reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
. "${VENV:-.venv}/bin/activate"
ruff check .
ruff format --check .
# Our onnxruntime CPU kernels (runners/ort_kernels: fetches onnxruntime's headers, compiles, caches), built once
# here so every test worker sees the same library; where it cannot be built its tests skip with the reason.
python -m gemma4_compile.runners.ort_kernels || echo "note: onnxruntime CPU kernels not built (see above)" >&2
# One worker per core, at most 4 (PYTEST_WORKERS overrides): most of the suite is single-threaded tracing and
# building, and each worker holds its own tiny exports (~2 GiB). Whole files go to one worker, so a file's
# module fixtures are made once. The 15 slowest tests are listed at the end, to keep CI's time in view.
workers=${PYTEST_WORKERS:-$(python -c "import os; print(min(4, len(os.sched_getaffinity(0))))")}
rc=0
python -m pytest -q -ra -n "$workers" --dist loadfile --durations=15 "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
