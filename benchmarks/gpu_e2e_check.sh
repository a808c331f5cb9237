#!/usr/bin/env bash
# One device-machine call (one GPU): the README's main job on CUDA, the trainer GPU tests, then
# the end-to-end benchmark against the plain PyTorch + fla baseline. Logs and JSON go to $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 -m launch.cli train --set logging.progress=false --set training.steps=60 \
  --set logging.run_dir=/tmp/runs 2>&1 | tail -3 | tee "$OUT/train_tiny.log"
timeout 150 python3 -m pytest -m gpu tests/gpu/test_trainer_gpu.py -q -p no:cacheprovider 2>&1 \
  | tail -15 | tee "$OUT/test_trainer_gpu.log"
timeout ${E2E_TIMEOUT:-330} python3 benchmarks/e2e_trainer.py --out "$OUT/e2e_trainer_h100.json" \
  ${E2E_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/e2e.log" | tail -30
