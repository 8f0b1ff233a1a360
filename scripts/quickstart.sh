#!/usr/bin/env bash
# The main job on a fresh machine: set-up, then pretrain the tiny preset on the built-in corpus with
# 2 processes under ZeRO-3 (CPU/gloo here; GPUs/NCCL where present), then export a Hugging Face
# folder. Extra arguments go to train.py (e.g. --max_steps 100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate" 2>/dev/null || true
RUN_DIR=${RUN_DIR:-runs/tiny_cpu}
NPROC=${NPROC:-2}
DS_CONFIG=${DS_CONFIG:-ds_configs/cpu_zero3.json}
# One thread per process: 2 processes on a 2-core machine.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} torchrun --nproc_per_node "$NPROC" train.py \
  --config configs/tiny_cpu.yaml --deepspeed_config "$DS_CONFIG" --run_dir "$RUN_DIR" "$@"
python -m roberta_ds.export --checkpoint "$RUN_DIR" --out "$RUN_DIR/hf"
python - "$RUN_DIR" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
train = [r for r in rows if "loss" in r]
valid = [r for r in rows if "valid_loss" in r]
print(f"quickstart: loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} "
      f"(step {train[-1]['step']}); validation loss {valid[-1]['valid_loss']:.3f}, "
      f"accuracy {valid[-1]['valid_accuracy']:.3f}; Hugging Face model in {sys.argv[1]}/hf")
PY
