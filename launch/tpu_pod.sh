#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): create the slice or reuse it, copy this
# checkout to every worker, install the requirements with jax[tpu], and start the same
# `python -m moe_lvlm.train` on all workers (--worker=all). jax.distributed finds the workers
# itself (moe_lvlm/parallel/distributed.py). Everything after `--` goes to moe_lvlm.train unchanged.
#
#   launch/tpu_pod.sh --name=my-tpu --zone=us-central2-b --accelerator-type=v4-32 \
#     --config=configs/demo.py --workdir=gs://my-bucket/runs/demo [--project=P] [--spot] \
#     [--dry-run] -- --config.stage3.num_steps=100
#
# --dry-run prints every command, exactly, and runs none.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
# shellcheck source-path=SCRIPTDIR
source "$LAUNCH_DIR/common.sh"

# What the workers need from this checkout.
CODE_PATHS=(moe_lvlm configs launch requirements.txt pyproject.toml)
REMOTE_DIR="moe-lvlm"            # relative to the worker's home directory
REMOTE_VENV="moe-lvlm-venv"
REMOTE_PYTHON="python3.11"       # the TPU VM images ship 3.10; 3.11 comes from apt

usage() {
  sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  exit "${1:-0}"
}

NAME="" ZONE="" CONFIG="" WORKDIR="" PROJECT=""
ACCELERATOR_TYPE="v4-8"
RUNTIME_VERSION="tpu-ubuntu2204-base"
SPOT=0
DRY_RUN=0

set_option() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --runtime-version) RUNTIME_VERSION=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}

while (($#)); do
  case $1 in
    --) shift; break ;;
    -h | --help) usage ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --*) (($# >= 2)) || die "$1 needs a value"; set_option "$1" "$2"; shift ;;
    *) die "unexpected argument '$1': training arguments go after --" ;;
  esac
  shift
done
TRAIN_ARGS=("$@")

[[ -n $NAME ]] || die "--name is required (the TPU VM name)"
[[ -n $ZONE ]] || die "--zone is required (e.g. us-central2-b)"
[[ -n $CONFIG ]] || die "--config is required (e.g. configs/demo.py)"
[[ $WORKDIR == gs://?* ]] || die "--workdir must be a GCS path gs://BUCKET/PATH, got '$WORKDIR'"
[[ -f $REPO_ROOT/${CONFIG%%:*} ]] || die "config file ${CONFIG%%:*} not found under $REPO_ROOT"

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then WHERE+=(--project="$PROJECT"); fi

JAX_VERSION="$(sed -n 's/^jax\[[a-z0-9]*\]==//p' "$REPO_ROOT/requirements.txt")"
[[ -n $JAX_VERSION ]] || die "no pinned jax[...]==VERSION line in requirements.txt"
ARCHIVE="${TMPDIR:-/tmp}/moe-lvlm-code-$NAME.tgz"

SETUP="set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR"
SETUP+="; tar -xzf ~/$REMOTE_DIR.tgz -C ~/$REMOTE_DIR"
SETUP+="; command -v $REMOTE_PYTHON >/dev/null || { sudo apt-get update -qq"
SETUP+=" && sudo apt-get install -y -qq $REMOTE_PYTHON $REMOTE_PYTHON-venv; }"
SETUP+="; [ -x ~/$REMOTE_VENV/bin/python ] || $REMOTE_PYTHON -m venv ~/$REMOTE_VENV"
SETUP+="; ~/$REMOTE_VENV/bin/pip install -q -r ~/$REMOTE_DIR/requirements.txt"
SETUP+=" \"jax[tpu]==$JAX_VERSION\""

TRAIN="cd ~/$REMOTE_DIR && ~/$REMOTE_VENV/bin/python $(join_quoted -m moe_lvlm.train \
  --config="$CONFIG" --workdir="$WORKDIR" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})"

# 1. Create the slice unless it exists; an existing one must be READY.
if ((DRY_RUN)); then
  run "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)'
  echo "# only if the describe above finds no TPU named $NAME:"
elif STATE="$("${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null)"
then
  [[ $STATE == READY ]] || die "TPU $NAME exists in state $STATE; delete it with:" \
    "$(join_quoted "${TPU[@]}" delete "$NAME" "${WHERE[@]}")"
  echo "reusing TPU $NAME (READY)" >&2
fi
if ((DRY_RUN)) || [[ -z ${STATE:-} ]]; then
  CREATE=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
    --version="$RUNTIME_VERSION")
  if ((SPOT)); then CREATE+=(--spot); fi
  run "${CREATE[@]}"
fi

# 2. Copy this checkout to every worker.
run tar -czf "$ARCHIVE" --exclude=__pycache__ -C "$REPO_ROOT" "${CODE_PATHS[@]}"
run "${TPU[@]}" scp "$ARCHIVE" "$NAME:$REMOTE_DIR.tgz" "${WHERE[@]}" --worker=all

# 3. Install the requirements (jax[tpu] of the pinned version) on every worker.
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$SETUP"

# 4. The same training command on every worker.
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$TRAIN"
