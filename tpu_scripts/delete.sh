#!/usr/bin/env bash
# Deletes the TPU VM / pod slice, or in queued modes the queued resource together with its TPU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE [--mode MODE] [--queued-resource ID]

Deletes the TPU without asking. With --mode queued or queued-spot, deletes the queued
resource (--force: its TPU goes with it).
  $JT_SCRIPT --name tune --zone us-west4-a"
jt_parse "name zone project mode queued-resource" "$@"
jt_require name zone
jt_check_mode
if [[ $TPU_MODE == queued* ]]; then
  jt_run gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE:-$TPU_NAME}" "${JT_LOC[@]}" --force --quiet
else
  jt_run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${JT_LOC[@]}" --quiet
fi
