#!/usr/bin/env bash
# The README's main command: set up a virtual environment, generate the synthetic video-text
# set, pre-train a tiny MILES model on the CPU, evaluate held-out text->video retrieval, and
# save loss/recall curves in the workdir. Re-running resumes (or reports the finished run).
# Ends with where the results, figures and model are and the next commands to try.
#   bash launch/local.sh [WORKDIR] [extra --config.* overrides]
#   VENV=path/to/venv bash launch/local.sh   # reuse an existing environment
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
# CPU demo (JAX and TensorFlow). The package keeps C++ start-up logs off the console;
# MILES_JAX_VERBOSE=1 bash launch/local.sh shows them.
export CUDA_VISIBLE_DEVICES="" JAX_PLATFORMS=cpu
DATA="${MILES_DEMO_DATA:-workdirs/synthetic}"
if [ ! -f "$DATA/synthetic.json" ]; then
  python -m miles_jax.data.synthetic --out="$DATA"
fi
# The XLA:CPU kernels (miles_jax/models/xla_cpu.py; configs/demo.py sets them too).
CPU_KERNELS=(--config.model.kernels=xla_cpu)
python -m miles_jax.train --config="configs/demo.py:$DATA" --workdir="$WORKDIR" "${CPU_KERNELS[@]}" "$@"
# Held-out captions and the clips the model retrieves for them, as a page.
python -m miles_jax.evaluate --config="configs/demo.py:$DATA" --workdir="$WORKDIR" "${CPU_KERNELS[@]}" "$@" \
  | grep -E '^(gallery|results):' || true
echo
echo "results: $WORKDIR/results.json | gallery: $WORKDIR/gallery.html | figures: $WORKDIR/loss.png $WORKDIR/recall.png | model: $WORKDIR/export (best eval: $WORKDIR/best)"
echo "try (. $VENV/bin/activate): python -m miles_jax.evaluate --config=configs/demo.py:$DATA --checkpoint=$WORKDIR/export ; python -m miles_jax.viz --config=configs/demo.py:$DATA --checkpoint=$WORKDIR/export --shard=$DATA/eval-00000-of-00002.tfrecord --out=$WORKDIR/viz"
echo "fine-tune the released weights: python -m miles_jax.train --config=configs/finetune_msrvtt.py --config.train.init_from=MILES.pth --workdir=runs/ft_msrvtt (data: README, Data preparation)"
