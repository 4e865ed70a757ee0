#!/usr/bin/env bash
# Keeps a training run going: waits through queues and repairs, recreates the TPU only when it is lost, relaunches with resume=auto.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE --source SOURCE --config FILE [flags] [-- --config.KEY=VALUE ...]

Every POLL_SECONDS it reads the TPU's state (queued modes: the queued request's first) and, when
the TPU is READY, each worker's run over ssh; then it logs what it saw and what it does:
  nothing set up on a READY TPU        install jaxtune, copy the config, launch
  run RUNNING                          nothing (DONE on every worker: exit 0)
  run gone, or its log silent for HANG_TIMEOUT_SECONDS      relaunch
  ssh failing                          relaunch after CHECK_FAILURES failed checks in a row
  request ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING     wait: the place in the queue is kept
  CREATING, RESTARTING, REPAIRING, ...; request SUSPENDING  wait
  UNKNOWN or an unlisted state         wait; after UNKNOWN_TIMEOUT_SECONDS, delete and create again
  gcloud failing                       retry; after UNKNOWN_TIMEOUT_SECONDS, exit 1
  no TPU (queued: no request); PREEMPTED, TERMINATED; request SUSPENDED or FAILED   (delete,) create
  STOPPED                              exit 1: someone stopped it; start or delete it yourself
A request that FAILS before the run ever ran stops the supervisor (exit 2): see why, fix, rerun.
Bringing the run back is a restart: it first waits BACKOFF_SECONDS (doubling, at most
MAX_BACKOFF_SECONDS); after MAX_RESTARTS it gives up (exit 1). Relaunches use --config.resume=auto.
A run has only its checkpoints to resume from: set checkpoint.every so losing that many steps is
acceptable. Arguments after -- go to jaxtune.train.
  $JT_SCRIPT --name tune --zone us-west4-a --mode queued-spot --source dist/jaxtune-0.1.0-py3-none-any.whl \\
    --config configs/quickstart.py --output-dir gs://BUCKET/quickstart"
jt_parse "name zone project accelerator-type runtime-version mode queued-resource source python-version quickstart
  remote-dir config output-dir resume internal-ip stop-grace max-restarts backoff max-backoff poll-seconds
  check-failures unknown-timeout hang-timeout" "$@"
jt_require name zone source config
jt_check_mode
jt_require_number max-restarts backoff max-backoff poll-seconds check-failures unknown-timeout hang-timeout stop-grace
[[ -f $CONFIG ]] || jt_die "--config $CONFIG: no such file"
jt_check_source
QR=${QUEUED_RESOURCE:-$TPU_NAME}

# The run check: NEW until jaxtune and the config are on the worker, then DONE, RUNNING (with the
# seconds since its log last grew) or GONE.
cfg=$(jt_quote "configs/${CONFIG##*/}")
run_check="cd $(jt_quote "$REMOTE_DIR") 2>/dev/null && [ -f venv/jaxtune-installed ] && [ -f $cfg ] || { echo JT_STATUS=NEW; exit 0; }; if [ -f logs/done ]; then echo JT_STATUS=DONE; elif [ -f logs/train.pid ] && kill -0 -- -\"\$(cat logs/train.pid)\" 2>/dev/null; then echo \"JT_STATUS=RUNNING JT_IDLE=\$((\$(date +%s) - \$(stat -c %Y logs/train.log)))\"; else echo JT_STATUS=GONE; fi"
status_ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${JT_LOC[@]}" "${JT_SSH_OPTS[@]}" --command="$run_check" --quiet)

fresh=1  # no run launched or seen yet: the first launch takes --resume as given, every later one resumes
launch() {
  local how=auto
  if ((fresh)); then how=$RESUME; fi
  fresh=0
  "$JT_DIR/launch.sh" ${how:+--resume "$how"} -- ${JT_REST[@]+"${JT_REST[@]}"}
}
set_up() { "$JT_DIR/install.sh" && "$JT_DIR/copy_config.sh" && launch; }
create() { "$JT_DIR/create.sh" --wait-timeout 0; }  # queued modes: the supervisor does the waiting
recreate() {
  "$JT_DIR/delete.sh" || jt_say "delete failed; creating anyway"
  create
}

if [[ $DRY_RUN == 1 ]]; then
  echo "# before anything is created:"
  jt_check_bucket
  jt_check_tpu_type
  echo "# every ${POLL_SECONDS} s: the TPU's state (queued modes: the request's first), then, when READY, each worker's run:"
  if [[ $TPU_MODE == queued* ]]; then jt_qr_cmd; jt_cmdline "${JT_CMD[@]}"; fi
  jt_node_cmd
  jt_cmdline "${JT_CMD[@]}"
  jt_cmdline "${status_ssh[@]}"
  echo "# no TPU: create it (after a preemption, what is left is deleted first):"
  "$JT_DIR/delete.sh"
  create
  echo "# TPU READY, nothing set up on it: install, copy the config, launch:"
  set_up
  echo "# run gone, hung, or unreachable ${CHECK_FAILURES} checks in a row: relaunch:"
  launch
  exit 0
fi
jt_check_bucket
jt_check_tpu_type

run_state() {  # sets RUN: NEW, GONE, RUNNING, DONE (every worker) or UNREACHABLE; IDLE: the longest log silence
  local out line
  IDLE=0
  if ! jt_query out "${status_ssh[@]}"; then RUN=UNREACHABLE; return 0; fi
  case $out in
    *JT_STATUS=NEW*) RUN=NEW;;
    *JT_STATUS=GONE*) RUN=GONE;;
    *JT_STATUS=RUNNING*) RUN=RUNNING;;
    *JT_STATUS=DONE*) RUN=DONE;;
    *) RUN=UNREACHABLE; JT_ERR="no run state in the answer";;
  esac
  while read -r line; do
    if [[ $line =~ JT_IDLE=([0-9]+) ]] && ((BASH_REMATCH[1] > IDLE)); then IDLE=${BASH_REMATCH[1]}; fi
  done <<<"$out"
}

look() {  # reads the TPU; sets SEEN (what was seen, for the log) and NEXT (what it calls for)
  local qr node
  SEEN=""
  if [[ $TPU_MODE == queued* ]]; then
    if ! jt_qr_state qr; then SEEN="queued resource $QR: gcloud failed ($JT_ERR)"; NEXT=blind; return 0; fi
    SEEN="queued resource $QR $qr"
    case $qr in
      MISSING) NEXT=create; return 0;;
      CREATING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING) NEXT=queue; return 0;;
      SUSPENDING|DELETING) NEXT="wait"; return 0;;
      SUSPENDED) NEXT=recreate; return 0;;
      FAILED) NEXT=failed; return 0;;
      ACTIVE) SEEN+=", ";;
      *) NEXT=unknown; return 0;;
    esac
  fi
  if ! jt_node_state node; then SEEN+="TPU $TPU_NAME: gcloud failed ($JT_ERR)"; NEXT=blind; return 0; fi
  SEEN+="TPU $TPU_NAME $node"
  case $node in
    READY) NEXT=check;;
    MISSING) if [[ $TPU_MODE == queued* ]]; then NEXT=unknown; else NEXT=create; fi;;
    PREEMPTED|TERMINATED) NEXT=recreate;;
    CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING|STOPPING|DELETING|HIDING|UNHIDING) NEXT="wait";;
    STOPPED) NEXT=stopped;;
    *) NEXT=unknown;;  # UNKNOWN (after a failed repair), STATE_UNSPECIFIED, HIDDEN, states added later
  esac
}

restarts=0
backoff=$BACKOFF_SECONDS
began=0    # the first bring-up has begun (or a run was found running): any later action is a restart
attempt=0  # the last action has not failed and no run has been seen since: a set-up now completes it
ran=0      # the run has been seen running
failing=0  # run checks failed in a row
unknown=0  # seconds in an UNKNOWN or unlisted state
blind=0    # seconds of failing gcloud
queued=0   # seconds this request has waited in the queue

decide() {  # decide WHAT ACTION: logs the decision and its restart number, waits out the backoff, acts
  local note="" pause=0
  # Every action is a restart but the first bring-up, and the set-up of a TPU this attempt made.
  if ((began)) && ! [[ $2 == set_up && $attempt == 1 ]]; then
    if ((restarts >= MAX_RESTARTS)); then
      jt_fail "$SEEN -> $1: gave up after $restarts restarts; see logs.sh --worker all"
    fi
    restarts=$((restarts + 1))
    pause=$backoff
    backoff=$((backoff * 2 > MAX_BACKOFF_SECONDS ? MAX_BACKOFF_SECONDS : backoff * 2))
    note=" (restart $restarts/$MAX_RESTARTS, in $pause s)"
  fi
  began=1 attempt=1
  jt_say "$SEEN -> $1$note"
  if ((pause)); then sleep "$pause"; fi
  "$2" || { attempt=0; jt_say "$1: failed; looking again in $POLL_SECONDS s"; }
}

while true; do
  look
  if [[ $NEXT != unknown ]]; then unknown=0; fi
  if [[ $NEXT != blind ]]; then blind=0; fi
  if [[ $NEXT != queue ]]; then queued=0; fi
  case $NEXT in
    check)
      run_state
      SEEN+=", run $RUN"
      if [[ $RUN != NEW && $RUN != UNREACHABLE ]]; then fresh=0; fi
      case $RUN in
        DONE) jt_say "$SEEN -> training finished"; exit 0;;
        RUNNING)
          failing=0 ran=1 began=1 attempt=0 backoff=$BACKOFF_SECONDS
          if ((HANG_TIMEOUT_SECONDS && IDLE >= HANG_TIMEOUT_SECONDS)); then
            decide "its log has been silent for $IDLE s: relaunch" launch
          else
            jt_say "$SEEN -> nothing to do"
          fi;;
        NEW) decide "install jaxtune, copy the config, launch" set_up;;
        GONE) decide "relaunch" launch;;
        UNREACHABLE)
          failing=$((failing + 1))
          if ((failing >= CHECK_FAILURES)); then
            failing=0
            decide "$CHECK_FAILURES run checks in a row failed ($JT_ERR): relaunch" launch
          else
            jt_say "$SEEN ($JT_ERR) -> check again ($failing of $CHECK_FAILURES failed checks in a row)"
          fi;;
      esac;;
    queue)
      jt_say "$SEEN -> keep the place in the queue (waited $queued s)"
      queued=$((queued + POLL_SECONDS));;
    wait) jt_say "$SEEN -> wait";;
    create) decide "create it" create;;
    recreate) decide "delete it and create it again" recreate;;
    failed)
      if ((!ran)); then
        jt_die "$SEEN before the run ever ran: see why with: gcloud compute tpus queued-resources describe $QR $(jt_cmdline "${JT_LOC[@]}"); often no quota for --accelerator-type $ACCELERATOR_TYPE in --zone $ZONE; delete it with delete.sh --mode $TPU_MODE"
      fi
      decide "delete it and create it again" recreate;;
    stopped)
      jt_fail "$SEEN: someone stopped it (a preemption shows PREEMPTED); start it (gcloud compute tpus tpu-vm start $TPU_NAME $(jt_cmdline "${JT_LOC[@]}")) and rerun supervise.sh, or delete.sh it";;
    unknown)
      if ((unknown >= UNKNOWN_TIMEOUT_SECONDS)); then
        unknown=0
        decide "no usable state for $UNKNOWN_TIMEOUT_SECONDS s: treat it as lost, delete it and create it again" recreate
      else
        jt_say "$SEEN -> wait (for $unknown s of at most $UNKNOWN_TIMEOUT_SECONDS)"
        unknown=$((unknown + POLL_SECONDS))
      fi;;
    blind)
      if ((blind >= UNKNOWN_TIMEOUT_SECONDS)); then
        jt_fail "$SEEN, for $blind s; fix gcloud (auth, network, the TPU API) and rerun supervise.sh"
      fi
      jt_say "$SEEN -> try again"
      blind=$((blind + POLL_SECONDS));;
  esac
  sleep "$POLL_SECONDS"
done
