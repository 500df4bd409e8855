#!/usr/bin/env bash
# Prepare a dataset's shards on Google Cloud Dataflow: the same `python -m miles_jax.data.prepare`
# (same flags, same shards and report.json as on one machine) run as an Apache Beam pipeline
# with --runner=DataflowRunner. Run it from a clone of the repo, in a venv with the [beam] extra
# (pip install -e '.[beam]'), logged in to gcloud (application-default credentials).
#
#   PROJECT=my-project REGION=us-central1 BUCKET=gs://my-bucket \
#   MACHINE_TYPE=n2-highcpu-16 MAX_WORKERS=32 \
#     bash launch/prepare_dataflow.sh [--dry-run] --format=webvid \
#       --annotations=results_2M_train.csv --media_dir=gs://my-bucket/webvid/videos \
#       --out=gs://my-bucket/shards/webvid2m --num_shards=4096
#
# --dry-run (or DRY_RUN=1) prints the command instead of running it.
# The annotation file is read on this machine; --media_dir and --out must be gs:// (the workers
# read the videos and write the shards there). Use several shards per worker core
# (num_shards >= 4 x MAX_WORKERS x cores per machine): a shard is the unit of work.
# The workers get miles_jax from this repo's setup.py (Beam's --setup_file, its way to ship a
# multi-file package with its pinned dependencies); set CONTAINER=IMAGE to use a custom SDK
# container with miles_jax installed instead (faster worker start-up, no pip on every worker).
# Staging and temporary files go to $BUCKET/dataflow/. A rerun skips the shards already complete.
set -euo pipefail

DRY_RUN="${DRY_RUN:-}"
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
PROJECT="${PROJECT:?set PROJECT, the Google Cloud project id}"
REGION="${REGION:-us-central1}"
BUCKET="${BUCKET:?set BUCKET, e.g. gs://my-bucket (Dataflow staging and temp files)}"
BUCKET="${BUCKET%/}"
MACHINE_TYPE="${MACHINE_TYPE:-n2-highcpu-16}"
MAX_WORKERS="${MAX_WORKERS:-32}"
JOB_NAME="${JOB_NAME:-miles-prepare}"
CONTAINER="${CONTAINER:-}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

case "$BUCKET" in
  gs://*) ;;
  *) echo "error: BUCKET=$BUCKET: use a gs:// bucket, e.g. BUCKET=gs://my-bucket" >&2; exit 2 ;;
esac
if [ "$#" -eq 0 ]; then
  echo "error: give prepare's flags, e.g. --format=webvid --annotations=FILE" \
    "--media_dir=gs://... --out=gs://... (see the top of $0)" >&2
  exit 2
fi
prev=""
for arg in "$@"; do
  for flag in out media_dir media-dir; do
    value=""
    case "$arg" in "--$flag="*) value="${arg#*=}" ;; esac
    if [ "$prev" = "--$flag" ]; then value="$arg"; fi
    if [ -n "$value" ] && [ "${value#gs://}" = "$value" ]; then
      echo "error: --$flag=$value: Dataflow workers reach only gs:// paths; copy it to a bucket" >&2
      exit 2
    fi
  done
  prev="$arg"
done

package=(--beam_option="setup_file=$ROOT/setup.py")
if [ -n "$CONTAINER" ]; then
  package=(--beam_option="sdk_container_image=$CONTAINER")
fi

cmd=("$PYTHON" -m miles_jax.data.prepare "$@" --runner=DataflowRunner
  --beam_option="project=$PROJECT" --beam_option="region=$REGION"
  --beam_option="job_name=$JOB_NAME"
  --beam_option="temp_location=$BUCKET/dataflow/tmp"
  --beam_option="staging_location=$BUCKET/dataflow/staging"
  --beam_option="worker_machine_type=$MACHINE_TYPE"
  --beam_option="max_num_workers=$MAX_WORKERS"
  "${package[@]}")

cd "$ROOT"
if [ -n "$DRY_RUN" ]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  "${cmd[@]}"
fi
