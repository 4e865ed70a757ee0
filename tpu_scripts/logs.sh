#!/usr/bin/env bash
# Shows (or follows) the training log of one worker or of all, each line prefixed with the worker's hostname.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE [--worker N|all] [--lines N] [--follow]

Prints the end of REMOTE_DIR/logs/train.log (written by launch.sh) on one worker or all.
  $JT_SCRIPT --name tune --zone us-west4-a --worker all --follow"
jt_parse "name zone project worker lines follow remote-dir internal-ip" "$@"
jt_require name zone
jt_require_number lines
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || jt_die "--worker (or WORKER) must be a worker index or all, not '$WORKER'"
follow=""
if [[ $LOG_FOLLOW == 1 ]]; then follow=" -F"; fi
jt_ssh "$WORKER" "tail -n $LOG_LINES$follow $(jt_quote "$REMOTE_DIR/logs/train.log") | sed -u \"s/^/[\$(hostname)] /\""
