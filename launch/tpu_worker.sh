#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh. It runs on every TPU VM of the slice, from the copy of
# this checkout in ~/moe-lvlm, and tpu_pod.sh calls it over `gcloud ... ssh --worker=all`:
#
#   tpu_worker.sh setup JAX_VERSION     Python 3.11 (apt), the venv ~/moe-lvlm-venv, requirements
#   tpu_worker.sh start LOG_URL -- ARGS stop stale TPU users, then `python -m moe_lvlm.train ARGS`
#                                       in the background; returns at once
#   tpu_worker.sh status                one line: `worker ID: running|exit N|not started`
#   tpu_worker.sh stop                  SIGTERM to the training (it saves and exits 75)
#   tpu_worker.sh tail                  the last lines of this worker's newest log
#
# Training runs under nohup in its own session, so a dropped ssh connection leaves it running.
# Its output goes to ~/moe-lvlm-logs/worker-ID-HOST-TIME.log, copied to LOG_URL/ (gs:// or a folder)
# every MOE_LVLM_LOG_SYNC_S seconds (default 300) and when training ends; then its exit status
# goes to ~/moe-lvlm-logs/exit_code. ID is the worker number from the TPU metadata server.
set -euo pipefail

CODE=~/moe-lvlm
VENV=~/moe-lvlm-venv
LOGS=~/moe-lvlm-logs
PYTHON=python3.11 # the TPU VM images ship 3.10; 3.11 comes from apt
METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes

die() {
  echo "error: $*" >&2
  exit 2
}

# apt-get right after the VM boots races the unattended upgrader for the dpkg lock: wait for it.
apt_get() {
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"
}

setup() {
  local jax_version=$1
  if ! command -v "$PYTHON" >/dev/null; then
    apt_get update -qq
    apt_get install -y -qq "$PYTHON" "$PYTHON-venv"
  fi
  [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$CODE/requirements.txt" "jax[tpu]==$jax_version"
}

worker_id() {
  curl -sf --max-time 5 -H 'Metadata-Flavor: Google' "$METADATA/agent-worker-number" ||
    hostname
}

running() {
  [[ -f $LOGS/pid ]] && kill -0 "$(cat "$LOGS/pid")" 2>/dev/null
}

# Whatever still holds the TPU from an earlier run (chips are /dev/accel* on v4, /dev/vfio/* on
# v5e, v5p and v6e) is killed, and libtpu's lockfile removed, or the new run cannot open them.
cleanup() {
  local pids
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    pids="$(sudo sh -c 'lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null' | sort -u | xargs)" ||
      true
    [[ -n $pids ]] || break
    echo "worker $(worker_id): killing stale TPU processes $pids" >&2
    # shellcheck disable=SC2086  # one pid per word
    sudo kill -9 $pids 2>/dev/null || true
    sleep 1
  done
  sudo rm -f /tmp/libtpu_lockfile
}

copy_log() {
  local log=$1 url=$2
  if [[ $url == gs://* ]]; then
    timeout 300 gcloud storage cp -q "$log" "$url/" >/dev/null 2>&1 || true
  else
    mkdir -p "$url" && cp "$log" "$url/"
  fi
}

start() {
  local url=$1
  shift
  [[ ${1:-} == -- ]] && shift
  mkdir -p "$LOGS"
  if running; then
    echo "worker $(worker_id): training already running (pid $(cat "$LOGS/pid")), not restarted"
    return
  fi
  cleanup
  rm -f "$LOGS/exit_code"
  local log
  # The host name too: worker numbers repeat in every slice of a multislice job.
  log="$LOGS/worker-$(worker_id)-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ).log"
  setsid nohup bash "${BASH_SOURCE[0]}" run "$url" "$log" "$@" >/dev/null 2>&1 </dev/null &
  echo $! >"$LOGS/pid"
  echo "worker $(worker_id): training started, log $log"
}

# Copies the log every MOE_LVLM_LOG_SYNC_S seconds until SIGTERM (which also ends its sleep).
sync_log() {
  local log=$1 url=$2 sleeper=""
  trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
  while :; do
    sleep "${MOE_LVLM_LOG_SYNC_S:-300}" &
    sleeper=$!
    wait "$sleeper"
    copy_log "$log" "$url"
  done
}

# The background job of `start`.
run_training() {
  local url=$1 log=$2 rc syncer
  shift 2
  # A handler, not '' (an ignored signal would stay ignored in the trainer): SIGTERM of a
  # maintenance event reaches the trainer too; this shell just goes on to record its status.
  trap 'echo "tpu_worker.sh: SIGTERM" >>"$log"' TERM
  sync_log "$log" "$url" &
  syncer=$!
  set +e
  (cd "$CODE" && exec "$VENV/bin/python" -m moe_lvlm.train "$@") >>"$log" 2>&1
  rc=$?
  set -e
  kill "$syncer" 2>/dev/null || true
  echo "exit status $rc" >>"$log"
  copy_log "$log" "$url"
  echo "$rc" >"$LOGS/exit_code"
}

status() {
  if [[ -f $LOGS/exit_code ]]; then
    echo "worker $(worker_id): exit $(cat "$LOGS/exit_code")"
  elif running; then
    echo "worker $(worker_id): running"
  else
    echo "worker $(worker_id): not started"
  fi
}

stop() {
  if running; then pkill -TERM -s "$(cat "$LOGS/pid")" || true; fi
}

tail_log() {
  local newest
  newest="$(find "$LOGS" -name 'worker-*.log' 2>/dev/null | sort | tail -n 1)"
  [[ -n $newest ]] || return 0
  tail -n "${MOE_LVLM_TAIL_LINES:-30}" "$newest" | sed "s/^/[worker $(worker_id)] /"
}

case ${1:-} in
  setup) setup "${2:?setup needs the jax version}" ;;
  start) shift; start "$@" ;;
  run) shift; run_training "$@" ;;
  status) status ;;
  stop) stop ;;
  tail) tail_log ;;
  *) die "usage: tpu_worker.sh setup|start|status|stop|tail (see the header)" ;;
esac
