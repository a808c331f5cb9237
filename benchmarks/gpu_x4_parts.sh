#!/usr/bin/env bash
# 4-GPU device calls, one part or several per call (each under its own timeout, results and
# logs under $OUT): check = bf16 SP correctness vs one GPU; weak = weak scaling (pure linear
# and hybrid); weak-serial = weak pure-linear scaling with the serial LASP-2 schedule; strong =
# strong scaling at 128K in total; pp = the 32K pipeline grid of 1F1B against ZBVZeroBubble
# (pp = 2 with sp = 2, pp = 4) and pp = 1; pp-zb = 1F1B against ZBV without checkpointing (the
# deferred weight pass) at pp4 8K / 16K, pp2 x sp2 16K, pp2 x dp2 8K, one JSON each (merge them
# with pipeline.py --merge); pp-quick = the 8K pipeline smoke grid; e2e = the
# one-GPU trainer against the plain PyTorch baseline (GPU 0).
# SP_ARGS adds sp_scaling.py options to weak / strong (e.g. "--grad-sync ddp,fsdp-keep").
# Usage (on the device, repo root): bash benchmarks/gpu_x4_parts.sh check weak-serial ...
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
run() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s)"; local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? in $((SECONDS - t0))s"
  grep -v -i warn "$OUT/$name.log" | tail -${TAIL:-14}
}
TR="torchrun --nproc_per_node=4"
for part in "$@"; do
  case $part in
    check) run sp_check ${T_CHECK:-120} $TR benchmarks/gpu_sp_check.py \
      --out "$OUT/gpu_sp_check.json" ;;
    weak) run sp_weak ${T_WEAK:-240} $TR benchmarks/sp_scaling.py \
      --only ${SP_ONLY:-weak-linear,weak-hybrid} --steps ${SP_STEPS:-3} ${SP_ARGS:-} \
      --out "$OUT/sp_weak.json" ;;
    weak-serial) run sp_weak_serial ${T_WEAK:-240} $TR benchmarks/sp_scaling.py \
      --only weak-linear --lasp2-schedule serial --steps 3 --out "$OUT/sp_weak_serial.json" ;;
    strong) run sp_strong ${T_STRONG:-300} $TR benchmarks/sp_scaling.py \
      --only ${STRONG_ONLY:-strong-linear,strong-hybrid} --steps ${SP_STEPS:-3} ${SP_ARGS:-} \
      --out "$OUT/sp_strong.json" ;;
    pp) run pipeline ${T_PP:-330} $TR benchmarks/pipeline.py --schedules 1F1B,ZBVZeroBubble \
      --only ${PP_ONLY:-pp1-sp4,pp2-sp2,pp4} --warmup 1 --steps 2 --out "$OUT/pipeline.json" ;;
    pp-zb) for spec in "pp4 8192" "pp4 16384" "pp2-sp2 16384" "pp2-dp2 8192"; do
        set -- $spec
        run "pipeline_zb_$1_$2" ${T_PP:-110} $TR benchmarks/pipeline.py --only $1 --seq-len $2 \
          --ac none --schedules 1F1B,ZBVZeroBubble --warmup 1 --steps 4 \
          --out "$OUT/pipeline_zb_$1_$2.json"
      done ;;
    pp-quick) run pipeline_quick ${T_PP:-120} $TR benchmarks/pipeline.py --quick \
      --out "$OUT/pipeline_quick.json" ;;
    e2e) CUDA_VISIBLE_DEVICES=0 run e2e ${T_E2E:-330} python3 benchmarks/e2e_trainer.py \
      --seq-lens 32768 --ac full,partial:2,partial:4 --steps 4 --warmup 1 \
      --out "$OUT/e2e_trainer.json" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
