"""HF checkpoint load time and peak host RSS against the file size: jaxtune vs transformers.

    python -m bench.load_time                 # SmolLM2-135M shape, random weights, float32
    python -m bench.load_time --smoke         # tiny shape (seconds)

A checkpoint of the shape is written once with `save_pretrained` (random weights) to
--dir; then each loader runs in a fresh process, alternating, --rounds times. RSS is the
process's peak, and "import" RSS is what the process held after its imports, before loading.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from bench.train_cpu import SMOKE, SMOLLM2_135M


def _rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def write_checkpoint(directory: pathlib.Path, hf_cfg: dict) -> None:
  import torch
  import transformers

  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).save_pretrained(directory)


def load_once(side: str, directory: str) -> dict:
  """In this process: import, then load the checkpoint; returns times and RSS."""
  if side == "jaxtune":
    import jax

    from jaxtune.hf.load import load_model

    jax.numpy.zeros(1).block_until_ready()  # backend start-up is not load time
    rss0 = _rss_gb()
    t0 = time.perf_counter()
    model = load_model(directory, dtype="float32")
    jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
  else:
    import torch
    import transformers

    rss0 = _rss_gb()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  return {"load_s": time.perf_counter() - t0, "import_rss_gb": rss0, "peak_rss_gb": _rss_gb()}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dir", default="/tmp/jaxtune_bench_ckpt")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(load_once(args.worker, args.dir)))
    return {}
  hf_cfg = SMOKE if args.smoke else SMOLLM2_135M
  directory = pathlib.Path(args.dir + ("_smoke" if args.smoke else ""))
  if args.smoke:
    args.rounds = 1
  marker = directory / "bench_config.json"
  if not marker.exists() or json.loads(marker.read_text()) != hf_cfg:
    subprocess.run(
      [
        sys.executable,
        "-c",
        f"from bench.load_time import write_checkpoint; import pathlib; "
        f"write_checkpoint(pathlib.Path({str(directory)!r}), {hf_cfg!r})",
      ],
      check=True,
      cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    marker.write_text(json.dumps(hf_cfg))
  size = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e9
  rows = {"jaxtune": [], "hf": []}
  for r in range(args.rounds):
    for side in ("jaxtune", "hf") if r % 2 == 0 else ("hf", "jaxtune"):
      out = subprocess.run(
        [sys.executable, "-m", "bench.load_time", "--worker", side, "--dir", str(directory)],
        check=True,
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).resolve().parents[1],
      )
      rows[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(f"checkpoint {directory}: {size:.3f} GB of safetensors (float32)")
  print(f"{'side':8} {'load s':>7} {'peak RSS GB':>11} {'import RSS GB':>13} {'peak - import':>13} {'/ file size':>11}")
  result = {"file_gb": size}
  for side, got in rows.items():
    load = statistics.median(g["load_s"] for g in got)
    peak = statistics.median(g["peak_rss_gb"] for g in got)
    base = statistics.median(g["import_rss_gb"] for g in got)
    result[side] = dict(load_s=load, peak_rss_gb=peak, import_rss_gb=base)
    print(f"{side:8} {load:7.2f} {peak:11.2f} {base:13.2f} {peak - base:13.2f} {(peak - base) / size:10.2f}x")
  return result


if __name__ == "__main__":
  main()
