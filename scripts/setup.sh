#!/usr/bin/env bash
# Create .venv (if missing) and install finsynth with the given extras. Idempotent and offline-safe
# once pip's cache is warm. torch is pinned first: a bare `torch` requirement would pull CUDA wheels.
#
# The `llamacpp` extra compiles llama-cpp-python. Its default build uses -march=native, and on machines
# whose CPU advertises AVX-512-FP16 / AMX the server then dies with SIGILL on its first completion. We
# build it ourselves with portable flags (AVX2/FMA/F16C, no native tuning) into a wheel folder keyed by
# version + flags, and install from there, so pip's own wheel cache can never hand back a native build.
#
# Dependencies: pip installs torch (its config may point at a CPU wheel), then uv the rest (~10 s vs ~95 s
# with pip), pinned to that torch; pip again if uv cannot be installed or fails.
#
# Quiet: pip's and the compiler's output go to a log file (.cache/setup.log, or $FINSYNTH_SETUP_LOG); the
# terminal shows one line per step with its time, and on a failure the log's last lines and its path.
#
# Why not GGML_BACKEND_DL=ON + GGML_CPU_ALL_VARIANTS=ON (one build, every CPU's kernels chosen at run time):
# such a wheel builds, but llama-cpp-python 0.3.x never calls ggml_backend_load_all(), so loading a model
# fails with "no backends are loaded" (abetlen/llama-cpp-python#2069, open). The portable AVX2 build stays for
# this wheel (the tests' second peer); llama.cpp's own llama-server, which the `llamacpp_server` provider runs,
# does call it and is built with every CPU variant (src/datagen/llm/llamacpp_server.py).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1-dev}"  # '' installs finsynth alone (the main job's call: scripts/demo.sh)
PY="${PYTHON:-python3}"
LLAMA_CPP_VERSION="${FINSYNTH_LLAMA_CPP_VERSION:-0.3.36}"
LLAMA_CMAKE_ARGS="${FINSYNTH_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF}"
LOG="${FINSYNTH_SETUP_LOG:-$PWD/.cache/setup.log}"
mkdir -p "$(dirname "$LOG")"

step() {  # step LABEL CMD...: "setup: LABEL ... 41 s"; CMD's output goes to $LOG; a failure shows the log's tail
  local label=$1 t0=$SECONDS rc=0
  shift
  printf 'setup: %s ... ' "$label"
  printf '\n==== %s: %s\n' "$(date '+%F %T')" "$label" >>"$LOG"
  "$@" >>"$LOG" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    printf '%d s\n' $((SECONDS - t0))
    return 0
  fi
  printf 'FAILED after %d s (exit %d)\n' $((SECONDS - t0)) "$rc"
  echo "setup: the last lines of $LOG:" >&2
  tail -n 25 "$LOG" | sed 's/^/  | /' >&2
  echo "setup: the whole log: $LOG" >&2
  exit "$rc"
}

install_deps() {  # uv resolves and installs the ~150 dependencies in ~10 s where pip takes ~95 s; pip if uv can't
  if .venv/bin/pip install "uv>=0.5,<1" && [ -x .venv/bin/uv ]; then
    # torch stays the CPU build installed above (uv does not read pip's config, where a CPU wheel may come from)
    local pin=.venv/finsynth-constraints.txt
    .venv/bin/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$pin" || : >"$pin"
    if .venv/bin/uv pip install --python .venv/bin/python --constraint "$pin" "$@"; then return 0; fi
    echo "setup: uv failed (above); installing with pip"
  fi
  .venv/bin/pip install "$@"
}

if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "finsynth needs Python >= 3.11"'
  step "creating .venv ($("$PY" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])'))" "$PY" -m venv .venv
  step "upgrading pip" .venv/bin/pip install --upgrade pip
fi
stamp=".venv/.finsynth-installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)-${EXTRAS//,/_}"
# an install of more extras from the same pyproject/setup.sh covers fewer (`test.sh` ran, then `demo.sh`)
covered() {
  local s have e ok
  for s in "${stamp%-*}"-*; do  # the stamps of this pyproject/setup.sh, one per extras set
    [ -f "$s" ] || continue
    have=",${s##*-},"
    have="${have//_/,}"  # ",dev,llamacpp,"
    ok=1
    for e in ${EXTRAS//,/ }; do [[ "$have" == *",$e,"* ]] || ok=0; done
    [ "$ok" -eq 1 ] && return 0
  done
  return 1
}
what="finsynth${EXTRAS:+[$EXTRAS]}"
if covered; then
  echo "setup: .venv already has $what for this pyproject.toml (nothing to install)"
else
  torch_version="${FINSYNTH_TORCH_VERSION:-2.13.0}"
  step "installing torch $torch_version (CPU wheels)" .venv/bin/pip install "torch==$torch_version"
  if [[ ",$EXTRAS," == *",llamacpp,"* ]]; then
    key=$(printf '%s %s' "$LLAMA_CPP_VERSION" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
    wheels="${FINSYNTH_WHEEL_CACHE:-$HOME/.cache/finsynth/wheels}/llama-cpp-python-$key"
    if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
      step "building llama-cpp-python $LLAMA_CPP_VERSION with portable flags (~10 min once on 2 cores)" \
        env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" FORCE_CMAKE=1 .venv/bin/pip wheel --no-cache-dir --no-deps \
        -w "$wheels.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
      rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
    fi
    step "installing llama-cpp-python[server] $LLAMA_CPP_VERSION from $wheels" \
      .venv/bin/pip install "$wheels"/llama_cpp_python-*.whl "llama-cpp-python[server]==$LLAMA_CPP_VERSION" \
      --find-links "$wheels"
  fi
  step "installing $what and its dependencies" install_deps -e ".${EXTRAS:+[$EXTRAS]}"
  touch "$stamp"
  echo "setup: done (pip's output: $LOG)"
fi
