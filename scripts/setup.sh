#!/usr/bin/env bash
# Create .venv (if missing) and install finsynth with the given extras. Idempotent and offline-safe
# once pip's cache is warm. torch is pinned first: a bare `torch` requirement would pull CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "finsynth needs Python >= 3.11"'
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=".venv/.finsynth-installed-$(cat pyproject.toml | sha256sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q "torch==${FINSYNTH_TORCH_VERSION:-2.13.0}"
  .venv/bin/pip install -q -e ".[${EXTRAS}]"
  touch "$stamp"
fi
