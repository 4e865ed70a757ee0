#!/usr/bin/env bash
# Starts python -m jaxtune.train on every worker at once, detached (setsid nohup), one log per worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE --config FILE [flags] [-- --config.KEY=VALUE ...]

Runs 'python -m jaxtune.train --config configs/FILE' on all workers at once (on a multi-host
slice they find each other through the TPU VM's metadata). Each worker logs to
REMOTE_DIR/logs/train.log and writes REMOTE_DIR/logs/done when training finishes. A run already
started there is first sent SIGTERM and given STOP_GRACE_SECONDS to save a checkpoint, then
killed; any process still holding the TPU (/dev/accel*, /dev/vfio/*) is killed too and libtpu's
lock file removed, so a hung run cannot keep the new one off the TPU. Arguments after -- are
passed to jaxtune.train.
  $JT_SCRIPT --name tune --zone us-west4-a --config configs/quickstart.py --output-dir gs://BUCKET/quickstart"
jt_parse "name zone project config output-dir resume remote-dir internal-ip stop-grace" "$@"
jt_require name zone config
jt_require_number stop-grace
jt_check_bucket

train=(venv/bin/python -m jaxtune.train --config "configs/${CONFIG##*/}")
if [[ -n $OUTPUT_DIR ]]; then train+=("--config.output_dir=$OUTPUT_DIR"); fi
if [[ -n $RESUME ]]; then train+=("--config.resume=$RESUME"); fi
train+=(${JT_REST[@]+"${JT_REST[@]}"})

# The inner script: training, its exit status in the log, and the done marker only on success.
inner="$(jt_cmdline "${train[@]}"); rc=\$?; echo \"=== jaxtune.train exited with status \$rc\"; if [ \$rc -eq 0 ]; then touch logs/done; fi; exit \$rc"
group="-- -\"\$(cat logs/train.pid)\""  # the earlier run's process group
steps=(
  "cd $(jt_quote "$REMOTE_DIR")"
  "mkdir -p logs"
  # Stop an earlier run in this directory: SIGTERM (it saves a checkpoint), then SIGKILL after the grace.
  "if [ -f logs/train.pid ] && kill -TERM $group 2>/dev/null; then for _ in \$(seq $STOP_GRACE_SECONDS); do kill -0 $group 2>/dev/null || break; sleep 1; done; if kill -KILL $group 2>/dev/null; then echo \"=== the earlier run was still there after SIGTERM and $STOP_GRACE_SECONDS s: killed\" >> logs/train.log; fi; fi"
  # Free the TPU from whatever still holds it, and libtpu's lock file with it.
  "{ holders=\$(sudo -n lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u | tr '\\n' ' '); if [ -n \"\$holders\" ]; then echo \"=== freeing the TPU: killing \$holders\" >> logs/train.log; sudo -n kill -9 \$holders; for _ in \$(seq 30); do gone=1; for p in \$holders; do if [ -d /proc/\$p ]; then gone=0; fi; done; if [ \$gone = 1 ]; then break; fi; sleep 1; done; fi; sudo -n rm -f /tmp/libtpu_lockfile || true; }"
  "rm -f logs/done"
  "echo \"=== launch \$(date -u +%Y-%m-%dT%H:%M:%SZ) on \$(hostname)\" >> logs/train.log"
  "(setsid nohup bash -c $(jt_quote "$inner") >> logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid)"
)
remote=$(printf ' && %s' "${steps[@]}")
jt_ssh all "${remote# && }"
