#!/usr/bin/env bash
# Create .venv (if missing) and install finsynth with the given extras. Idempotent and offline-safe
# once pip's cache is warm. torch is pinned first: a bare `torch` requirement would pull CUDA wheels.
#
# The `llamacpp` extra compiles llama-cpp-python. Its default build uses -march=native, and on machines
# whose CPU advertises AVX-512-FP16 / AMX the server then dies with SIGILL on its first completion. We
# build it ourselves with portable flags (AVX2/FMA/F16C, no native tuning) into a wheel folder keyed by
# version + flags, and install from there, so pip's own wheel cache can never hand back a native build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
PY="${PYTHON:-python3}"
LLAMA_CPP_VERSION="${FINSYNTH_LLAMA_CPP_VERSION:-0.3.36}"
LLAMA_CMAKE_ARGS="${FINSYNTH_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "finsynth needs Python >= 3.11"'
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
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
if ! covered; then
  .venv/bin/pip install -q "torch==${FINSYNTH_TORCH_VERSION:-2.13.0}"
  if [[ ",$EXTRAS," == *",llamacpp,"* ]]; then
    key=$(printf '%s %s' "$LLAMA_CPP_VERSION" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
    wheels="${FINSYNTH_WHEEL_CACHE:-$HOME/.cache/finsynth/wheels}/llama-cpp-python-$key"
    if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
      echo "setup: building llama-cpp-python $LLAMA_CPP_VERSION with portable flags (~10 min once on 2 cores)"
      CMAKE_ARGS="$LLAMA_CMAKE_ARGS" FORCE_CMAKE=1 .venv/bin/pip wheel -q --no-cache-dir --no-deps \
        -w "$wheels.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
      rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
    fi
    .venv/bin/pip install -q "$wheels"/llama_cpp_python-*.whl "llama-cpp-python[server]==$LLAMA_CPP_VERSION" \
      --find-links "$wheels"
  fi
  .venv/bin/pip install -q -e ".[${EXTRAS}]"
  touch "$stamp"
fi
