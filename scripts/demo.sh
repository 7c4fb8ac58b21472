#!/usr/bin/env bash
# The main job: set up (if needed), then run the whole pipeline on the offline demo profile as a
# Prefect deployment (local server on 127.0.0.1 + process worker, stopped afterwards).
# Extra args go to `python -m flows.deploy` (e.g. --deployment augment-only, --profile tiny).
# At the end it prints the two commands that show the run in a browser and chat with the tuned model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ""  # finsynth alone: the extras (Ray, PostgreSQL, pytest) are for scale-out and tests
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# the options that say where the run lives, forwarded to the printed commands
profile=demo; cfg_args=(); home_args=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --profile) profile="${args[i + 1]:-demo}" ;;
    --root|--set) cfg_args+=("${args[i]}" "${args[i + 1]:-}") ;;
    --home) home_args=(--home "${args[i + 1]:-}") ;;
  esac
done

rc=0
.venv/bin/python -m flows.deploy --profile demo "$@" || rc=$?
if [ "$rc" -eq 0 ]; then
  export_cmd=(.venv/bin/finsynth export --format gguf --profile "$profile" "${cfg_args[@]}")
  gguf_dir=$(.venv/bin/python -c 'import sys; from datagen.config import load_config; from flows.cli import _parser
a = _parser().parse_args(["export", *sys.argv[1:]])
c = load_config(a.config, profile=a.profile, overrides=a.overrides, root=a.root)
from training.export import default_out; print(default_out(c, "gguf"))' --profile "$profile" "${cfg_args[@]}" 2>/dev/null || echo data/models/exports/adapter/gguf)
  cat <<EOT

Next, look at the run in a browser (Prefect UI on 127.0.0.1, Ctrl-C stops it):
  .venv/bin/finsynth ui ${home_args[*]}
and chat with the tuned model in this terminal (transformers, nothing else to install):
  .venv/bin/finsynth chat --profile $profile ${cfg_args[*]}
or take it to llama.cpp / Ollama as a GGUF file (~1 min on 2 cores; docs/export.md):
  ${export_cmd[*]} && ollama create finsynth -f $gguf_dir/Modelfile && ollama run finsynth
EOT
fi
exit "$rc"
