"""float32 product rates on this CPU: XLA (as jax compiles a lone product) against torch and numpy.

    python -m bench.cpu_products                  # every thread this process may use
    taskset -c 0 python -m bench.cpu_products --threads 1

The CPU benchmark's ratio against transformers + PEFT follows the product rate of each side's
matrix library more than anything in either step, since products are most of both steps: XLA's CPU
backend runs its dots through YNNPACK, torch through oneDNN/MKL, numpy through OpenBLAS. The
shapes are the SmolLM2-135M CPU step's (batch 4 x 256 = 1024 tokens, D 576, F 1536, KV 192,
vocab 49,152, loss chunks of 4 x 128 rows), as M x K x N. Each rate is the median of `--reps`
timed calls after two warm-up calls, in GFLOP/s (2 M K N per call).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

STEP_SHAPES = (  # (name, M, K, N)
  ("gate/up forward", 1024, 576, 1536),
  ("down forward", 1024, 1536, 576),
  ("q/o forward", 1024, 576, 576),
  ("k/v forward", 1024, 576, 192),
  ("head logits", 512, 576, 49152),
  ("head dh", 512, 49152, 576),
  ("head dW", 576, 512, 49152),
)


def rate(fn, flop: float, reps: int) -> float:
  """GFLOP/s: flop over the median of `reps` timed calls of fn, after two untimed ones."""
  fn()
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return flop / statistics.median(times) / 1e9


def measure(shapes=STEP_SHAPES, reps: int = 20, threads: int | None = None) -> list[dict]:
  """One row per shape: {"name", "shape", "xla", "torch", "numpy"} in GFLOP/s.

  threads: torch's intra-op threads (None: torch's default). XLA and numpy take their thread
  counts from the process (pin it with taskset to compare one core)."""
  import jax
  import torch

  if threads:
    torch.set_num_threads(threads)
  product = jax.jit(lambda a, b: a @ b)
  rng = np.random.default_rng(0)
  rows = []
  for name, m, k, n in shapes:
    a = rng.standard_normal((m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    ja, jb = jax.device_put(a), jax.device_put(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flop = 2.0 * m * k * n
    rows.append(
      {
        "name": name,
        "shape": (m, k, n),
        "xla": rate(lambda: product(ja, jb).block_until_ready(), flop, reps),
        "torch": rate(lambda: ta @ tb, flop, reps),
        "numpy": rate(lambda: a @ b, flop, reps),
      }
    )
  return rows


def format_rows(rows: list[dict]) -> str:
  lines = [f"{'product':16s} {'M x K x N':>18s} {'xla':>6s} {'torch':>6s} {'numpy':>6s}  xla/torch"]
  for r in rows:
    shape = " x ".join(str(d) for d in r["shape"])
    lines.append(
      f"{r['name']:16s} {shape:>18s} {r['xla']:6.0f} {r['torch']:6.0f} {r['numpy']:6.0f}  {r['xla'] / r['torch']:.2f}"
    )
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--smoke", action="store_true", help="two small shapes, 3 reps (seconds)")
  args = p.parse_args(argv)
  shapes = (("small", 64, 32, 48), ("skinny", 128, 64, 16)) if args.smoke else STEP_SHAPES
  reps = 3 if args.smoke else args.reps
  rows = measure(shapes, reps, args.threads)
  print(
    f"float32 products, GFLOP/s (median of {reps}); "
    f"{len(os.sched_getaffinity(0))} CPUs usable, torch threads {args.threads or 'default'}"
  )
  print(format_rows(rows))
  return rows


if __name__ == "__main__":
  main()
