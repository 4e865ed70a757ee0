#!/usr/bin/env bash
# The GPU benchmark (or profile) as one device call (bench/train_gpu.py; docs/benchmarks.md, "GPU").
#
# The device machine has jax (CUDA), flax, optax, torch, transformers and peft but no package
# registry; of what this benchmark imports it lacks only ml_collections, and the training CLI
# (bench/gpu_session.sh's last part) also needs grain, array_record, portpicker and tensorboardX.
# Here, once (versions known to work there; the platform flags fetch the device's Python 3.12 builds):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
# then run this script there with `.whl` carried; it writes the log to $OUT/train_gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
# BENCH_TIMEOUT, BENCH_LOG: for several runs in one call; BENCH_MODULE=bench.profile_step for a profile.
# The log starts with the card and the versions, so every raw log names what it ran on.
log="${OUT:-/tmp}/${BENCH_LOG:-train_gpu.log}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, torch, transformers, peft; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
  PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-540}" python3 -m "${BENCH_MODULE:-bench.train_gpu}" "$@"
} 2>&1 | tee "$log"
