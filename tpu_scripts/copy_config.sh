#!/usr/bin/env bash
# Copies a config file to REMOTE_DIR/configs/ on every worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE --config FILE [flags]

Copies FILE to REMOTE_DIR/configs/ on every worker; launch.sh --config FILE then runs it.
  $JT_SCRIPT --name tune --zone us-west4-a --config configs/quickstart.py"
jt_parse "name zone project config remote-dir internal-ip" "$@"
jt_require name zone config
[[ -f $CONFIG ]] || jt_die "--config $CONFIG: no such file"
jt_ssh all "mkdir -p $(jt_quote "$REMOTE_DIR/configs")"
jt_scp all "$CONFIG" "$TPU_NAME:$REMOTE_DIR/configs/"
