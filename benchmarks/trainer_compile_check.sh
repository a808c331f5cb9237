#!/usr/bin/env bash
# GPU check (device machine, 2 GPUs): bf16 loss curves and step times of a narrowed LLLN
# Gated DeltaNet hybrid, sp=1 eager vs sp=1 training.compile vs sp=2 zigzag training.compile
# (trainer, 10 steps, 16K tokens; LR / WARMUP / VARIANT override). Writes $OUT/compile_sp.json.
set -u
rm -rf /tmp/cs  # fresh runs: the metrics files would otherwise be appended to
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
COMMON="--set model.preset=linear-llama3-1b --set model.n_layers=4 --set model.layer_pattern=LLLN --set model.n_kv_heads=8 --set model.linear_variant=${VARIANT:-gated_deltanet} --set training.steps=10 --set training.batch_size=1 --set training.seq_len=16384 --set logging.log_every=1 --set training.lr=${LR:-5e-5} --set training.warmup_steps=${WARMUP:-5} --set data.source=stdlib --set data.max_files=400 --set checkpoint.enabled=false --set logging.progress=false --set logging.run_dir=/tmp/cs --set parallel.activation_checkpointing=full"
timeout 150 torchrun --nproc_per_node=1 -m launch.cli train $COMMON --set logging.name=sp1_eager > $OUT/sp1_eager.log 2>&1; echo "sp1_eager rc $?"
timeout 200 torchrun --nproc_per_node=1 -m launch.cli train $COMMON --set logging.name=sp1_compile --set training.compile=true > $OUT/sp1_compile.log 2>&1; echo "sp1_compile rc $?"
timeout 200 torchrun --nproc_per_node=2 -m launch.cli train $COMMON --set logging.name=sp2_compile --set training.compile=true --set parallel.sp=2 --set parallel.layout=zigzag > $OUT/sp2_compile.log 2>&1; echo "sp2_compile rc $?"
python - <<'PY'
import json, os
out = {}
for n in ("sp1_eager", "sp1_compile", "sp2_compile"):
    p = f"/tmp/cs/{n}/metrics.jsonl"
    if not os.path.exists(p):
        out[n] = None; continue
    rows = [json.loads(l) for l in open(p) if '"loss"' in l]
    out[n] = {"loss": [r.get("loss") for r in rows], "step_s": [r.get("seconds") for r in rows], "keys": sorted(rows[0].keys()) if rows else []}
ref = out.get("sp1_eager")
for n, r in out.items():
    if r and ref:
        r["max_rel_loss_diff_vs_sp1_eager"] = max(abs(a - b) / abs(b) for a, b in zip(r["loss"], ref["loss"]))
json.dump(out, open(os.environ["OUT"] + "/compile_sp.json", "w"), indent=1)
for n, r in out.items():
    print(n, None if r is None else (r["loss"][:1] + r["loss"][-2:], r.get("max_rel_loss_diff_vs_sp1_eager"), r["step_s"][-3:]))
PY
