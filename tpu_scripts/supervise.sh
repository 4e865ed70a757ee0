#!/usr/bin/env bash
# Keeps a training run going through preemptions: recreates the TPU when needed and relaunches with resume=auto.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE --source SOURCE --config FILE [flags] [-- --config.KEY=VALUE ...]

Every POLL_SECONDS: reads the TPU state and, over ssh, each worker's run state (launch.sh's pid
and done marker). Brings the run up if nothing runs yet; exits 0 once the run is done. After a
preemption (TPU PREEMPTED/TERMINATED/gone) it deletes and recreates the TPU, installs jaxtune,
copies the config and relaunches; when the TPU is READY but ssh fails or training died without
finishing, it relaunches. Relaunches use --config.resume=auto, wait BACKOFF_SECONDS (doubling,
at most MAX_BACKOFF_SECONDS) first, and stop after MAX_RESTARTS (exit 1).
Arguments after -- go to jaxtune.train.
  $JT_SCRIPT --name tune --zone us-west4-a --mode spot --source git+https://github.com/OWNER/jaxtune \\
    --config configs/quickstart.py --output-dir gs://BUCKET/quickstart"
jt_parse "name zone project accelerator-type runtime-version mode queued-resource wait-timeout source python-version
  quickstart remote-dir config output-dir resume max-restarts backoff max-backoff poll-seconds" "$@"
jt_require name zone source config
jt_check_mode
jt_require_number max-restarts backoff max-backoff poll-seconds wait-timeout
[[ -f $CONFIG ]] || jt_die "--config $CONFIG: no such file"

describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${JT_LOC[@]}" --format='value(state)')
run_check="cd $(jt_quote "$REMOTE_DIR") && if [ -f logs/done ]; then echo JT_STATUS=DONE; elif [ -f logs/train.pid ] && kill -0 -- -\"\$(cat logs/train.pid)\" 2>/dev/null; then echo JT_STATUS=RUNNING; else echo JT_STATUS=GONE; fi"
status_ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${JT_LOC[@]}" --command="$run_check")

tpu_state() {  # READY, PREEMPTED, ... ; MISSING when the TPU does not exist; UNKNOWN when gcloud fails otherwise
  local out
  if out=$("${describe[@]}" 2>&1); then echo "${out:-UNKNOWN}"
  elif [[ $out == *NOT_FOUND* || $out == *"not found"* ]]; then echo MISSING
  else jt_say "describe failed: $out"; echo UNKNOWN; fi
}

run_state() {  # DONE when every worker finished, GONE when any worker's run is gone, RUNNING, or UNREACHABLE
  local out
  out=$("${status_ssh[@]}" 2>&1) || { echo UNREACHABLE; return 0; }
  if [[ $out == *JT_STATUS=GONE* ]]; then echo GONE
  elif [[ $out == *JT_STATUS=RUNNING* ]]; then echo RUNNING
  elif [[ $out == *JT_STATUS=DONE* ]]; then echo DONE
  else echo UNREACHABLE; fi
}

relaunch() {  # relaunch RESUME
  "$JT_DIR/launch.sh" ${1:+--resume "$1"} -- ${JT_REST[@]+"${JT_REST[@]}"}
}

recreate() {  # recreate STATE RESUME: a fresh TPU with jaxtune and the config, then the run
  if [[ $1 != MISSING || $TPU_MODE == queued* ]]; then
    "$JT_DIR/delete.sh" || jt_say "delete failed; creating anyway"
  fi
  "$JT_DIR/create.sh" && "$JT_DIR/install.sh" && "$JT_DIR/copy_config.sh" && relaunch "$2"
}

if [[ $DRY_RUN == 1 ]]; then
  echo "# every ${POLL_SECONDS} s: the TPU state, then (when READY) each worker's run state:"
  jt_cmdline "${describe[@]}"
  jt_cmdline "${status_ssh[@]}"
  echo "# TPU READY but the run gone or ssh failing: relaunch"
  relaunch auto
  echo "# TPU PREEMPTED, TERMINATED or gone: recreate, then relaunch"
  recreate PREEMPTED auto
  exit 0
fi

restarts=0
backoff=$BACKOFF_SECONDS
started=0  # a run was seen or brought up: anything after that is a restart
while true; do
  state=$(tpu_state)
  case $state in
    READY) run=$(run_state);;
    CREATING|STARTING|RESTARTING|REPAIRING|UNKNOWN) run=WAIT;;
    *) run=RECREATE;;
  esac
  jt_say "TPU $TPU_NAME: $state; run: $run (restarts so far: $restarts/$MAX_RESTARTS)"
  case $run in
    DONE) jt_say "training finished"; exit 0;;
    RUNNING) started=1;;
    WAIT) ;;
    *)
      how=$RESUME
      if ((started)); then
        if ((restarts >= MAX_RESTARTS)); then
          jt_fail "gave up after $restarts restarts (TPU $state, run $run); see logs.sh --worker all"
        fi
        restarts=$((restarts + 1))
        how=auto
        jt_say "restart $restarts/$MAX_RESTARTS in $backoff s"
        sleep "$backoff"
        backoff=$((backoff * 2 > MAX_BACKOFF_SECONDS ? MAX_BACKOFF_SECONDS : backoff * 2))
      fi
      started=1
      if [[ $run == RECREATE ]]; then recreate "$state" "$how" || jt_say "recreate failed; will retry"
      else relaunch "$how" || jt_say "launch failed; will retry"; fi;;
  esac
  sleep "$POLL_SECONDS"
done
