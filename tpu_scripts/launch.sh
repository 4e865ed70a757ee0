#!/usr/bin/env bash
# Starts python -m jaxtune.train on every worker at once, detached (setsid nohup), one log per worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE --config FILE [flags] [-- --config.KEY=VALUE ...]

Runs 'python -m jaxtune.train --config configs/FILE' on all workers at once (jax.distributed
initialises itself on TPU VMs). Each worker logs to REMOTE_DIR/logs/train.log and writes
REMOTE_DIR/logs/done when training finishes. A run already started there is first sent SIGTERM
(jaxtune saves a checkpoint on SIGTERM). Arguments after -- are passed to jaxtune.train.
  $JT_SCRIPT --name tune --zone us-west4-a --config configs/quickstart.py --output-dir gs://BUCKET/quickstart"
jt_parse "name zone project config output-dir resume remote-dir" "$@"
jt_require name zone config

train=(venv/bin/python -m jaxtune.train --config "configs/${CONFIG##*/}")
if [[ -n $OUTPUT_DIR ]]; then train+=("--config.output_dir=$OUTPUT_DIR"); fi
if [[ -n $RESUME ]]; then train+=("--config.resume=$RESUME"); fi
train+=(${JT_REST[@]+"${JT_REST[@]}"})

# The inner script: training, its exit status in the log, and the done marker only on success.
inner="$(jt_cmdline "${train[@]}"); rc=\$?; echo \"=== jaxtune.train exited with status \$rc\"; if [ \$rc -eq 0 ]; then touch logs/done; fi; exit \$rc"
steps=(
  "cd $(jt_quote "$REMOTE_DIR")"
  "mkdir -p logs"
  # Stop an earlier run in this directory (its process group) and give it 120 s to save a checkpoint.
  "if [ -f logs/train.pid ] && kill -TERM -- -\"\$(cat logs/train.pid)\" 2>/dev/null; then for _ in \$(seq 120); do kill -0 -- -\"\$(cat logs/train.pid)\" 2>/dev/null || break; sleep 1; done; fi"
  "rm -f logs/done"
  "echo \"=== launch \$(date -u +%Y-%m-%dT%H:%M:%SZ) on \$(hostname)\" >> logs/train.log"
  "(setsid nohup bash -c $(jt_quote "$inner") >> logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid)"
)
remote=$(printf ' && %s' "${steps[@]}")
jt_ssh all "${remote# && }"
