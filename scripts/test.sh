#!/usr/bin/env bash
# The test command: set up (if needed), then run the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,llamacpp
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest --durations=15 "$@"  # the 15 slowest tests at the end: where suite time goes
