#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM pod slice: create it, install miles_jax on every worker, run the
# same training command on all workers (--worker=all), and delete the slice afterwards.
#
#   ZONE=us-central2-b TPU_NAME=miles-v4-32 ACCELERATOR=v4-32 \
#   WORKDIR=gs://my-bucket/miles/pretrain DATA=gs://my-bucket/webvid \
#     bash launch/tpu_pod.sh create|setup|train|delete|all [extra --config.* overrides]
#
# Every worker reads its own share of the shards (jax.process_index()), jax.distributed is
# initialised from the TPU environment, and only worker 0 writes logs. Checkpoints go to
# $WORKDIR (a gs:// path works with orbax); re-running `train` resumes. Spot/preemptible
# slices receive SIGTERM: the loop saves and exits 0, so `train` can simply be re-run.
set -euo pipefail

ZONE="${ZONE:?set ZONE, e.g. us-central2-b}"
TPU_NAME="${TPU_NAME:?set TPU_NAME}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO="${REPO:-https://github.com/YOUR_ORG/miles_jax.git}"
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-configs/pretrain_miles.py:base}"
WORKDIR="${WORKDIR:?set WORKDIR, e.g. gs://bucket/miles/run1}"
DATA="${DATA:-}"
ACTION="${1:-all}"
shift || true
EXTRA=("$@")

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

create() {
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${SPOT:+--spot}
}

setup() {
  ssh_all "set -e; [ -d miles_jax ] || git clone -b $BRANCH $REPO miles_jax; \
    cd miles_jax && git pull --ff-only; python3 -m venv .venv; . .venv/bin/activate; \
    pip install -q -U pip; pip install -q -e . 'jax[tpu]==0.10.2'"
}

train() {
  local data_flags=""
  if [ -n "$DATA" ]; then
    data_flags="--config.data.train=$DATA/train-*.tfrecord --config.data.tokenizer=$DATA/vocab.txt"
  fi
  ssh_all "cd miles_jax && . .venv/bin/activate && \
    python -m miles_jax.train --config=$CONFIG --workdir=$WORKDIR $data_flags ${EXTRA[*]:-}"
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
}

case "$ACTION" in
  create) create ;;
  setup) setup ;;
  train) train ;;
  delete) delete ;;
  all) create; setup; train; delete ;;
  *) echo "usage: $0 create|setup|train|delete|all [--config.* overrides]" >&2; exit 2 ;;
esac
