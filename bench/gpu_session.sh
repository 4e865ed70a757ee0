#!/usr/bin/env bash
# Every GPU check as ONE device call (device time is scarce, and each call costs a machine start).
# Run with `.whl` carried (see bench/gpu_device.sh) and a timeout of 600 s. Parts, in order of
# value, each under its own time limit (580 s in all):
#   1. the benchmark against HF + PEFT, both settings (the figures of docs/benchmarks.md "GPU");
#   2. two jaxtune-only runs on rows of 4 packed examples (is_causal without a mask is ~7% faster): the library's
#      masked cuDNN call, then jax's private packed-layout cuDNN call told the segments instead of a
#      mask; the loss column says whether they agree;
#   2b. jaxtune with the CPU-tuned kernels (model.kernels=cpu) against part 1's plain ones, same shape;
#   3. where a step's time goes, LoRA and full (python -m bench.profile_step);
#   4. the training CLI on configs/tiny.py, which must log `attention: cudnn (auto: ...)` and
#      `kernels: plain (auto: gpu: ...)`.
# Logs go to $OUT/session_*.log; a summary of all parts is printed last. SESSION_SMOKE=1 runs every
# part at its smoke size (on CPU too, with python3 being a jaxtune environment), to check the script.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-/tmp}"
part() {  # part NAME SECONDS MODULE ARGS...: bench/gpu_device.sh with its own log and limit
  local name=$1 limit=$2 module=$3
  shift 3
  echo "=== $name (limit ${limit} s)"
  BENCH_LOG="session_${name}.log" BENCH_TIMEOUT="$limit" BENCH_MODULE="$module" bash bench/gpu_device.sh "$@" \
    ${SESSION_SMOKE:+--smoke} > /dev/null 2>&1
  echo "    exit $?, $(cat "$out/session_${name}.log" 2>/dev/null | wc -l) lines"
}
part bench 190 bench.train_gpu
part seg_mask 70 bench.train_gpu --sides jaxtune --segments 4 --attn cudnn
part seg_cudnn 70 bench.train_gpu --sides jaxtune --segments 4 --attn cudnn_segments
part kernels_cpu 70 bench.train_gpu --sides jaxtune --kernels cpu
# Each profile also keeps its trace and the optimised HLO of its step; both come back in one tarball.
for setting in lora full; do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/dump_$setting --xla_dump_hlo_as_text" \
    part "profile_$setting" 60 bench.profile_step --setting "$setting" --top 40 --trace-dir "/tmp/trace_$setting"
done
mkdir -p /tmp/artifacts
for setting in lora full; do
  cp "$(find "/tmp/trace_$setting" -name '*.xplane.pb' | tail -1)" "/tmp/artifacts/trace_$setting.xplane.pb"
  cp "$(ls -S /tmp/dump_$setting/*after_optimizations.txt | head -1)" "/tmp/artifacts/hlo_$setting.txt"
done 2>/dev/null
tar -czf "$out/profile_artifacts.tar.gz" -C /tmp artifacts && ls -la "$out/profile_artifacts.tar.gz"

echo "=== cli (limit 60 s)"
PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} timeout 60 python3 -m jaxtune.train --config configs/tiny.py --config.train.steps=20 \
  --config.output_dir=/tmp/jt_tiny_$$ --config.model.cache_dir=/tmp/jt_cache --config.data.cache_dir=/tmp/jt_data \
  > "$out/session_cli.log" 2>&1
echo "    exit $?"

echo
echo "##### summary"
head -2 "$out/session_bench.log"  # card, driver, versions
for name in bench seg_mask seg_cudnn kernels_cpu; do
  echo "--- $name"
  sed -n '/^Llama 3.2 1B shape/,$p' "$out/session_${name}.log"
  grep -m3 -i 'error\|Traceback' "$out/session_${name}.log"
done
for name in profile_lora profile_full; do
  echo "--- $name"
  sed -n '/: batch [0-9]* x /,/^top/p' "$out/session_${name}.log" | grep -v '^trace'
  sed -n '/^top/,$p' "$out/session_${name}.log" | sed -n 2,20p
  grep -m3 -i 'error\|Traceback' "$out/session_${name}.log"
done
echo "--- cli"
grep -m1 'attention:' "$out/session_cli.log"
grep -m1 'kernels:' "$out/session_cli.log"
tail -3 "$out/session_cli.log"
