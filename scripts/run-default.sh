#!/usr/bin/env bash
# The main job on the built-in default (a tiny random-weight Gemma 4 E2B): export -> build (where a
# TensorRT can build) -> validate -> bench -> summary, into out/default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
. "${VENV:-.venv}/bin/activate"
gemma4-compile compile -o out/default --force "$@"
