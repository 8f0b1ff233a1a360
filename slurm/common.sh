# Helpers shared by the sbatch scripts (sourced). Sets MASTER_ADDR/MASTER_PORT, checks the
# allocation and the input files, and activates the project's environment.

die() { echo "roberta-ds: error: $*" >&2; exit 1; }

cd "${SLURM_SUBMIT_DIR:-.}" || die "cannot enter the submit folder ${SLURM_SUBMIT_DIR}"
[ -f train.py ] || die "submit from the roberta-ds checkout (train.py not found in $PWD)"
# shellcheck disable=SC1091
source slurm/env.sh
if [ -n "${VENV:-.venv}" ] && [ -f "${VENV:-.venv}/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "${VENV:-.venv}/bin/activate"
fi

# Train arguments: the sbatch command line passes through to train.py; CONFIG/DS_CONFIG/RUN_DIR
# from the environment fill in what it does not say.
CONFIG=${CONFIG:-configs/base.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1_bf16.json}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-roberta}-${SLURM_JOB_ID:-local}}
REST=()
while (($#)); do
  case "$1" in
    --config) CONFIG=$2; shift 2 ;;
    --deepspeed_config|--deepspeed-config) DS_CONFIG=$2; shift 2 ;;
    --run_dir|--run-dir) RUN_DIR=$2; shift 2 ;;
    *) REST+=("$1"); shift ;;
  esac
done
TRAIN_ARGS=(--config "$CONFIG" --deepspeed_config "$DS_CONFIG" --run_dir "$RUN_DIR" "${REST[@]}")
[ -f "$CONFIG" ] || die "config not found: $CONFIG (set CONFIG=... or pass --config)"
[ -f "$DS_CONFIG" ] || die "DeepSpeed config not found: $DS_CONFIG (set DS_CONFIG=... or pass --deepspeed_config)"

# The allocation: nodes x tasks per node, from #SBATCH lines or the sbatch command line.
NNODES=${SLURM_NNODES:?not inside a Slurm job}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${GPUS_PER_NODE:-}}
[ -n "$TASKS_PER_NODE" ] || die "set --ntasks-per-node (one task per GPU)"
WORLD=$((NNODES * TASKS_PER_NODE))
if [ -n "${EXPECTED_NODES:-}" ] && [ "$EXPECTED_NODES" != "$NNODES" ]; then
  die "this job expects EXPECTED_NODES=$EXPECTED_NODES nodes but Slurm allocated $NNODES ($SLURM_JOB_NODELIST)"
fi
if [ -n "${SLURM_NTASKS:-}" ] && [ "$SLURM_NTASKS" != "$WORLD" ]; then
  die "SLURM_NTASKS=$SLURM_NTASKS != nodes $NNODES x tasks per node $TASKS_PER_NODE; use --ntasks-per-node only"
fi

# Rendezvous: the first host of the allocation; a port derived from the job id so that jobs
# sharing a node do not collide (override with MASTER_ADDR/MASTER_PORT).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
export MASTER_ADDR MASTER_PORT
echo "roberta-ds: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $NNODES nodes x $TASKS_PER_NODE tasks = world $WORLD," \
     "master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# After train.py. Launchers do not pass its exit code through (torchrun: 1; srun may report a kill
# when it ends the slower ranks), so the verdict is read from the run folder: EXIT_STATUS's first
# line `<code> <kind>` (roberta_ds/training/exit_status.py) and the PREEMPTED marker (written once
# the stop's checkpoint is complete). preempted/stalled -> requeue (the requeued job resumes from
# `latest`, train.resume: auto); bad-input -> no requeue (it would fail the same way); no file =
# killed or crashed. Both are removed first so that an old verdict is never read.
rm -f "$RUN_DIR/PREEMPTED" "$RUN_DIR/EXIT_STATUS"
finish() {
  local rc=$1 code="" kind="none"
  [ -f "$RUN_DIR/EXIT_STATUS" ] && read -r code kind < "$RUN_DIR/EXIT_STATUS"
  if [ "$kind" = preempted ] || [ "$kind" = stalled ] || [ "$rc" -eq 99 ] || [ -f "$RUN_DIR/PREEMPTED" ]; then
    rm -f "$RUN_DIR/PREEMPTED"
    echo "roberta-ds: stopped (${kind/none/exit $rc}); requeueing job $SLURM_JOB_ID to resume from $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed; resubmit to resume from $RUN_DIR"
    exit 0
  fi
  case "$kind" in
    done) exit 0 ;;
    bad-input) echo "roberta-ds: bad input, not requeued: $(sed -n 2p "$RUN_DIR/EXIT_STATUS")" >&2; exit 2 ;;
    nonfinite) echo "roberta-ds: stopped on non-finite losses (exit 98), not requeued" >&2; exit 98 ;;
    aborted) echo "roberta-ds: aborted by a second Ctrl-C (exit 130), not requeued" >&2; exit 130 ;;
  esac
  [ "$rc" -eq 0 ] && [ "$kind" = none ] && exit 0
  echo "roberta-ds: training failed (launcher exit $rc, status ${code:-none} $kind)" >&2
  exit "$(( rc == 0 ? 1 : rc ))"
}
