#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM slice (one host or a pod slice): create it, install miles_jax on
# every worker, start the same training command on all workers (--worker=all), follow the
# logs, and delete the slice afterwards.
#
#   ZONE=us-central2-b TPU_NAME=miles-v4-32 ACCELERATOR=v4-32 \
#   WORKDIR=gs://my-bucket/miles/pretrain DATA=gs://my-bucket/shards \
#     bash launch/tpu_pod.sh [--dry-run] create|setup|train|logs|stop|delete|all \
#       [extra --config.* overrides, e.g. --config.mesh.shape='(2,-1)']
#
# --dry-run (or DRY_RUN=1) prints every gcloud command instead of running it.
# RUNTIME follows the accelerator generation (Google's "TPU software versions" table):
# v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5, v5e (v5litepod-*) -> v2-alpha-tpuv5-lite,
# v4 and older -> tpu-ubuntu2204-base. These images ship Python 3.10; `setup` installs 3.11
# (jax 0.10 / numpy 2.4 need >= 3.11) and builds the venv with it.
# `train` kills stale processes holding the TPU on every worker, then starts the job detached
# from the ssh session (nohup setsid): each worker logs to ~/miles_logs/train-HOSTNAME.log.
# Every host runs the same command; jax.distributed is initialised from the TPU VM metadata and
# each process prints one start-up line (process i/N, local and global device counts).
# Checkpoints, exports and metrics go to $WORKDIR (gs:// works throughout); re-running `train`
# resumes. Spot slices receive SIGTERM: the loop saves and exits 0, so `train` can be re-run.
# Local files named by --config.train.init_from / init.video / init.text are copied to every
# worker (~/miles_init/) and the override rewritten; gs:// paths for train.init_from are read
# directly.
set -euo pipefail

DRY_RUN="${DRY_RUN:-}"
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
ZONE="${ZONE:?set ZONE, e.g. us-central2-b}"
TPU_NAME="${TPU_NAME:?set TPU_NAME}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
REPO="${REPO:-https://github.com/YOUR_ORG/miles_jax.git}"
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-configs/pretrain_miles.py:base}"
WORKDIR="${WORKDIR:?set WORKDIR, e.g. gs://bucket/miles/run1}"
DATA="${DATA:-}"
PYTHON="${PYTHON:-python3.11}"
ACTION="${1:-all}"
shift || true
EXTRA=("$@")

runtime_for() {
  case "$1" in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod*|v5e*) echo v2-alpha-tpuv5-lite ;;
    v2*|v3*|v4*) echo tpu-ubuntu2204-base ;;
    *) echo "unknown ACCELERATOR=$1 (v4-N, v5litepod-N, v5p-N, v6e-N); set RUNTIME" >&2
       return 2 ;;
  esac
}
RUNTIME="${RUNTIME:-$(runtime_for "$ACCELERATOR")}"

run() {  # prints the command (shell-quoted, one line) on --dry-run, else runs it
  if [ -n "$DRY_RUN" ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

create() {
  local spot=()
  if [ -n "${SPOT:-}" ]; then spot=(--spot); fi
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
}

setup() {
  ssh_all "set -e; if ! command -v $PYTHON >/dev/null; then \
    sudo apt-get update -q && sudo apt-get install -y -q ${PYTHON}-venv ${PYTHON}-dev; fi; \
    [ -d miles_jax ] || git clone -b $BRANCH $REPO miles_jax; \
    cd miles_jax && git pull --ff-only; $PYTHON -m venv .venv; . .venv/bin/activate; \
    pip install -q -U pip; pip install -q -e . 'jax[tpu]==0.10.2'"
}

# Overrides naming local files: copy them to every worker and point the override there.
copy_local_inputs() {
  local i arg key value
  for i in "${!EXTRA[@]}"; do
    arg="${EXTRA[$i]}"
    case "$arg" in
      --config.train.init_from=*|--config.init.video=*|--config.init.text=*)
        key="${arg%%=*}"
        value="${arg#*=}"
        if [ -n "$value" ] && [ "${value#*://}" = "$value" ]; then
          ssh_all "mkdir -p ~/miles_init"
          run gcloud compute tpus tpu-vm scp --recurse "$value" "$TPU_NAME:~/miles_init/" \
            --zone="$ZONE" --worker=all
          EXTRA[i]="$key=../miles_init/$(basename "$value")"  # relative to ~/miles_jax
        fi ;;
    esac
  done
}

train_command() {  # the command every worker runs; each argument quoted for the remote shell
  local config="$CONFIG" data_flags=()
  if [ -n "$DATA" ]; then
    case "$CONFIG" in
      # weighted WebVid/CC3M sources: the config's second argument is their root
      *pretrain_miles.py:*|*pretrain_mac.py:*) config="$CONFIG,$DATA" ;;
      *) data_flags=("--config.data.train=$DATA/train-*.tfrecord"
                     "--config.data.tokenizer=$DATA/vocab.txt") ;;
    esac
  fi
  local args=(python -m miles_jax.train "--config=$config" "--workdir=$WORKDIR" "${data_flags[@]}")
  args+=("${EXTRA[@]}")
  printf '%q ' "${args[@]}"
}

stop() {  # stale processes holding the TPU (a crashed or earlier run) block a new start
  ssh_all "sudo fuser -k -TERM /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true; sleep 5; \
    sudo fuser -k -KILL /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true; \
    sudo rm -f /tmp/libtpu_lockfile"
}

train() {
  copy_local_inputs
  stop
  local cmd
  cmd="$(train_command)"
  ssh_all "mkdir -p ~/miles_logs && cd miles_jax && . .venv/bin/activate && \
    nohup setsid $cmd > ~/miles_logs/train-\$(hostname).log 2>&1 < /dev/null & \
    echo \"started on \$(hostname): log ~/miles_logs/train-\$(hostname).log\""
}

logs() {  # worker 0's log (the only one with progress lines); other workers: --worker=N
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="${WORKER:-0}" \
    --command="tail -n 100 -f ~/miles_logs/train-*.log"
}

delete() {
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
}

case "$ACTION" in
  create) create ;;
  setup) setup ;;
  train) train ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  all) create; setup; train ;;
  *) echo "usage: $0 [--dry-run] create|setup|train|logs|stop|delete|all [--config.* overrides]" >&2
     exit 2 ;;
esac
