#!/usr/bin/env bash
# Submit launch/slurm.sbatch with the cluster shape on the command line. Everything after `--`
# goes to moe_lvlm.train unchanged.
#
#   launch/slurm_submit.sh --nodes=2 --gpus-per-node=8 [--tasks=per-gpu|per-node] \
#     [--partition=P] [--time=HH:MM:SS] [--grace=300] [--job-name=N] [--wait] [--dry-run] \
#     -- --config=configs/demo.py --workdir=/shared/runs/demo --config.stage3.num_steps=100
#
# --tasks=per-gpu (default) runs one process per GPU, per-node one process per node driving all
# of its GPUs. --grace=S: SIGTERM S seconds before the time limit (training saves, the job
# requeues itself). --wait: return when the job has ended (through its requeues), with its exit
# status. --dry-run prints the sbatch command and submits nothing.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR
source "$LAUNCH_DIR/common.sh"

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  exit 0
}

NODES=1 GPUS_PER_NODE=8 TASKS=per-gpu PARTITION="" TIME="" GRACE="" JOB_NAME=""
DRY_RUN=0 WAIT=0

set_option() {
  case $1 in
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS_PER_NODE=$2 ;;
    --tasks) TASKS=$2 ;;
    --partition) PARTITION=$2 ;;
    --time) TIME=$2 ;;
    --grace) GRACE=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}

while (($#)); do
  case $1 in
    --) shift; break ;;
    -h | --help) usage ;;
    --dry-run) DRY_RUN=1 ;;
    --wait) WAIT=1 ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --*) (($# >= 2)) || die "$1 needs a value"; set_option "$1" "$2"; shift ;;
    *) die "unexpected argument '$1': training arguments go after --" ;;
  esac
  shift
done

[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
  die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"
case $TASKS in
  per-gpu) TASKS_PER_NODE=$GPUS_PER_NODE ;;
  per-node) TASKS_PER_NODE=1 ;;
  *) die "--tasks must be per-gpu or per-node, got '$TASKS'" ;;
esac
[[ -z $GRACE || $GRACE =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, got '$GRACE'"
(($#)) || die "no training arguments: add -- --config=... --workdir=..."

SBATCH=(sbatch --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE"
  --gpus-per-node="$GPUS_PER_NODE")
if [[ -n $PARTITION ]]; then SBATCH+=(--partition="$PARTITION"); fi
if [[ -n $TIME ]]; then SBATCH+=(--time="$TIME"); fi
if [[ -n $GRACE ]]; then SBATCH+=(--signal=B:TERM@"$GRACE"); fi
if [[ -n $JOB_NAME ]]; then SBATCH+=(--job-name="$JOB_NAME"); fi
if ((WAIT)); then SBATCH+=(--wait); fi

cd "$(dirname "$LAUNCH_DIR")"
run "${SBATCH[@]}" launch/slurm.sbatch "$@"
