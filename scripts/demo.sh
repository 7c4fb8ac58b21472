#!/usr/bin/env bash
# The main job: set up (if needed), then run the whole pipeline on the offline demo profile as a
# Prefect deployment (local server on 127.0.0.1 + process worker, stopped afterwards).
# Extra args go to `python -m flows.deploy` (e.g. --deployment augment-only, --profile tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m flows.deploy --profile demo "$@"
