#!/usr/bin/env bash
# Every GPU number of docs/performance.md in one device call (issue 14): run from the repository root
# on a machine with a CUDA GPU; results go to $OUT (or bench/results/gpu when $OUT is unset).
#   bash bench/gpu_all.sh            # ~8 min on one H100/H200
# Each command is bounded so one short call finishes; a failing one does not stop the rest.
set -u
OUT_DIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUT_DIR"
python - <<'PY' > "$OUT_DIR/gpu_env.txt" 2>&1
import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.device_count())
PY
run() { local name=$1; shift; echo "== $name: $*"; timeout "${LIMIT:-170}" "$@" > "$OUT_DIR/$name.log" 2>&1; echo "   exit $?"; tail -n 25 "$OUT_DIR/$name.log"; }
# The training-step ladder at real sizes (Whisper-large-v3 shapes + Llama-3-8B / Qwen2.5-7B shapes, bf16, flash SDPA): MFU per row.
run train_step_llama3_8b python bench/train_step.py --config gpu-llama3-8b --steps 5 --warmup 2 --baseline none --json "$OUT_DIR/train_step_gpu-llama3-8b.json"
run train_step_qwen2_5_7b python bench/train_step.py --config gpu-qwen2.5-7b --steps 5 --warmup 2 --baseline none --only 0,1 --json "$OUT_DIR/train_step_gpu-qwen2.5-7b.json"
# Tokens/s and memory per batch size.
run scaling_llama3_8b python bench/scaling.py --config gpu-llama3-8b --steps 3 --warmup 1 --batch-sizes 1,2,4,8,16,32 --lengths 5,30
# More than one GPU: the DDP test of the suite on the GPUs (the FSDP recipe needs real 8B weights,
# which a lent machine does not have; its sharding is exercised by recipes/fsdp_llama3_8b.yaml on a cluster).
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -gt 1 ]; then
  run ddp_gpus python -m pytest -q tests/test_distributed.py
fi
cp -f bench/results/*gpu* "$OUT_DIR"/ 2>/dev/null || true
