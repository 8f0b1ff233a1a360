#!/usr/bin/env bash
# Every GPU figure in one call, stage by stage, within ~9 minutes on one H100/H200:
#   bash scripts/gpu_suite.sh OUT            # on a machine with one CUDA GPU
#   bash scripts/gpu_suite.sh --dry-run OUT  # CPU: tiny shapes, Triton interpreter; checks the script
# Each stage writes under OUT/<stage>/ (log.txt, seconds, rc, its results) and a DONE marker when it
# exits 0; a second call skips finished stages, so a timeout keeps what finished and the next call
# continues. OUT/SUMMARY.md is rebuilt from what exists after every stage.
# DeepSpeed: taken from the environment, else installed from .whl/ (../shared/device/wheels.sh builds
# it) into /tmp/site; without either, the e2e stages are skipped with a NOTE (they run under
# DeepSpeed) and the others run. SUITE_SECONDS (default 540) bounds the whole call; SUITE_DATASET
# names a prepared dataset folder for the convergence stage (default: the built-in corpus, prepared
# under data_cache/; the GPU machine cannot prepare it, so carry data_cache/ there).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash scripts/gpu_suite.sh [--dry-run] OUT" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
DEADLINE=$(($(date +%s) + ${SUITE_SECONDS:-540}))
export DRY OUT PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SUITE_DATASET=${SUITE_DATASET:-builtin}
STAGES=(env gpu_tests kernels e2e_zero3 convergence calibration e2e_zero1 e2e_zero2 max_batch)

if ! python -c "import deepspeed" >/dev/null 2>&1 && compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if python -c "import deepspeed" >/dev/null 2>&1; then HAVE_DS=1; else HAVE_DS=0; fi
export HAVE_DS

stage_env() {
  python - "$1" <<'EOF'
import json, subprocess, sys, torch
from roberta_ds.benchmarks.common import env_info
info = env_info()
try:
    import deepspeed
    info["deepspeed"] = deepspeed.__version__
except ImportError:
    info["deepspeed"] = "not installed"
import transformers
info["transformers"] = transformers.__version__
info["dry_run"] = bool(int(__import__("os").environ["DRY"]))
info["gpus"] = torch.cuda.device_count()
json.dump(info, open(f"{sys.argv[1]}/env.json", "w"), indent=1)
print(json.dumps(info, indent=1))
if torch.cuda.is_available():
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    open(f"{sys.argv[1]}/nvidia-smi.txt", "w").write(smi)
EOF
}

stage_gpu_tests() {  # bf16 forward and every gradient of every kernel, the auto backend, parity
  python -m pytest tests -m gpu -q -p no:cacheprovider --junitxml "$1/junit.xml"
}

stage_kernels() {  # attention at 10% padding, layer_norm with dropout 0.1 (kernel_tools/bench.py's sweep)
  if ((DRY)); then
    TRITON_INTERPRET=1 python -m kernel_tools.bench --smoke --dtype fp32 --kernels layer_norm \
      --csv "$1/kernels.csv" --plot-dir "$1"
  else
    python -m kernel_tools.bench --dtype bf16 --csv "$1/kernels.csv" --plot-dir "$1"
  fi
}

e2e() {  # e2e DIR ZERO_STAGE NAME PRESETS SEQ_LENS [flags]: one e2e bench call, results NAME.*
  local d=$1 stage=$2 name=$3 presets=$4 seqs=$5
  shift 5
  local ds=ds_configs/zero${stage}_bf16.json extra=(--micro-batch 32 --warmup 3 --steps 10 "$@")
  if ((DRY)); then  # same files, tiny shapes, CPU configs (the Triton interpreter is too slow here)
    ds=ds_configs/cpu_zero${stage}.json presets=tiny seqs=32
    local keep=()
    [[ " $* " == *" --find-max-batch "* ]] && keep=(--find-max-batch)  # a no-op without CUDA
    extra=(--micro-batch 4 --warmup 1 --steps 2 --impls ours-torch,hf-sdpa "${keep[@]}")
  fi
  python -m roberta_ds.bench e2e --deepspeed_config "$ds" --presets "$presets" --seq-lens "$seqs" \
    "${extra[@]}" --csv "$d/$name.csv" --plot "$d/$name.png"
}

need_ds() {
  ((HAVE_DS)) && return 0
  echo "DeepSpeed is not installed and there is no .whl/ (bash ../shared/device/wheels.sh)" | tee "$1/NOTE"
  return 3
}

stage_e2e() {  # stage_e2e DIR ZERO_STAGE: base at seq 128 and 512, large at 512 (3 implementations)
  need_ds "$1" && e2e "$1" "$2" base base 128,512 && e2e "$1" "$2" large large 512
}
stage_e2e_zero1() { stage_e2e "$1" 1; }
stage_e2e_zero2() { stage_e2e "$1" 2; }
stage_e2e_zero3() { stage_e2e "$1" 3; }
stage_max_batch() {  # the largest micro-batch of large at seq 512 under ZeRO-1 (doubling from 8)
  need_ds "$1" && e2e "$1" 1 large large 512 --impls ours-triton,hf-sdpa --find-max-batch --steps 3
}

stage_convergence() {  # 300 bf16 steps, ours on Triton vs transformers, same weights and batches
  local args=(--preset base --kernels triton --dtype bf16 --steps 300 --micro-batch 32)
  ((DRY)) && args=(--preset tiny --kernels torch --dtype bf16 --steps 10 --micro-batch 4 --warmup 2)
  python -m roberta_ds.bench convergence --dataset "$SUITE_DATASET" "${args[@]}" --out "$1"
}

stage_calibration() {  # the static sm_90 report, then (GPU) measured against modelled per kernel
  if ((DRY)); then
    env -u TRITON_INTERPRET python -m kernel_tools.perf_report --presets tiny --seq-lens 128 --out "$1"
  else
    python -m kernel_tools.perf_report --calibrate --out "$1"
  fi
}

export -f stage_env stage_gpu_tests stage_kernels e2e need_ds stage_e2e stage_e2e_zero1 stage_e2e_zero2 \
  stage_e2e_zero3 stage_max_batch stage_convergence stage_calibration

declare -A BUDGET=([env]=30 [gpu_tests]=100 [kernels]=120 [e2e_zero3]=120 [convergence]=60
  [calibration]=60 [e2e_zero1]=60 [e2e_zero2]=60 [max_batch]=90)

run_stage() {
  local name=$1 d="$OUT/$1" left t start rc
  if [[ -f "$d/DONE" ]]; then
    echo "[$name] done in an earlier call: skipped"
    return 0
  fi
  left=$((DEADLINE - $(date +%s)))
  if ((left < 10)); then
    echo "[$name] not started: the suite's time (SUITE_SECONDS) is spent; call again to continue"
    return 0
  fi
  t=$((BUDGET[$name] < left ? BUDGET[$name] : left))
  ((DRY)) && t=$left  # CPU timings say nothing about the GPU budget
  rm -rf "$d" && mkdir -p "$d"
  echo "[$name] running (limit ${t}s) ..."
  start=$(date +%s)
  timeout --kill-after=10 "$t" bash -c '"$0" "$1"' "stage_$name" "$d" >"$d/log.txt" 2>&1
  rc=$?
  echo $(($(date +%s) - start)) >"$d/seconds"
  echo "$rc" >"$d/rc"
  if ((rc == 0)); then touch "$d/DONE"; fi
  echo "[$name] exit $rc after $(cat "$d/seconds")s"
}

for s in "${STAGES[@]}"; do
  run_stage "$s"
  python roberta_ds/benchmarks/suite_summary.py "$OUT" "${STAGES[@]}" >/dev/null  # stdlib only: fast
done
echo "summary: $OUT/SUMMARY.md"
((DRY)) || echo "publish it (bench_results/gpu/, README's headline): python -m roberta_ds.benchmarks.doc_tables --gpu-suite $OUT"
missing=0
for s in "${STAGES[@]}"; do [[ -f "$OUT/$s/DONE" ]] || missing=$((missing + 1)); done
((missing == 0))
