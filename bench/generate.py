"""jaxtune's KV-cache sampler against transformers' `generate`, side by side: prefill and decode tokens/s.

    python -m bench.generate                                  # SmolLM2-135M, batch 1, 8, 50 x 32, 128 new tokens
    python -m bench.generate --batch 50 --new 32 --sampled    # temperature 1, top-p 0.9 on both sides
    python -m bench.generate --smoke                          # the tiny random model, seconds

Each side runs in its own worker process (its own peak RSS) on the same model files (the built-in
SmolLM2 conversion by default, or --model DIR) and the same prompts: the quickstart's held-out
sentences in the model's chat template, left-padded, `--batch` of them. Both decode exactly --new
tokens (stop tokens off on both sides), greedy unless --sampled. For each (batch, new) the parent
asks the workers in turn, alternating who goes first, --rounds times after a warm-up, and keeps each
side's fastest time; prefill is timed as a 1-token generation, decode as what N tokens add to it:
decode tokens/s = batch x (N - 1) / (t_N - t_1). The CPU model is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from bench.train_cpu import _ask, cpu_model


def _prompts(tokenizer, batch: int) -> list[list[int]]:
  from jaxtune.generation import encode_prompts
  from jaxtune.tasks import load_examples, meeting_json

  examples = load_examples(str(meeting_json.DATA / "test.jsonl"), 50)
  prompts = encode_prompts(tokenizer, [e.prompt for e in examples])
  return [prompts[i % len(prompts)] for i in range(batch)]


def _jaxtune_side(path: str, dtype: str, sampled: bool):
  from jaxtune.generation import generate_ids
  from jaxtune.hf.load import load_model, load_tokenizer

  model, tokenizer = load_model(path, dtype=dtype), load_tokenizer(path)
  sampling = dict(temperature=1.0, top_p=0.9) if sampled else {}

  def run(prompts, new):
    out = generate_ids(model, prompts, max_new_tokens=new, stop_ids=(), **sampling)
    assert all(len(row) == new for row in out)

  return tokenizer, run


def _hf_side(path: str, dtype: str, sampled: bool):
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count() or 1)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
  )
  model.eval()
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  sampling = dict(do_sample=True, temperature=1.0, top_p=0.9) if sampled else dict(do_sample=False)

  def run(prompts, new):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
      out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=pad,
        eos_token_id=None,
        **sampling,
      )
    assert out.shape[1] == width + new

  return tokenizer, run


def worker(side: str, path: str, dtype: str, sampled: bool) -> None:
  """Loads one side, then answers `BATCH NEW` lines on stdin with the seconds that generation took."""
  tokenizer, run = (_jaxtune_side if side == "jaxtune" else _hf_side)(path, dtype, sampled)
  print(json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    batch, new = map(int, line.split())
    prompts = _prompts(tokenizer, batch)
    start = time.perf_counter()
    run(prompts, new)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux reports KiB)
    tokens = sum(map(len, prompts))
    print(json.dumps({"seconds": seconds, "peak_rss_gib": rss, "prompt_tokens": tokens}), flush=True)


def _start(side: str, args, path: str) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "bench.generate", "--worker", side, "--model", path, "--dtype", args.dtype]
  cmd += ["--sampled"] if args.sampled else []
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="", help="an HF checkpoint directory (default: the built-in SmolLM2)")
  p.add_argument("--batch", default="1,8,50", help="comma-separated batch sizes")
  p.add_argument("--new", default="32,128", help="comma-separated numbers of new tokens")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--sampled", action="store_true", help="temperature 1, top-p 0.9 (default: greedy)")
  p.add_argument("--rounds", type=int, default=2, help="measured turns per side and setting; the fastest counts")
  p.add_argument("--smoke", action="store_true", help="the tiny random model, batch 2, 16 new tokens, 1 round")
  p.add_argument("--worker", choices=("jaxtune", "transformers"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  from jaxtune.train import builtin_models

  path = args.model or builtin_models.resolve(
    "tiny-random" if args.smoke else "smollm2-gguf", builtin_models.DEFAULT_CACHE
  )
  if args.worker:
    worker(args.worker, str(path), args.dtype, args.sampled)
    return []
  if args.smoke:
    args.batch, args.new, args.rounds = "2", "16", 1
  print(f"cpu: {cpu_model()}\nmodel: {path} ({args.dtype}, {'sampled' if args.sampled else 'greedy'})", flush=True)
  sides = {side: _start(side, args, str(path)) for side in ("jaxtune", "transformers")}
  results = []
  try:
    for proc in sides.values():
      _ask(proc)  # loaded
    print(f"{'batch':>5} {'new':>4} | {'side':<12} {'prefill tok/s':>13} {'decode tok/s':>12} {'peak RSS GiB':>12}")
    for batch in map(int, args.batch.split(",")):
      for new in map(int, args.new.split(",")):
        best = {side: {1: float("inf"), new: float("inf")} for side in sides}
        rss, prompt_tokens = {}, 0
        for round_ in range(args.rounds + 1):  # round 0 warms up (compiles) and is not counted
          order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
          for side in order:
            for n in (1, new):
              answer = _ask(sides[side], f"{batch} {n}")
              rss[side], prompt_tokens = answer["peak_rss_gib"], answer["prompt_tokens"]
              if round_:
                best[side][n] = min(best[side][n], answer["seconds"])
        for side in sides:
          prefill = prompt_tokens / best[side][1]
          decode = batch * (new - 1) / max(best[side][new] - best[side][1], 1e-9)
          row = dict(
            side=side, batch=batch, new=new, prefill_tok_s=prefill, decode_tok_s=decode, peak_rss_gib=rss[side]
          )
          results.append(row)
          print(f"{batch:>5} {new:>4} | {side:<12} {prefill:>13,.0f} {decode:>12,.1f} {rss[side]:>12.2f}", flush=True)
        ratio = results[-2]["decode_tok_s"] / results[-1]["decode_tok_s"]
        print(f"{'':>10} | jaxtune / transformers decode: {ratio:.2f}x", flush=True)
  finally:
    for proc in sides.values():
      proc.stdin.close()
      proc.wait(timeout=60)
  return results


if __name__ == "__main__":
  main()
