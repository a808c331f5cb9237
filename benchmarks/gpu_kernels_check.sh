#!/usr/bin/env bash
# One device-machine call: install carried wheels, smoke-check every kernel, time vs fla, run
# the GPU tests. Logs and JSON go to $OUT. Usage (on the device): bash benchmarks/gpu_kernels_check.sh [bench|test|all]
set -u
what=${1:-all}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
if [[ $what == all || $what == bench ]]; then
  timeout ${BENCH_TIMEOUT:-480} python3 benchmarks/kernels.py --out "$OUT/kernels_h100.json" ${BENCH_ARGS:---env-variants v2:LINSCALE_GLA_INTRA=v2} 2>&1 | tee "$OUT/bench.log"
fi
if [[ $what == all || $what == test ]]; then
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q -s -p no:cacheprovider -k "${TEST_K:-}" 2>&1 | tee "$OUT/test_gpu.log" | grep -v "^$" | tail -40
fi
