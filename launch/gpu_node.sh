#!/usr/bin/env bash
# Train on one multi-GPU node: one process sees every local GPU; the mesh spans them.
#
#   bash launch/gpu_node.sh [--dry-run] CONFIG WORKDIR [extra --config.* overrides]
#   e.g. bash launch/gpu_node.sh configs/pretrain_miles.py:base /data/runs/miles \
#          --config.data.batch_size=256
#
# Installs the CUDA build of jaxlib into .venv on first use. Re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN="${DRY_RUN:-}"
if [ "${1:-}" = "--dry-run" ]; then  # print the training command only
  DRY_RUN=1
  shift
fi
CONFIG="${1:?usage: $0 CONFIG WORKDIR [overrides]}"
WORKDIR="${2:?usage: $0 CONFIG WORKDIR [overrides]}"
shift 2
CMD=(python -m miles_jax.train --config="$CONFIG" --workdir="$WORKDIR" --distributed=off "$@")
if [ -n "$DRY_RUN" ]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import miles_jax, jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  python -m pip install --quiet -U pip
  python -m pip install --quiet -e . 'jax[cuda12]==0.10.2'
fi
# tf.data must not grab GPU memory: the input pipeline runs on the CPU.
export TF_FORCE_GPU_ALLOW_GROWTH=true XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
nvidia-smi -L || true
"${CMD[@]}"
