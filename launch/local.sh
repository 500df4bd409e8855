#!/usr/bin/env bash
# The README's main command: set up a virtual environment, generate the synthetic video-text
# set, pre-train a tiny MILES model on the CPU, evaluate held-out text->video retrieval, and
# save loss/recall curves in the workdir. Re-running resumes (or reports the finished run).
#   bash launch/local.sh [WORKDIR] [extra --config.* overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-workdirs/demo}"
shift || true
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import miles_jax, jax, tensorflow_text" 2>/dev/null; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e .
fi
export TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES="" JAX_PLATFORMS=cpu
DATA="${MILES_DEMO_DATA:-workdirs/synthetic}"
if [ ! -f "$DATA/synthetic.json" ]; then
  python -m miles_jax.data.synthetic --out="$DATA"
fi
python -m miles_jax.train --config="configs/demo.py:$DATA" --workdir="$WORKDIR" "$@"
# Held-out captions and the clips the model retrieves for them, as a page (prints its path).
python -m miles_jax.evaluate --config="configs/demo.py:$DATA" --workdir="$WORKDIR" "$@" \
  | grep -E '^(gallery|results):'
echo "open $WORKDIR/gallery.html in a browser to see what the model retrieves"
