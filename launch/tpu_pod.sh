#!/usr/bin/env bash
# Pre-train on Cloud TPU VM slices: obtain a slice (queued resources by default on v5e / v5p /
# v6e), ship this checkout to every worker, check the run's inputs, start the same training
# command on all workers, and keep the run alive through Spot preemptions (`supervise`).
#
#   ZONE=us-central2-b TPU_NAME=miles-v4-32 ACCELERATOR=v4-32 \
#   WORKDIR=gs://my-bucket/miles/pretrain DATA=gs://my-bucket/shards \
#     bash launch/tpu_pod.sh [--dry-run] ACTION [extra --config.* overrides]
#
# ACTION: create | setup | train | supervise | logs | stop | delete | all | plan
#   all        create, setup, train (the slice keeps billing after training: prefer `supervise`
#              with AUTO_DELETE=1)
#   supervise  a loop reading the slice's state: PREEMPTED / TERMINATED / SUSPENDED / FAILED /
#              missing -> delete, create, setup, train; READY with no trainer on worker 0, no
#              export in WORKDIR and no error in worker 0's log -> train (with an error: exit 3);
#              export present -> done (AUTO_DELETE=1 deletes the slice) and exit 0. Every action
#              is logged with a UTC timestamp. POLL_S (60) between reads.
#   plan       runs `python -m miles_jax.plan` locally (no TPU) for CONFIG on ACCELERATOR.
# docs/launch.md tells the whole story (the Spot cycle, every setting, a dry-run transcript).
#
# --dry-run (or DRY_RUN=1) prints every command instead of running it (state queries and waits
# are printed once).
#
# Capacity (gcloud docs: https://cloud.google.com/tpu/docs/queued-resources,
# https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create and
# .../queued-resources/delete, https://cloud.google.com/tpu/docs/spot; the alpha create's
# --autocheckpoint-enabled: .../sdk/gcloud/reference/alpha/compute/tpus/queued-resources/create):
#   QUEUED=1 (default for v5e / v5p / v6e; 0 elsewhere) creates through
#   `gcloud compute tpus queued-resources create`, waits (printing the state) until ACTIVE, and
#   deletes through `queued-resources delete --force --async`. SPOT=1 -> --spot, RESERVED=1 ->
#   --reserved, VALID_UNTIL=6h -> --valid-until-duration. QUEUED=0: `tpu-vm create` (--spot).
#   NODE_COUNT=N > 1 (multislice, queued only) -> --node-count=N --node-prefix=TPU_NAME: slices
#   TPU_NAME-0 .. TPU_NAME-(N-1), and the trainer gets --config.mesh.num_slices=N.
#   AUTOCHECKPOINT=1 (default where the docs list support: v2-v4, v5e) adds
#   --autocheckpoint-enabled, an alpha flag, so the command becomes `gcloud alpha ...`
#   (https://cloud.google.com/tpu/docs/autocheckpoint): on a maintenance event the VMs receive
#   SIGTERM, which the training loop answers with a collective save.
# RUNTIME follows the generation ("TPU software versions"): v6e -> v2-alpha-tpuv6e,
#   v5p -> v2-alpha-tpuv5, v5e (v5litepod-*) -> v2-alpha-tpuv5-lite, v4 and older ->
#   tpu-ubuntu2204-base. These images ship Python 3.10; `setup` installs 3.11.
#
# Code: by default the committed HEAD of this checkout is shipped (`git archive`, copied with
#   `tpu-vm scp --worker=all` into ~/miles_jax, the venv kept) by `setup` and again by `train`;
#   a tree with uncommitted changes is refused unless ALLOW_DIRTY=1 (then the tracked changes are
#   shipped too; untracked files never are). The commit and the dirty flag reach the run's
#   config.json as code.commit / code.dirty. REPO=URL [BRANCH=main] clones instead.
# Preflight before `train` starts anything: a non-gs:// WORKDIR on a multi-host slice is refused
#   (SHARED_WORKDIR=1 if it is a shared mount: passes --config.train.shared_workdir=True), DATA is
#   required by the pre-training configs and must exist, WORKDIR must take a write (`all` and
#   `supervise` check the gs:// paths before creating anything). Refusals exit 2. After the
#   start, `train` waits (STARTUP_TIMEOUT_S, 900) for worker 0's first progress line or an error
#   line, and exits 3 printing the error.
# `train` stops stale trainers first; `stop` sends TERM (the loop saves), waits up to
#   STOP_TIMEOUT_S (300) for the trainers to exit, then KILLs what is left.
# Each worker logs to ~/miles_logs/train-HOSTNAME.log; checkpoints, exports, TensorBoard and the
#   compilation cache live in WORKDIR, so a re-created slice resumes where the last one saved.
# Local files named by --config.train.init_from / init.video / init.text are copied to every
#   worker (~/miles_init/) and the override rewritten.
set -euo pipefail

DRY_RUN="${DRY_RUN:-}"
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
ACTION="${1:-all}"
shift || true
EXTRA=("$@")
ACCELERATOR="${ACCELERATOR:-v4-32}"
CONFIG="${CONFIG:-configs/pretrain_miles.py:base}"
DATA="${DATA:-}"
NODE_COUNT="${NODE_COUNT:-1}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "error: $*" >&2; exit 2; }

quote() {  # one argument for a shell, readably: bare, '...', or %q when it holds a '
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then printf '%s' "$1"
  elif [[ "$1" != *"'"* ]]; then printf "'%s'" "$1"
  else printf '%q' "$1"
  fi
}

run() {  # prints the command (shell-quoted, one line) on --dry-run, else runs it
  if [ -n "$DRY_RUN" ]; then
    local a line=""
    for a in "$@"; do line+="$(quote "$a") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

plan() {  # deviceless: the compiled step's memory and collectives for CONFIG on ACCELERATOR
  local args=("${LOCAL_PYTHON:-python3}" -m miles_jax.plan "--config=$CONFIG"
              "--topology=$ACCELERATOR")
  if [ "$NODE_COUNT" -gt 1 ]; then
    args+=("--num_slices=$NODE_COUNT" "--config.mesh.num_slices=$NODE_COUNT")
  fi
  args+=("${EXTRA[@]}")
  if [ -n "$DRY_RUN" ]; then run "${args[@]}"; return; fi
  (cd "$HERE" && PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "${args[@]}")
}
if [ "$ACTION" = plan ]; then plan; exit 0; fi

ZONE="${ZONE:?set ZONE, e.g. us-central2-b}"
TPU_NAME="${TPU_NAME:?set TPU_NAME}"
WORKDIR="${WORKDIR:?set WORKDIR, e.g. gs://bucket/miles/run1}"
REPO="${REPO:-}"
BRANCH="${BRANCH:-main}"
PYTHON="${PYTHON:-python3.11}"
POLL_S="${POLL_S:-60}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-300}"
STARTUP_TIMEOUT_S="${STARTUP_TIMEOUT_S:-900}"
MAX_ROUNDS="${MAX_ROUNDS:-0}"  # supervise: give up (exit 4) after this many state reads; 0: never

runtime_for() {
  case "$1" in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod*|v5e*) echo v2-alpha-tpuv5-lite ;;
    v2*|v3*|v4*) echo tpu-ubuntu2204-base ;;
    *) echo "error: unknown ACCELERATOR=$1 (v4-N, v5litepod-N, v5p-N, v6e-N); set RUNTIME" >&2
       return 2 ;;
  esac
}
RUNTIME="${RUNTIME:-$(runtime_for "$ACCELERATOR")}"
case "$ACCELERATOR" in
  v5*|v6e*) QUEUED="${QUEUED:-1}" ;;
  *) QUEUED="${QUEUED:-0}" ;;
esac
case "$ACCELERATOR" in  # Autocheckpoint: "only TPUs (v2-v4, and v5e)" (autocheckpoint docs)
  v2*|v3*|v4*|v5litepod*|v5e*) AUTOCHECKPOINT="${AUTOCHECKPOINT:-1}" ;;
  *) AUTOCHECKPOINT="${AUTOCHECKPOINT:-0}" ;;
esac
case "$NODE_COUNT" in ''|*[!0-9]*|0) die "NODE_COUNT=$NODE_COUNT: give the number of slices, e.g. 2" ;; esac
if [ "$NODE_COUNT" -gt 1 ] && [ "$QUEUED" != 1 ]; then
  die "NODE_COUNT=$NODE_COUNT needs queued resources: set QUEUED=1 (multislice is created through queued-resources --node-count)"
fi
if [ -n "${SPOT:-}" ] && [ -n "${RESERVED:-}" ]; then
  die "SPOT=1 and RESERVED=1 are two different capacity tiers: set one of them"
fi
QR_ID="${QR_ID:-$TPU_NAME}"
NODES=("$TPU_NAME")
if [ "$NODE_COUNT" -gt 1 ]; then
  NODES=()
  for ((i = 0; i < NODE_COUNT; i++)); do NODES+=("$TPU_NAME-$i"); done
fi

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $*"; }

run_quiet() {  # `run` with the output dropped (the command itself is still printed on --dry-run)
  if [ -n "$DRY_RUN" ]; then run "$@"; else "$@" >/dev/null; fi
}

gcloud_track() {  # `gcloud alpha` where an alpha-only flag is used
  if [ "$AUTOCHECKPOINT" = 1 ]; then echo "gcloud alpha"; else echo gcloud; fi
}

# ssh / scp --worker=all|N, --command, --recurse: gcloud reference pages
# https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh and .../tpu-vm/scp
ssh_all() {  # every worker of every slice (runs of spaces from line continuations squeezed)
  local node cmd
  cmd="$(tr -s ' ' <<<"$1")"
  for node in "${NODES[@]}"; do
    run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" --worker=all --command="$cmd"
  done
}

ssh_0() {  # worker 0 of the first slice (jax process 0: the progress lines)
  run gcloud compute tpus tpu-vm ssh "${NODES[0]}" --zone="$ZONE" --worker=0 \
    --command="$(tr -s ' ' <<<"$1")"
}

scp_all() {  # scp_all LOCAL REMOTE_PATH [--recurse]
  local node
  for node in "${NODES[@]}"; do
    run gcloud compute tpus tpu-vm scp "${@:3}" "$1" "$node:$2" --zone="$ZONE" --worker=all
  done
}

multi_host() {  # more than one VM: a pod slice (more than 8 chips / cores) or several slices
  local n="${ACCELERATOR##*-}"
  [ "$NODE_COUNT" -gt 1 ] || { [ -n "${n//[0-9]/}" ] || [ "$n" -gt 8 ]; }
}

# ---- slice state -------------------------------------------------------------------------
# describe + --format (a gcloud-wide flag): .../reference/compute/tpus/tpu-vm/describe and
# .../queued-resources/describe; the states: https://cloud.google.com/tpu/docs/queued-resources
node_state() {  # READY, PREEMPTED, TERMINATED, CREATING, ... or MISSING
  gcloud compute tpus tpu-vm describe "$1" --zone="$ZONE" --format="value(state)" 2>/dev/null \
    || echo MISSING
}

slice_state() {  # READY when every VM is; else the request's state (WAITING_FOR_RESOURCES,
  # PROVISIONING, FAILED, SUSPENDED, ...) or the first VM's that is not READY (PREEMPTED, ...)
  local s node
  if [ "$QUEUED" = 1 ]; then
    s="$(gcloud compute tpus queued-resources describe "$QR_ID" --zone="$ZONE" \
           --format="value(state.state)" 2>/dev/null || echo MISSING)"
    if [ "$s" != ACTIVE ]; then echo "$s"; return; fi
  fi
  for node in "${NODES[@]}"; do
    s="$(node_state "$node")"
    if [ "$s" != READY ]; then echo "$s"; return; fi
  done
  echo READY
}

is_lost() {  # states a slice does not come back from: delete and create it again
  case "$1" in
    PREEMPTED|TERMINATED|STOPPED|FAILED|SUSPENDING|SUSPENDED) return 0 ;;
    *) return 1 ;;
  esac
}

wait_ready() {  # until the slice is usable; a request that fails ends the launch
  if [ -n "$DRY_RUN" ]; then
    if [ "$QUEUED" = 1 ]; then
      run gcloud compute tpus queued-resources describe "$QR_ID" --zone="$ZONE" \
        --format="value(state.state)"
    else
      run gcloud compute tpus tpu-vm describe "${NODES[0]}" --zone="$ZONE" --format="value(state)"
    fi
    return
  fi
  local s last=""
  while true; do
    s="$(slice_state)"
    if [ "$s" != "$last" ]; then log "$TPU_NAME: $s"; last="$s"; fi
    if [ "$s" = READY ]; then return 0; fi
    if [ "$s" = MISSING ] || is_lost "$s"; then
      echo "error: $TPU_NAME is $s while waiting for it to become ready" >&2
      return 1
    fi
    sleep "$POLL_S"
  done
}

wait_gone() {  # a deleted name can be reused only once the deletion has finished
  [ -n "$DRY_RUN" ] && return 0
  local s
  while true; do
    s="$(slice_state)"
    [ "$s" = MISSING ] && return 0
    sleep "$POLL_S"
  done
}

# ---- create / delete ---------------------------------------------------------------------
create() {
  if [ -z "$DRY_RUN" ]; then
    local s
    s="$(slice_state)"
    if is_lost "$s"; then
      log "$TPU_NAME is $s: deleting it first (a preempted TPU cannot be restarted)"
      delete
      wait_gone
    elif [ "$s" = DELETING ]; then
      wait_gone
    elif [ "$s" != MISSING ]; then
      log "$TPU_NAME exists ($s): not created again"
      wait_ready
      return
    fi
  fi
  local ac=() tier=()
  if [ "$AUTOCHECKPOINT" = 1 ]; then ac=(--autocheckpoint-enabled); fi
  if [ -n "${SPOT:-}" ]; then tier=(--spot); fi
  if [ "$QUEUED" = 1 ]; then
    if [ -n "${RESERVED:-}" ]; then tier+=(--reserved); fi
    if [ -n "${VALID_UNTIL:-}" ]; then tier+=("--valid-until-duration=$VALID_UNTIL"); fi
    local nodes=("--node-id=$TPU_NAME")
    if [ "$NODE_COUNT" -gt 1 ]; then nodes=("--node-count=$NODE_COUNT" "--node-prefix=$TPU_NAME"); fi
    # shellcheck disable=SC2046  # "gcloud" or "gcloud alpha"
    run $(gcloud_track) compute tpus queued-resources create "$QR_ID" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${nodes[@]}" \
      "${tier[@]}" "${ac[@]}"
  else
    # shellcheck disable=SC2046
    run $(gcloud_track) compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${tier[@]}" "${ac[@]}"
  fi
  wait_ready
}

delete() {
  if [ "$QUEUED" = 1 ]; then  # --force: the nodes first, then the request
    run gcloud compute tpus queued-resources delete "$QR_ID" --zone="$ZONE" --force --async \
      --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
  fi
}

# ---- code --------------------------------------------------------------------------------
CODE_COMMIT=""
CODE_DIRTY=False
SHIPPED=""
CHECKED_BUCKETS=""

ship() {  # the checkout's HEAD (with ALLOW_DIRTY=1: plus tracked changes) into ~/miles_jax
  [ -z "$SHIPPED" ] || return 0  # once per invocation (`all`: setup, then train)
  SHIPPED=1
  if [ -n "$REPO" ]; then
    check_repo
    ssh_all "set -e; [ -d miles_jax/.git ] || git clone -b $BRANCH $REPO miles_jax; \
      cd miles_jax && git fetch -q origin $BRANCH && git checkout -q FETCH_HEAD"
    return
  fi
  git -C "$HERE" rev-parse --git-dir >/dev/null 2>&1 \
    || die "$HERE is not a git checkout: set REPO=URL to clone on the workers instead"
  CODE_COMMIT="$(git -C "$HERE" rev-parse HEAD)"
  local tree="$CODE_COMMIT"
  if [ -n "$(git -C "$HERE" status --porcelain --untracked-files=no)" ]; then
    [ -n "${ALLOW_DIRTY:-}" ] \
      || die "$HERE has uncommitted changes: commit them (the run records the commit) or set ALLOW_DIRTY=1"
    CODE_DIRTY=True
    tree="$(git -C "$HERE" stash create)"  # a commit of the working tree; the tree is untouched
  fi
  local archive="${TMPDIR:-/tmp}/miles_jax-$TPU_NAME.tar.gz"
  run git -C "$HERE" archive --format=tar.gz -o "$archive" "$tree"
  scp_all "$archive" miles_jax.tar.gz  # relative: the home folder
  ssh_all "set -e; mkdir -p ~/miles_jax; \
    find ~/miles_jax -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; \
    tar -xzf ~/miles_jax.tar.gz -C ~/miles_jax; echo \"$CODE_COMMIT dirty=$CODE_DIRTY\" > ~/miles_jax/SHIPPED"
}

setup() {
  ship
  ssh_all "set -e; if ! command -v $PYTHON >/dev/null; then \
    sudo apt-get update -q && sudo apt-get install -y -q ${PYTHON}-venv ${PYTHON}-dev; fi; \
    cd miles_jax; $PYTHON -m venv .venv; . .venv/bin/activate; \
    pip install -q -U pip; pip install -q -e . \"jax[tpu]==0.10.2\""
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
          scp_all "$value" miles_init/ --recurse
          EXTRA[i]="$key=../miles_init/$(basename "$value")"  # relative to ~/miles_jax
        fi ;;
    esac
  done
}

reads_data_root() {  # the pre-training configs take the data root as their second argument
  case "$CONFIG" in
    *pretrain_miles.py*|*pretrain_mac.py*) [ "${CONFIG#*,}" = "$CONFIG" ] ;;
    *) return 1 ;;
  esac
}

train_command() {  # the command every worker runs; each argument quoted for the remote shell
  local config="$CONFIG" data_flags=()
  if [ -n "$DATA" ]; then
    if reads_data_root; then
      config="$CONFIG,$DATA"  # weighted WebVid/CC3M sources: the config's second argument
    else
      data_flags=("--config.data.train=$DATA/train-*.tfrecord"
                  "--config.data.tokenizer=$DATA/vocab.txt")
    fi
  fi
  local args=(python -m miles_jax.train "--config=$config" "--workdir=$WORKDIR" "${data_flags[@]}")
  if [ "$NODE_COUNT" -gt 1 ]; then
    args+=("--num_slices=$NODE_COUNT" "--config.mesh.num_slices=$NODE_COUNT")
  fi
  if [ -n "${SHARED_WORKDIR:-}" ]; then args+=("--config.train.shared_workdir=True"); fi
  if [ -n "$CODE_COMMIT" ]; then
    args+=("--config.code.commit=$CODE_COMMIT" "--config.code.dirty=$CODE_DIRTY")
  fi
  args+=("${EXTRA[@]}")
  printf '%q ' "${args[@]}"
}

# ---- preflight ---------------------------------------------------------------------------
# gcloud storage ls / cp / rm: https://cloud.google.com/sdk/gcloud/reference/storage/ls, .../cp, .../rm
exists_remote() {  # a gs:// path: gcloud storage; else a path on worker 0 (relative: ~/miles_jax)
  case "$1" in
    gs://*) run_quiet gcloud storage ls "$1" ;;
    *) ssh_0 "cd miles_jax && ls -d $1 >/dev/null" ;;
  esac
}

check_repo() {
  case "$REPO" in *YOUR_ORG*) die "REPO=$REPO is the placeholder: unset REPO to ship this checkout, or give your fork's URL" ;; esac
}

preflight() {  # `preflight early`: only what needs no slice (before `create`)
  check_repo
  case "$WORKDIR" in
    gs://*) ;;
    *) if multi_host && [ -z "${SHARED_WORKDIR:-}" ]; then
         die "WORKDIR=$WORKDIR is local but $ACCELERATOR x$NODE_COUNT has several hosts (each would hold part of every checkpoint): use gs://BUCKET/PATH, or SHARED_WORKDIR=1 for a mount every host shares"
       fi ;;
  esac
  if [ -z "$DATA" ] && reads_data_root; then
    die "DATA is empty but $CONFIG reads its data root from it: set DATA=gs://BUCKET/shards (or CONFIG=...:ARG,ROOT)"
  fi
  local probe="$WORKDIR/.launch_write_probe"
  if [ -n "$CHECKED_BUCKETS" ]; then  # `all`: the gs:// paths were checked before `create`
    case "$DATA" in gs://*|'') ;; *) exists_remote "$DATA" || die "DATA=$DATA does not exist on worker 0: check the path" ;; esac
    case "$WORKDIR" in gs://*) return 0 ;; esac
  elif [ "${1:-}" = early ]; then  # local paths are checked on worker 0 once it exists
    case "$DATA" in gs://*) exists_remote "$DATA" || die "DATA=$DATA does not exist (or is not readable): check the path" ;; esac
    case "$WORKDIR" in gs://*) ;; *) return 0 ;; esac
  elif [ -n "$DATA" ]; then
    exists_remote "$DATA" || die "DATA=$DATA does not exist (or is not readable): check the path"
  fi
  case "$WORKDIR" in
    gs://*) { run_quiet gcloud storage cp "$HERE/launch/tpu_pod.sh" "$probe" \
                && run_quiet gcloud storage rm "$probe"; } \
              || die "WORKDIR=$WORKDIR does not take a write: check the bucket and its permissions" ;;
    *) ssh_0 "cd miles_jax && mkdir -p $WORKDIR && touch $probe && rm $probe" \
         || die "WORKDIR=$WORKDIR does not take a write on worker 0" ;;
  esac
  if [ "${1:-}" = early ]; then CHECKED_BUCKETS=1; fi
}

wait_started() {  # worker 0's first progress line, or its first error
  local pattern='^(initialised a new run|resumed .* from step|.*already trained to step|error: |Traceback)'
  local cmd="grep -m1 -E \"$pattern\" ~/miles_logs/train-*.log"
  if [ -n "$DRY_RUN" ]; then ssh_0 "$cmd"; return; fi
  local waited=0 line
  while [ "$waited" -lt "$STARTUP_TIMEOUT_S" ]; do
    line="$(ssh_0 "$cmd" 2>/dev/null || true)"
    case "$line" in
      error:*|Traceback*)
        echo "error: the trainer on ${NODES[0]} worker 0 failed at start-up: $line (full log: bash launch/tpu_pod.sh logs)" >&2
        return 3 ;;
      ?*) log "worker 0: $line"; return 0 ;;
    esac
    sleep "$POLL_S"
    waited=$((waited + POLL_S))
    if [ "$POLL_S" -eq 0 ]; then waited=$((waited + 1)); fi
  done
  echo "error: no progress line from worker 0 within ${STARTUP_TIMEOUT_S}s: see bash launch/tpu_pod.sh logs" >&2
  return 3
}

# ---- train / stop ------------------------------------------------------------------------
stop() {  # TERM (the loop saves), wait for the trainers, then KILL what is left
  ssh_all "sudo fuser -k -TERM /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true; \
    for _ in \$(seq $STOP_TIMEOUT_S); do \
      sudo fuser /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1 || break; sleep 1; done; \
    sudo fuser -k -KILL /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true; \
    sudo rm -f /tmp/libtpu_lockfile"
}

train() {
  preflight
  ship
  copy_local_inputs
  stop
  local cmd
  cmd="$(train_command)"
  ssh_all "mkdir -p ~/miles_logs && cd miles_jax && . .venv/bin/activate && \
    nohup setsid $cmd > ~/miles_logs/train-\$(hostname).log 2>&1 < /dev/null & \
    echo \"started on \$(hostname): log ~/miles_logs/train-\$(hostname).log\""
  wait_started
}

logs() {  # worker 0's log (the only one with progress lines); other workers: WORKER=N
  run gcloud compute tpus tpu-vm ssh "${NODES[0]}" --zone="$ZONE" --worker="${WORKER:-0}" \
    --command="tail -n 100 -f ~/miles_logs/train-*.log"
}

# ---- supervise ---------------------------------------------------------------------------
finished() {  # the run's export exists (written once, after the last step)
  case "$WORKDIR" in
    gs://*) gcloud storage ls "$WORKDIR/export/" >/dev/null 2>&1 ;;
    *) ssh_0 "test -d miles_jax/$WORKDIR/export || test -d $WORKDIR/export" >/dev/null 2>&1 ;;
  esac
}

trainer_running() {  # a trainer process on worker 0
  [ "$(ssh_0 "pgrep -f 'miles_jax[.]train' >/dev/null && echo running || echo idle" \
        2>/dev/null)" = running ]
}

child() {  # this script as a separate process (its own errexit), same settings and overrides
  "${BASH:-bash}" "$HERE/launch/$(basename "${BASH_SOURCE[0]}")" "$@" "${EXTRA[@]}"
}

trainer_error() {  # the error a trainer that exited on its own left in worker 0's log, if any
  ssh_0 "grep -m1 -E \"^(error: |Traceback)\" ~/miles_logs/train-*.log" 2>/dev/null || true
}

supervise() {
  [ -z "$DRY_RUN" ] || die "supervise reads live state and has no --dry-run; use --dry-run create / train to see its commands"
  local rounds=0 s rc err
  preflight early  # a run that cannot start is refused before any slice is paid for
  log "supervise $TPU_NAME ($ACCELERATOR x$NODE_COUNT, queued=$QUEUED, spot=${SPOT:-0}): reading its state every ${POLL_S}s"
  while true; do
    rounds=$((rounds + 1))
    s="$(slice_state)"
    rc=0
    if [ "$s" = MISSING ] || is_lost "$s"; then
      log "state $s: recreating the slice (delete, create, setup, train)"
      child create && child setup && child train || rc=$?
    elif [ "$s" = READY ]; then
      if finished; then
        log "state READY, $WORKDIR/export exists: training finished"
        if [ -n "${AUTO_DELETE:-}" ]; then log "AUTO_DELETE=1: deleting $TPU_NAME"; delete; fi
        return 0
      elif trainer_running; then
        log "state READY, trainer running on worker 0"
      elif err="$(trainer_error)" && [ -n "$err" ]; then  # e.g. a NaN stop: a restart repeats it
        log "state READY, the trainer exited with an error: not restarting it"
        echo "error: the trainer on ${NODES[0]} worker 0 stopped: $err (full log: bash launch/tpu_pod.sh logs)" >&2
        return 3
      else
        log "state READY, no trainer on worker 0 and no export: starting the trainer"
        child train || rc=$?
      fi
    else
      log "state $s: waiting"
    fi
    case "$rc" in
      0) ;;
      2|3) log "stopping: the run cannot start as configured (exit $rc, error above)"; return "$rc" ;;
      *) log "that step failed (exit $rc): trying again next round" ;;
    esac
    if [ "$MAX_ROUNDS" -gt 0 ] && [ "$rounds" -ge "$MAX_ROUNDS" ]; then
      log "MAX_ROUNDS=$MAX_ROUNDS reached before the run finished: exiting"
      return 4
    fi
    sleep "$POLL_S"
  done
}

case "$ACTION" in
  create) create ;;
  setup) setup ;;
  train) train ;;
  supervise) supervise ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  all) preflight early; create; setup; train ;;
  *) echo "usage: $0 [--dry-run] create|setup|train|supervise|logs|stop|delete|all|plan [--config.* overrides]" >&2
     exit 2 ;;
esac
