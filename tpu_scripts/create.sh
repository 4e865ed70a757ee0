#!/usr/bin/env bash
# Creates a TPU VM or pod slice: on-demand, spot, or through a queued resource (waits until ACTIVE).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE [flags] [-- extra gcloud create flags]

Creates a TPU VM or pod slice, after checking that the zone offers the accelerator type. Queued
modes file a queued resource, which waits in Google's queue for capacity, and wait until it is
ACTIVE (at most WAIT_TIMEOUT_SECONDS; the request stays queued after that).
  $JT_SCRIPT --name tune --zone us-west4-a --accelerator-type v5litepod-8 --mode queued-spot"
jt_parse "name zone project accelerator-type runtime-version mode queued-resource wait-timeout" "$@"
jt_require name zone accelerator-type
jt_check_mode
jt_require_number wait-timeout
jt_check_tpu_type
spot=()
if [[ $TPU_MODE == spot || $TPU_MODE == queued-spot ]]; then spot=(--spot); fi

if [[ $TPU_MODE == on-demand || $TPU_MODE == spot ]]; then
  jt_run gcloud compute tpus tpu-vm create "$TPU_NAME" "${JT_LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"} ${JT_REST[@]+"${JT_REST[@]}"} --quiet
  exit 0
fi

qr=${QUEUED_RESOURCE:-$TPU_NAME}
jt_run gcloud compute tpus queued-resources create "$qr" --node-id="$TPU_NAME" "${JT_LOC[@]}" \
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"} \
  ${JT_REST[@]+"${JT_REST[@]}"} --quiet
if ((WAIT_TIMEOUT_SECONDS == 0)); then exit 0; fi
jt_qr_cmd
if [[ $DRY_RUN == 1 ]]; then
  echo "# then, every 30 s until $qr is ACTIVE (at most ${WAIT_TIMEOUT_SECONDS} s):"
  jt_cmdline "${JT_CMD[@]}"
  exit 0
fi
inspect="gcloud compute tpus queued-resources describe $qr $(jt_cmdline "${JT_LOC[@]}")"
waited=0
while true; do
  if ! jt_qr_state state; then state="unknown (gcloud failed: $JT_ERR)"; fi
  case $state in
    ACTIVE) jt_say "queued resource $qr is ACTIVE"; exit 0;;
    MISSING) jt_fail "queued resource $qr is gone (deleted while waiting?); rerun create.sh";;
    FAILED|SUSPENDING|SUSPENDED)
      jt_fail "queued resource $qr is $state; see why with: $inspect; then delete it (delete.sh --mode $TPU_MODE) and retry, with another --zone or --accelerator-type if capacity or quota is short";;
  esac
  if ((waited >= WAIT_TIMEOUT_SECONDS)); then
    jt_fail "queued resource $qr still $state after $WAIT_TIMEOUT_SECONDS s; it stays in the queue: rerun create.sh to wait again, or delete.sh --mode $TPU_MODE to drop it"
  fi
  jt_say "queued resource $qr: $state; checking again in 30 s"
  sleep 30
  waited=$((waited + 30))
done
