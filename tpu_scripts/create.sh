#!/usr/bin/env bash
# Creates a TPU VM or pod slice: on-demand, spot, or through a queued resource (waits until ACTIVE).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE [flags] [-- extra gcloud create flags]

Creates a TPU VM or pod slice. Queued modes create a queued resource and wait until it is ACTIVE.
  $JT_SCRIPT --name tune --zone us-west4-a --accelerator-type v5litepod-8 --mode spot"
jt_parse "name zone project accelerator-type runtime-version mode queued-resource wait-timeout" "$@"
jt_require name zone accelerator-type
jt_check_mode
jt_require_number wait-timeout
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION=$(jt_default_runtime "$ACCELERATOR_TYPE") ||
    jt_die "no default runtime version for --accelerator-type $ACCELERATOR_TYPE; pass --runtime-version"
fi
spot=()
if [[ $TPU_MODE == spot || $TPU_MODE == queued-spot ]]; then spot=(--spot); fi

if [[ $TPU_MODE == on-demand || $TPU_MODE == spot ]]; then
  jt_run gcloud compute tpus tpu-vm create "$TPU_NAME" "${JT_LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"} ${JT_REST[@]+"${JT_REST[@]}"}
  exit 0
fi

qr=${QUEUED_RESOURCE:-$TPU_NAME}
jt_run gcloud compute tpus queued-resources create "$qr" --node-id="$TPU_NAME" "${JT_LOC[@]}" \
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"} \
  ${JT_REST[@]+"${JT_REST[@]}"}
describe=(gcloud compute tpus queued-resources describe "$qr" "${JT_LOC[@]}" --format='value(state.state)')
if [[ $DRY_RUN == 1 ]]; then
  echo "# then, every 30 s until ACTIVE (at most ${WAIT_TIMEOUT_SECONDS} s):"
  jt_cmdline "${describe[@]}"
  exit 0
fi
deadline=$((SECONDS + WAIT_TIMEOUT_SECONDS))
while true; do
  state=$("${describe[@]}")
  case $state in
    ACTIVE) jt_say "queued resource $qr is ACTIVE"; exit 0;;
    FAILED|SUSPENDED|SUSPENDING) jt_fail "queued resource $qr is $state; inspect with: $(jt_cmdline "${describe[@]}")";;
  esac
  if ((SECONDS >= deadline)); then
    jt_fail "queued resource $qr still $state after $WAIT_TIMEOUT_SECONDS s; it stays queued: delete.sh --mode $TPU_MODE to drop it"
  fi
  jt_say "queued resource $qr: $state; checking again in 30 s"
  sleep 30
done
