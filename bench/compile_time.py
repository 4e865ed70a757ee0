"""Compile time of the real train step against depth: the layer scan should keep it nearly flat.

    python -m bench.compile_time                    # SmolLM2-135M shape at 4, 16, 32 layers, LoRA and full
    python -m bench.compile_time --smoke            # tiny shape at 1, 2 layers (seconds)

Compile time is what jax reports for tracing, lowering and XLA compilation of the step
(jax.monitoring duration events), so it does not include running the step.
"""

from __future__ import annotations

import argparse
import collections
import time

from bench.train_cpu import SMOKE, SMOLLM2_135M, jax_side

_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", default="4,16,32")
  p.add_argument("--settings", default="lora,full")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  import jax

  base = SMOKE if args.smoke else SMOLLM2_135M
  if args.smoke:
    args.layers, args.batch, args.seq = "1,2", 2, 32
  seen = collections.Counter()
  jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: seen.update({name: secs}) if name in _EVENTS else None
  )
  rows = []
  print(f"{'setting':8} {'layers':>6} {'trace s':>8} {'lower s':>8} {'XLA s':>8} {'total s':>8} {'first call s':>12}")
  for setting in args.settings.split(","):
    for layers in map(int, args.layers.split(",")):
      run, _ = jax_side(dict(base, num_hidden_layers=layers), setting, args.batch, args.seq)
      seen.clear()
      t0 = time.perf_counter()
      run()  # everything compiled for the first step (model init ops compiled before are not counted)
      first = time.perf_counter() - t0
      trace, lower, xla = (seen[e] for e in _EVENTS)
      rows.append(
        dict(
          setting=setting,
          layers=layers,
          trace_s=trace,
          lower_s=lower,
          xla_s=xla,
          total_s=trace + lower + xla,
          first_call_s=first,
        )
      )
      print(
        f"{setting:8} {layers:6d} {trace:8.2f} {lower:8.2f} {xla:8.2f} {trace + lower + xla:8.2f} {first:12.2f}",
        flush=True,
      )
  return rows


if __name__ == "__main__":
  main()
