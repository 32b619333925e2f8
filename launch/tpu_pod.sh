#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod) until every stage is done. Creates the slice
# (directly, or as a queued resource), copies this checkout to every worker, installs the
# requirements with jax[tpu], and starts the same `python -m moe_lvlm.train` on all workers in
# the background (launch/tpu_worker.sh: nohup, one log per worker, copied to WORKDIR/logs/).
# Then it waits: exit 0 on every worker ends it; exit 75 (training saved a checkpoint after a
# SIGTERM) or a lost slice (PREEMPTED, SUSPENDED, ...) relaunches, re-creating the slice if it
# is gone, and training resumes from the workdir; any other exit status stops the run and
# prints the end of each worker's log. Everything after `--` goes to moe_lvlm.train unchanged.
#
#   launch/tpu_pod.sh --name=my-tpu --zone=us-east5-a --accelerator-type=v5p-64 \
#     --config=configs/demo.py --workdir=gs://my-bucket/runs/demo [--project=P] \
#     [--runtime-version=V] [--queued] [--spot | --best-effort] [--internal-ip] \
#     [--num-slices=N] [--worker-setup=CMD] [--max-restarts=20] [--poll=60] \
#     [--delete-when-done] [--dry-run] -- --config.stage3.num_steps=100
#
# --num-slices=N (N > 1): a multislice job, N slices of the accelerator type in one queued
# resource (--node-count), joined over the data-center network; the mesh's data axis spans them.
# --worker-setup: a shell command every worker runs after the install (the first launch and every
# new slice), e.g. to copy pretrained checkpoints down. --delete-when-done deletes the slice once
# training is complete. --dry-run prints every command, exactly, and runs none.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
# shellcheck source-path=SCRIPTDIR
source "$LAUNCH_DIR/common.sh"

# What the workers need from this checkout.
CODE_PATHS=(moe_lvlm configs launch requirements.txt pyproject.toml)
REMOTE_DIR="moe-lvlm" # relative to the worker's home directory; tpu_worker.sh uses the same
WORKER="bash ~/$REMOTE_DIR/launch/tpu_worker.sh"
RESUME_EXIT=75 # moe_lvlm.train: SIGTERM, checkpoint saved; run again to resume

usage() {
  sed -n '2,23s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  exit "${1:-0}"
}

# The TPU VM image for an accelerator type (docs: cloud.google.com/tpu/docs/runtimes).
runtime_for() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

NAME="" ZONE="" CONFIG="" WORKDIR="" PROJECT="" RUNTIME_VERSION="" WORKER_SETUP=""
ACCELERATOR_TYPE="v4-8"
QUEUED=0 SPOT=0 BEST_EFFORT=0 INTERNAL_IP=0 DRY_RUN=0 DELETE_WHEN_DONE=0
MAX_RESTARTS=20 POLL=60 NUM_SLICES=1

set_option() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --runtime-version) RUNTIME_VERSION=$2 ;;
    --worker-setup) WORKER_SETUP=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
    --num-slices) NUM_SLICES=$2 ;;
    --poll) POLL=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}

while (($#)); do
  case $1 in
    --) shift; break ;;
    -h | --help) usage ;;
    --dry-run) DRY_RUN=1 ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --best-effort) BEST_EFFORT=1 QUEUED=1 ;;
    --internal-ip) INTERNAL_IP=1 ;;
    --delete-when-done) DELETE_WHEN_DONE=1 ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --*) (($# >= 2)) || die "$1 needs a value"; set_option "$1" "$2"; shift ;;
    *) die "unexpected argument '$1': training arguments go after --" ;;
  esac
  shift
done
TRAIN_ARGS=("$@")

[[ -n $NAME ]] || die "--name is required (the TPU VM name)"
[[ -n $ZONE ]] || die "--zone is required (e.g. us-east5-a)"
[[ -n $CONFIG ]] || die "--config is required (e.g. configs/demo.py)"
[[ $WORKDIR == gs://?* ]] || die "--workdir must be a GCS path gs://BUCKET/PATH, got '$WORKDIR'"
[[ -f $REPO_ROOT/${CONFIG%%:*} ]] || die "config file ${CONFIG%%:*} not found under $REPO_ROOT"
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION="$(runtime_for "$ACCELERATOR_TYPE")" || die "no default runtime for" \
    "--accelerator-type=$ACCELERATOR_TYPE (v4-N, v5litepod-N, v5p-N, v6e-N); pass --runtime-version"
fi
((SPOT + BEST_EFFORT <= 1)) || die "--spot and --best-effort exclude each other"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, got '$MAX_RESTARTS'"
[[ $POLL =~ ^[0-9]+$ ]] || die "--poll must be a number of seconds, got '$POLL'"
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] ||
  die "--num-slices must be a positive number, got '$NUM_SLICES'"
if ((NUM_SLICES > 1)); then QUEUED=1; fi # multislice exists only as a queued resource

TPU=(gcloud compute tpus tpu-vm)
# --best-effort exists only in the alpha queued-resources API.
if ((BEST_EFFORT)); then QR=(gcloud alpha compute tpus queued-resources)
else QR=(gcloud compute tpus queued-resources); fi
WHERE=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then WHERE+=(--project="$PROJECT"); fi
# A multislice job is reached through its queued resource, every node (slice) and worker.
if ((NUM_SLICES > 1)); then REMOTE=("${QR[@]}") SSH_OPTS=(--node=all --worker=all)
else REMOTE=("${TPU[@]}") SSH_OPTS=(--worker=all); fi
if ((INTERNAL_IP)); then SSH_OPTS+=(--internal-ip); fi

JAX_VERSION="$(sed -n 's/^jax\[[a-z0-9]*\]==//p' "$REPO_ROOT/requirements.txt")"
[[ -n $JAX_VERSION ]] || die "no pinned jax[...]==VERSION line in requirements.txt"
ARCHIVE="${TMPDIR:-/tmp}/moe-lvlm-code-$NAME.tgz"

SETUP="set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR"
SETUP+="; tar -xzf ~/$REMOTE_DIR.tgz -C ~/$REMOTE_DIR; $WORKER setup $JAX_VERSION"
if [[ -n $WORKER_SETUP ]]; then SETUP+="; $WORKER_SETUP"; fi
START="$WORKER start $(join_quoted "$WORKDIR/logs" -- --config="$CONFIG" --workdir="$WORKDIR" \
  ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})"

describe_cmd() {
  if ((QUEUED)); then
    CMD=("${QR[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state.state)')
  else
    CMD=("${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)')
  fi
}

create_cmd() {
  if ((QUEUED)); then
    CMD=("${QR[@]}" create "$NAME")
    if ((NUM_SLICES > 1)); then CMD+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
    else CMD+=(--node-id="$NAME"); fi
    CMD+=("${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  else
    CMD=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
      --version="$RUNTIME_VERSION")
  fi
  if ((SPOT)); then CMD+=(--spot); fi
  if ((BEST_EFFORT)); then CMD+=(--best-effort); fi
}

delete_cmd() {
  if ((QUEUED)); then CMD=("${QR[@]}" delete "$NAME" "${WHERE[@]}" --force --quiet)
  else CMD=("${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet); fi
}

ssh_cmd() {
  CMD=("${REMOTE[@]}" ssh "$NAME" "${WHERE[@]}" "${SSH_OPTS[@]}" --command="$1")
}

scp_cmd() {
  CMD=("${REMOTE[@]}" scp "$ARCHIVE" "$NAME:$REMOTE_DIR.tgz" "${WHERE[@]}" "${SSH_OPTS[@]}")
}

STATUS_CMD="$WORKER status"
FAIL_CMD="$WORKER stop; $WORKER tail"

if ((DRY_RUN)); then
  describe_cmd && run "${CMD[@]}"
  echo "# when no slice $NAME exists, or it is PREEMPTED, FAILED, SUSPENDED or TERMINATED" \
    "(then deleted first):"
  delete_cmd && run "${CMD[@]}"
  create_cmd && run "${CMD[@]}"
  echo "# then the describe above every ${POLL} s until the slice is READY (ACTIVE); setup:"
  run tar -czf "$ARCHIVE" --exclude=__pycache__ -C "$REPO_ROOT" "${CODE_PATHS[@]}"
  scp_cmd && run "${CMD[@]}"
  ssh_cmd "$SETUP" && run "${CMD[@]}"
  echo "# stale TPU processes and /tmp/libtpu_lockfile removed, then training under nohup:"
  ssh_cmd "$START" && run "${CMD[@]}"
  echo "# every ${POLL} s until every worker has exited (and the describe, for a lost slice):"
  ssh_cmd "$STATUS_CMD" && run "${CMD[@]}"
  echo "# all exit 0: done. Exit $RESUME_EXIT or a lost slice: again from the describe" \
    "(at most $MAX_RESTARTS times). Any other exit status:"
  ssh_cmd "$FAIL_CMD" && run "${CMD[@]}"
  if ((DELETE_WHEN_DONE)); then
    echo "# when every worker exited 0:"
    delete_cmd && run "${CMD[@]}"
  fi
  exit 0
fi

# The slice's state, empty when there is none.
slice_state() {
  describe_cmd
  "${CMD[@]}" 2>/dev/null || true
}

# Brings the slice to READY (ACTIVE for a queued resource); sets FRESH=1 when it made one.
ensure_slice() {
  local state created=0
  while :; do
    state="$(slice_state)"
    case $state in
      READY | ACTIVE) return ;;
      "")
        create_cmd && run "${CMD[@]}"
        FRESH=1 created=1
        ;;
      PREEMPTED | FAILED | SUSPENDED | TERMINATED)
        if ((created)) && [[ $state == FAILED ]]; then
          describe_cmd
          die "slice $NAME FAILED right after its creation; see $(join_quoted \
            "${CMD[@]/--format=*/--format=yaml}")"
        fi
        echo "slice $NAME is $state: deleting and re-creating it" >&2
        delete_cmd && run "${CMD[@]}"
        create_cmd && run "${CMD[@]}"
        FRESH=1 created=1
        ;;
      STOPPED) die "slice $NAME is STOPPED; start it ($(join_quoted "${TPU[@]}" start "$NAME" \
        "${WHERE[@]}")) or delete it, then run this again" ;;
      *)
        echo "slice $NAME is $state; waiting" >&2
        sleep "$POLL"
        ;;
    esac
  done
}

# One poll of every worker (lines `worker ID: STATUS`, whatever gcloud puts before them): prints
# `running`, `done`, `relaunch`, `lost` (no answer) or `failed N`.
training_outcome() {
  local out line n=0 busy=0 again=0 failed=""
  ssh_cmd "$STATUS_CMD"
  out="$("${CMD[@]}" 2>/dev/null)" || true
  while IFS= read -r line; do
    case $line in
      *"worker "*": running") busy=1 ;;
      *"worker "*": exit 0") ;;
      *"worker "*": exit $RESUME_EXIT" | *"worker "*": not started") again=1 ;;
      *"worker "*": exit "*) failed=${line##*exit } ;;
      *) continue ;;
    esac
    n=$((n + 1))
  done <<<"$out"
  if [[ -n $failed ]]; then echo "failed $failed"
  elif ((n == 0)); then echo lost
  elif ((busy)); then echo running
  elif ((again)); then echo relaunch
  else echo "done"; fi
}

FRESH=0
restarts=0
ensure_slice
# Re-running this script while training still runs (the first launcher was interrupted) waits
# for that training instead of replacing its code under it.
if ((!FRESH)) && [[ $(training_outcome) == running ]]; then
  echo "training is already running on $NAME: waiting for it" >&2
  attached=1
else
  attached=0
fi
set_up=0
while :; do
  if ((!attached)); then
    if ((FRESH || !set_up)); then
      run tar -czf "$ARCHIVE" --exclude=__pycache__ -C "$REPO_ROOT" "${CODE_PATHS[@]}"
      scp_cmd && run "${CMD[@]}"
      ssh_cmd "$SETUP" && run "${CMD[@]}"
      set_up=1 FRESH=0
    fi
    ssh_cmd "$START" && run "${CMD[@]}"
  fi
  attached=0
  while :; do
    sleep "$POLL"
    case "$(slice_state)" in
      READY | ACTIVE) outcome="$(training_outcome)" ;;
      *) outcome=lost ;;
    esac
    [[ $outcome == running ]] || break
  done
  case $outcome in
    done)
      echo "training complete on $NAME; worker logs in $WORKDIR/logs/" >&2
      if ((DELETE_WHEN_DONE)); then delete_cmd && run "${CMD[@]}"; fi
      exit 0
      ;;
    failed*)
      echo "training failed on $NAME (${outcome}); the end of each worker's log:" >&2
      ssh_cmd "$FAIL_CMD" && run "${CMD[@]}" >&2 || true
      echo "full logs: $WORKDIR/logs/; the slice is left as it is" >&2
      exit "${outcome#failed }"
      ;;
  esac
  # relaunch, or lost: a slice that did not answer may be gone (preempted).
  ((restarts < MAX_RESTARTS)) || die "giving up after $MAX_RESTARTS relaunches (--max-restarts)"
  restarts=$((restarts + 1))
  echo "training stopped ($outcome): relaunch $restarts of at most $MAX_RESTARTS" >&2
  ensure_slice
done
