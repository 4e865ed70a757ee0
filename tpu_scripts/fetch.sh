#!/usr/bin/env bash
# Copies a run directory here: gcloud storage rsync for gs:// run directories, else scp from worker 0.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --output-dir RUN_DIR [--dest DIR] [--name NAME --zone ZONE]

Copies the run directory (the --output-dir given to launch.sh) into DEST/<its last path part>.
A gs:// directory is synced with gcloud storage rsync; a path on the workers is copied from worker 0
(relative paths are under REMOTE_DIR), which then needs --name and --zone.
  $JT_SCRIPT --output-dir gs://BUCKET/quickstart --dest runs"
jt_parse "name zone project output-dir dest remote-dir internal-ip" "$@"
jt_require output-dir
run=${OUTPUT_DIR%/}
if [[ $run == gs://* ]]; then
  jt_check_bucket
  jt_run mkdir -p "$DEST/${run##*/}"
  jt_run gcloud storage rsync "$run" "$DEST/${run##*/}" --recursive ${JT_PROJECT[@]+"${JT_PROJECT[@]}"} --quiet
  exit 0
fi
jt_require name zone
if [[ $run != /* ]]; then run="$REMOTE_DIR/$run"; fi
jt_run mkdir -p "$DEST"
jt_scp 0 --recurse "$TPU_NAME:$run" "$DEST"
