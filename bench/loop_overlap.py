"""The train loop with and without host/device overlap (`train.overlap`), alternating, in one process.

    python -m bench.loop_overlap                      # configs/tiny.py, 1,000 steps, 5 rounds
    python -m bench.loop_overlap --steps 40 --rounds 1   # a quick look

Each run is a whole `jaxtune.train` run of the tiny config (data pipeline, logging every 10
steps, a checkpoint at the end, no eval). Its steps take milliseconds, so the host's work
between steps (next batch, transfer, dispatch, reading metrics) is a large share of the step:
this is where overlap shows. tokens/s is the loop's own figure (train/tokens_per_s of the last
step: tokens since the end of step 1 over the time since then); a model whose steps take
seconds gains in proportion to its host gap, which is what this bench measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(workdir: pathlib.Path, **overrides):
  """configs/tiny.py (loaded by path, as --config does) with its run and cache dirs under `workdir`."""
  spec = importlib.util.spec_from_file_location("configs_tiny", REPO / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.output_dir = str(workdir / "run")
  config.model.cache_dir, config.data.cache_dir = str(workdir.parent / "models"), str(workdir.parent / "data")
  config.update_from_flattened_dict(overrides)
  return config


def one_run(overlap: bool, steps: int, workdir: pathlib.Path) -> float:
  """tokens/s of one whole tiny run (train/tokens_per_s of its last step)."""
  from jaxtune.train import loop

  config = tiny_config(
    workdir,
    **{
      "train.steps": steps,
      "train.overlap": overlap,
      "train.log_every": 10,
      "train.eval": False,
      "train.eval_every": 0,
      "checkpoint.every": 0,
    },
  )
  loop.train(config)
  lines = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
  return [m for m in lines if "train/tokens_per_s" in m][-1]["train/tokens_per_s"]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args(argv)
  import jax

  got = {True: [], False: []}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for overlap in (True, False) if r % 2 == 0 else (False, True):
        tps = one_run(overlap, args.steps, pathlib.Path(tmp) / f"run_{r}_{overlap}")
        got[overlap].append(tps)
        print(f"round {r}: overlap={overlap}: {tps:,.0f} tokens/s", flush=True)
  on, off = statistics.median(got[True]), statistics.median(got[False])
  print(f"\n{jax.devices()[0].device_kind}, configs/tiny.py, {args.steps} steps x {args.rounds} rounds (medians)")
  print("| train.overlap | tokens/s |\n|---|---|")
  print(f"| True | {on:,.0f} |\n| False | {off:,.0f} |")
  print(f"ratio: {on / off:.3f}x")
  return {"overlap": on, "sync": off, "ratio": on / off}


if __name__ == "__main__":
  main()
