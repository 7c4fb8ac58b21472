#!/usr/bin/env bash
# The test command: set up (if needed), then run the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,llamacpp
# the PostgreSQL cache tests start a throwaway server (tests/pg_server.py): install the server once, without the
# default cluster Debian would create and start on port 5432
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  conf=/etc/postgresql-common/createcluster.conf
  [ -e "$conf" ] || { mkdir -p "${conf%/*}" && echo "create_main_cluster = false" >"$conf"; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold \
    postgresql >/dev/null
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest --durations=15 "$@"  # the 15 slowest tests at the end: where suite time goes
