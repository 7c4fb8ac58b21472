#!/usr/bin/env bash
# The GPU checks in one run, on a machine with CUDA (the device machine): the CUDA tests (tests/test_cuda.py)
# and benchmarks/bench_train_gpu.py (three arms: TRL defaults, TRL tuned per its docs, finsynth; RUNS runs per
# arm, default 3, interleaved, each in a process of its own; median and spread per arm). TESTS=0 skips the
# tests; arguments after the script name go to the benchmark (e.g. --steps 8 --arms trl_tuned,finsynth).
# Packages missing from that machine's image travel as wheels in .whl/ (pip download --only-binary=:all:
# --python-version 3.12 ...: trl, bitsandbytes, datasets and the project's pure-Python needs).
# Logs and train_gpu.json go to $OUT (default gpu-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, trl, bitsandbytes, accelerate, datasets; print({m.__name__: m.__version__ for m in (torch, transformers, peft, trl, bitsandbytes, accelerate, datasets)})" 2>&1 | tee -a "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"
if [ "${TESTS:-1}" != 0 ]; then
  echo "== CUDA tests"
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
fi
echo "== bench_train_gpu (3 arms x ${RUNS:-3} runs)"
timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/bench_train_gpu.py --runs "${RUNS:-3}" --out "$OUT/train_gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
echo "== done"
