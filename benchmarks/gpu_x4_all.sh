#!/usr/bin/env bash
# One 4-GPU device call: bf16 SP correctness vs one GPU, weak SP scaling (LASP-2 vs LASP-1),
# the quick pipeline grid, and the one-GPU end-to-end comparison. Every part has its own
# timeout so a failure leaves the others' results under $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
run() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s)"; local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? in $((SECONDS - t0))s"
  grep -v -i warn "$OUT/$name.log" | tail -${TAIL:-12}
}
run sp_check ${T_CHECK:-110} torchrun --nproc_per_node=4 benchmarks/gpu_sp_check.py \
  --out "$OUT/gpu_sp_check.json"
run sp_weak ${T_WEAK:-230} torchrun --nproc_per_node=4 benchmarks/sp_scaling.py \
  --only ${SP_ONLY:-weak-linear,weak-hybrid} --steps 3 --out "$OUT/sp_scaling.json"
CUDA_VISIBLE_DEVICES=0 run e2e ${T_E2E:-120} python3 benchmarks/e2e_trainer.py \
  --seq-lens 32768 --ac full,partial:2 --steps 3 --warmup 1 --out "$OUT/e2e_trainer.json"
run pipeline ${T_PP:-90} torchrun --nproc_per_node=4 benchmarks/pipeline.py --quick \
  --out "$OUT/pipeline.json"
