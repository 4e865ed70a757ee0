"""jaxtune's KV-cache sampler against transformers' `generate`, side by side: prefill and decode tokens/s.

    python -m bench.generate                                  # SmolLM2-135M, batch 1, 8, 50 x 32, 128 new tokens
    python -m bench.generate --batch 50 --new 32 --sampled    # temperature 1, top-p 0.9 on both sides
    python -m bench.generate --smoke                          # the tiny random model, seconds
    python -m bench.generate --before HEAD~1 --batch 1,50 --new 32   # + jaxtune at another commit, a third side
    python -m bench.generate --profile /tmp/gen --batch 50 --new 128  # where jaxtune's time goes: ops, roles, rates

Each side runs in its own worker process (its own peak RSS) on the same model files (the built-in
SmolLM2 conversion by default, or --model DIR) and the same prompts: the quickstart's held-out
sentences in the model's chat template, left-padded, `--batch` of them. Both decode exactly --new
tokens (stop tokens off on both sides), greedy unless --sampled. For each (batch, new) the parent
asks the workers in turn, alternating who goes first, --rounds times after a warm-up, and keeps each
side's fastest time; prefill is timed as a 1-token generation, decode as what N tokens add to it:
decode tokens/s = batch x (N - 1) / (t_N - t_1). The CPU model is printed with the figures.
`--before REF` adds jaxtune as of another commit (checked out in a temporary worktree, its own worker
importing that tree's code) as a third side, so a change to the sampler is measured before and after
in the same run as transformers. A jaxtune worker runs in the environment of jaxtune's commands
(glibc huge pages for XLA's buffers where they apply, jaxtune/train/host.py); transformers as it is.

`--profile DIR` runs jaxtune alone at the first --batch and --new: it traces a 1-token generation (the
prefill) and a --new-token one with jax.profiler, dumps their optimised HLO, and prints for each
`bench.profile_step`'s tables: time per op kind, per product role (layer products, LM head,
attention) with its FLOP rate, and the top ops, per generated token. docs/performance-notes.md,
"Generation", reads one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

from bench.compare_commits import resolve, worktree
from bench.train_cpu import _ask, cpu_model
from jaxtune.train import host


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def profile(path: str, dtype: str, batch: int, new: int, out: str, top: int = 25) -> str:
  """The --profile report (see the module docstring); run in a process whose XLA_FLAGS dump HLO to out/hlo."""
  import glob

  import jax

  from bench import profile_step

  tokenizer, run = _jaxtune_side(path, dtype, False)
  prompts = _prompts(tokenizer, batch)
  reports = []
  for n in (1, new):
    run(prompts, n)  # compiles: its HLO is the newest in the dump
    hlo = max(glob.glob(f"{out}/hlo/*_generate*after_optimizations.txt"), key=os.path.getmtime)
    with jax.profiler.trace(f"{out}/trace_{n}"):
      run(prompts, n)
    xplane = max(glob.glob(f"{out}/trace_{n}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
    what = "prefill (a 1-token generation)" if n == 1 else f"a {n}-token generation, per generated token"
    reports.append(f"== batch {batch}, {what}\n")
    reports.append(profile_step.trace_report(xplane, n, hlo, top) + "\n")
  return "".join(reports)


def _start(side: str, args, path: str, root: str = ROOT) -> subprocess.Popen:
  """A worker for `side` ("jaxtune" or "transformers") importing the jaxtune and bench of the tree at `root`."""
  cmd = [sys.executable, "-m", "bench.generate", "--worker", side, "--model", path, "--dtype", args.dtype]
  cmd += ["--sampled"] if args.sampled else []
  env = {**os.environ, "PYTHONPATH": root}
  if side == "jaxtune":  # the environment `jaxtune chat`, `eval` and `train` re-execute in (jaxtune/train/host.py)
    env = host.huge_page_environ(env, glibc=host.glibc_version(), thp=host.thp_mode()) or env
  return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="", help="an HF checkpoint directory (default: the built-in SmolLM2)")
  p.add_argument("--batch", default="1,8,50", help="comma-separated batch sizes")
  p.add_argument("--new", default="32,128", help="comma-separated numbers of new tokens")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--sampled", action="store_true", help="temperature 1, top-p 0.9 (default: greedy)")
  p.add_argument("--rounds", type=int, default=2, help="measured turns per side and setting; the fastest counts")
  p.add_argument("--smoke", action="store_true", help="the tiny random model, batch 2, 16 new tokens, 1 round")
  p.add_argument("--before", default="", help="also jaxtune at this commit (hash, branch, tag), as a third side")
  p.add_argument("--profile", default="", metavar="DIR", help="profile jaxtune at the first --batch and --new")
  p.add_argument("--top", type=int, default=25, help="with --profile: ops listed per table")
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
  if args.profile:
    batch, new = int(args.batch.split(",")[0]), int(args.new.split(",")[0])
    if os.environ.get("XLA_FLAGS", "").find("--xla_dump_to") < 0:  # again, in a process that dumps its HLO
      args.profile = os.path.abspath(args.profile)
      dump = f"--xla_dump_to={args.profile}/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*_generate.*"
      env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + dump).strip()}
      env = host.huge_page_environ(env, glibc=host.glibc_version(), thp=host.thp_mode()) or env
      again = [sys.executable, "-m", "bench.generate", *(argv or sys.argv[1:]), "--profile", args.profile]
      subprocess.run(again, env=env, cwd=ROOT, check=True)
      return []
    print(f"cpu: {cpu_model()}\nmodel: {path} ({args.dtype}, greedy)", flush=True)
    print(profile(str(path), args.dtype, batch, new, args.profile, args.top), flush=True)
    return []
  print(f"cpu: {cpu_model()}\nmodel: {path} ({args.dtype}, {'sampled' if args.sampled else 'greedy'})", flush=True)
  stack = contextlib.ExitStack()
  sides = {side: _start(side, args, str(path)) for side in ("jaxtune", "transformers")}
  if args.before:
    commit = resolve(ROOT, args.before, "--before")
    print(f"before: jaxtune at {commit[:12]} ({args.before})", flush=True)
    sides[f"jaxtune@{args.before}"] = _start("jaxtune", args, str(path), stack.enter_context(worktree(ROOT, commit)))
  results = []
  try:
    for proc in sides.values():
      _ask(proc)  # loaded
    print(f"{'batch':>5} {'new':>4} | {'side':<16} {'prefill tok/s':>13} {'decode tok/s':>12} {'peak RSS GiB':>12}")
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
        rows = {}
        for side in sides:
          prefill = prompt_tokens / best[side][1]
          decode = batch * (new - 1) / max(best[side][new] - best[side][1], 1e-9)
          row = dict(
            side=side, batch=batch, new=new, prefill_tok_s=prefill, decode_tok_s=decode, peak_rss_gib=rss[side]
          )
          results.append(row)
          rows[side] = row
          print(f"{batch:>5} {new:>4} | {side:<16} {prefill:>13,.0f} {decode:>12,.1f} {rss[side]:>12.2f}", flush=True)
        hf = rows["transformers"]
        for side in (s for s in sides if s != "transformers"):
          print(
            f"{'':>10} | {side} / transformers: decode {rows[side]['decode_tok_s'] / hf['decode_tok_s']:.2f}x, "
            f"prefill {rows[side]['prefill_tok_s'] / hf['prefill_tok_s']:.2f}x",
            flush=True,
          )
  finally:
    for proc in sides.values():
      proc.stdin.close()
      proc.wait(timeout=60)
    stack.close()
  return results


if __name__ == "__main__":
  main()
