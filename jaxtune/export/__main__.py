"""Command line: export a training run's model at a checkpoint step.

    python -m jaxtune.export --run RUN_DIR [--step N] --out OUT_DIR --format merged|adapter|gguf \
        [--dtype bfloat16|float16|float32|f16|q8_0|q4_0|q4_1|q4_k_m|q5_k_m|q6_k] [--overwrite]

merged: OUT_DIR is a Hugging Face checkpoint (transformers, vLLM); adapter: a PEFT adapter
directory; gguf: OUT_DIR/model-<dtype>.gguf for llama.cpp and an Ollama Modelfile beside it (dtype
f16 by default; q4_k_m, q5_k_m and q6_k need llama-cpp-python).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from jaxtune import cli

FORMATS = ("merged", "adapter", "gguf")
GGUF_ONLY = ("q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k")
DTYPES = ("bfloat16", "float16", "float32", "bf16", "f16", "f32") + GGUF_ONLY


def byte_size(text: str) -> int:
  """A size such as 5GB, 500MB or 2GiB in bytes."""
  units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  upper = text.strip().upper()
  for unit, factor in units.items():
    if upper.endswith(unit):
      return int(float(upper[: -len(unit)]) * factor)
  return int(upper)


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = cli.parser("jaxtune export", __doc__)
  p.add_argument("--run", type=pathlib.Path, required=True, help="the run directory (the training output_dir)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--out", type=pathlib.Path, required=True, help="output directory")
  p.add_argument("--format", choices=FORMATS, required=True)
  p.add_argument(
    "--dtype",
    choices=DTYPES,
    default=None,
    help="merged: default the base checkpoint's dtype; adapter: float32; gguf: f16 (or any of the others)",
  )
  p.add_argument("--max-shard-size", type=byte_size, default="5GB", help="merged: shard size limit, e.g. 5GB, 500MB")
  p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
  args = p.parse_args(argv)
  if args.dtype in GGUF_ONLY and args.format != "gguf":
    p.error(f"--dtype {args.dtype} is for --format gguf only (merged and adapter: bfloat16, float16, float32)")
  return args


@cli.guard
def main(argv: list[str]) -> int:
  args = parse_args(argv)
  from jaxtune.export import run  # after parsing: --help stays fast

  start = time.perf_counter()
  out = run.export_run(
    args.run,
    args.out,
    args.format,
    args.step,
    dtype=args.dtype,
    overwrite=args.overwrite,
    max_shard_bytes=args.max_shard_size,
  )
  print(f"wrote {out} ({args.format}) in {time.perf_counter() - start:.1f} s:")
  print("\n".join(run.describe(out)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
