"""DPO on CPU: a jaxtune LoRA step against TRL's DPOTrainer with PEFT, same pairs, with the SFT step beside it.

    python -m bench.dpo_cpu            # SmolLM2-135M shape, 4 pairs, 3 rounds x 3 steps per side
    python -m bench.dpo_cpu --smoke    # tiny model, 2 pairs, 1 round of 1 step: for checking the script

Both sides train the SmolLM2-135M shape (random weights, float32) with LoRA r=16, alpha=32 on the seven
projections, sigmoid DPO with beta 0.1 against the model with its adapters off, AdamW (weight decay 0, clip 1.0)
at TRL's DPO learning rate on the same pairs: `--pairs` prompts of `--prompt` random ids, each with a chosen and
a rejected completion of a random length in `--completion`.

The TRL side is TRL's own trainer as it ships (DPOConfig defaults, `peft_config` given, no `ref_model`), fed the
ids as they are (`_prepare_dataset` returns the already tokenised columns, as tests/preference/trl_reference.py
does) and timed from the loop's step start to its step end (forward, reference forward, backward, clipping,
optimizer and scheduler step), `trainer.train()` running in a thread that the timer lets through one step at a
time. It keeps TRL's gradient checkpointing (`--trl-checkpointing off` is the ablation); bf16 mixed precision,
which DPOConfig turns on by default, is off, because the benchmark is float32 on both sides.

The jaxtune side runs two ways, each its own worker: `live` computes the reference with the adapters off in
every step, as TRL does; `precomputed` computes the reference log-probs once before the first step (the
training CLI's pass, jaxtune.train.reference.compute) and carries them in the batch, which is what
`reference=auto` picks when the run sees every pair at least once. That pass is timed apart and printed per pair.
jaxtune packs the pairs as the training CLI does (rows of `--row-length`, default the longest pair rounded up
to 64 tokens); TRL pads the 2 x pairs sequences to the longest one. tokens/s counts the tokens of the prompts
and completions (each prompt twice), not padding, the same number on both sides.

The SFT step of bench/train_cpu.py runs in the same session (its own workers, on a batch of TRL's padded shape:
2 x pairs rows of prompt + the longest completion), so the CPU's own lean between torch and XLA shows beside the
DPO ratio. All five workers alternate turns as in bench/train_cpu.py (settle steps, the machine's product rate
before each turn, peak RSS per worker); `--sides` picks fewer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from bench.train_cpu import (
  HF_TARGETS,
  LORA,
  SMOKE,
  SMOLLM2_135M,
  _start,
  alternate,
  cpu_model,
  finish,
  jax_options,
  parser,
  peak_rss_gb,
  serve,
  spawn,
  started,
  summary,
)

DPO_LR = 1e-6  # TRL's DPOConfig default
SIDES = ("trl", "live", "precomputed", "sft-hf", "sft-jaxtune")
NAMES = {
  "trl": "TRL DPO",
  "live": "jaxtune DPO, live ref",
  "precomputed": "jaxtune DPO, precomputed ref",
  "sft-hf": "HF+PEFT SFT",
  "sft-jaxtune": "jaxtune SFT",
}
TARGET = 1.2  # tokens/s over TRL's; peak RSS at most TRL's


def make_pairs(n: int, prompt: int, completion: tuple[int, int], vocab: int, seed: int = 0) -> list[dict]:
  """`n` pairs {prompt_ids, chosen_ids, rejected_ids} of random ids in [3, vocab) (clear of the special ids),
  completion lengths drawn from completion = (shortest, longest)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  ids = lambda k: rng.integers(3, vocab, int(k)).tolist()
  out = []
  for _ in range(n):
    p = ids(prompt)
    c = ids(rng.integers(completion[0], completion[1] + 1))
    out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": ids(rng.integers(completion[0], completion[1] + 1))})
  return out


def pair_tokens(pairs: list[dict]) -> int:
  """Tokens a step trains on: prompt + chosen and prompt + rejected of every pair, no padding."""
  return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def longest_pair(pairs: list[dict]) -> int:
  return max(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


# ---------------------------------------------------------------------------------------------- jaxtune side
def pair_examples(pairs: list[dict]):
  """The pairs as the training CLI tokenises them (jaxtune.data.preference): prompt + chosen, then prompt +
  rejected, loss on the completions, `parts` the first sequence's length."""
  import numpy as np

  from jaxtune.data.examples import Examples

  items = []
  for i, pair in enumerate(pairs):
    p, c, r = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
    ids = np.asarray(p + c + p + r, np.int32)
    mask = np.asarray([0] * len(p) + [1] * len(c) + [0] * len(p) + [1] * len(r), np.int8)
    items.append((ids, mask, i, f"pair {i}", len(p) + len(c)))
  return Examples.from_items(items)


COMPILE_EVENTS = (  # jax's own timings of a jit's trace, lowering and XLA compile
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


def reference_pass(model, pairs: list[dict], row_length: int) -> tuple:
  """(the pairs' examples with their ref_logps, seconds compiling, seconds per pair after that).

  The training CLI's pass (jaxtune.train.reference.compute) runs 8 examples per forward and compiles its
  forward once per call: a cost per run, not per pair, taken from jax's compile events. So that no forward
  holds padding rows, the pass runs over copies of the pairs, two forwards at least; the batch takes the
  first copy's log-probs."""
  import dataclasses

  import jax

  from jaxtune.data import packing
  from jaxtune.train import reference

  count = max(16, 8 * math.ceil(len(pairs) / 8))
  copies = pair_examples([pairs[i % len(pairs)] for i in range(count)])
  compiling = []

  def listen(event, duration, **kwargs):
    if event in COMPILE_EVENTS:
      compiling.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    t0 = time.perf_counter()
    ref = reference.compute(copies, model, packing.bucket_lengths((), row_length))
    spent = time.perf_counter() - t0
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  examples = pair_examples(pairs)
  examples = dataclasses.replace(examples, ref_logps=ref[: examples.offsets[-1]])
  return examples, sum(compiling), (spent - sum(compiling)) / count


def jaxtune_side(hf_cfg: dict, pairs: list[dict], reference: str, lr: float, row_length: int, loss_chunk: int = 128):
  """(run, n_trainable, info): run() does one jaxtune DPO step (LoRA, the reference `live` or `precomputed`)."""
  import jax
  from flax import nnx

  from jaxtune.data import packing
  from jaxtune.hf.load import init_model
  from jaxtune.models.config import from_hf_dict
  from jaxtune.peft import lora as lora_lib
  from jaxtune.train import objectives, optim, step

  model = init_model(from_hf_dict(hf_cfg), seed=0, options=jax_options())
  lora_lib.apply_lora(model, rank=LORA["rank"], alpha=LORA["alpha"], dropout=0.0, rngs=nnx.Rngs(1))
  info = {}
  if reference == "precomputed":  # before the state takes the model's arrays, as in jaxtune.train.loop
    examples, info["ref_compile_s"], info["ref_per_pair_s"] = reference_pass(model, pairs, row_length)
  else:
    examples = pair_examples(pairs)
  config = objectives.objective_config()
  config.objective = "dpo"
  objective = step.Objective(
    "dpo", objectives.settings(config), lora_lib.base_graphdef(model) if reference == "live" else None
  )
  ocfg = optim.optim_config()
  ocfg.lr, ocfg.schedule, ocfg.weight_decay, ocfg.clip_norm = lr, "constant", 0.0, 1.0
  tx = optim.make_optimizer(ocfg, total_steps=10**6)
  graphdef, frozen, state = step.init_train_state(model, tx, method="lora")
  del model
  train_step = step.make_train_step(graphdef, frozen, tx, loss_chunk=loss_chunk, objective=objective)

  rows = packing.pack(examples.lengths, row_length)
  ref = examples.ref_logps
  batch = packing.collate(
    [
      [
        packing.Example(
          *examples[i],
          parts=int(examples.parts[i]),
          ref_logps=None if ref is None else ref[examples.offsets[i] : examples.offsets[i + 1]],
        )
        for i in row
      ]
      for row in rows
    ],
    row_length,
  )
  batch = {k: v[None] for k, v in batch.items()}  # one micro-batch
  info["layout"] = f"{len(rows)} x {row_length}"
  holder = {"state": state}

  def run() -> float:
    holder["state"], metrics = train_step(holder["state"], batch)
    return float(metrics["loss"])  # blocks until the step is done

  return run, sum(x.size for x in jax.tree.leaves(state.params)), info


# ------------------------------------------------------------------------------------------------- TRL side
def tokenizer(config):
  """A word-level tokenizer over the model's vocabulary ("t<id>"): TRL needs one for its pad id, never to encode."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  names = {i: f"t{i}" for i in range(config.vocab_size)}
  names[config.bos_token_id], names[config.eos_token_id] = "<bos>", "<eos>"
  backend = Tokenizer(models.WordLevel(vocab={n: i for i, n in names.items()}, unk_token="<eos>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")


def trl_side(hf_cfg: dict, pairs: list[dict], lr: float, checkpointing: bool):
  """(run, n_trainable, info): run() lets TRL's training loop, running in a thread, through one step."""
  import tempfile
  import threading

  import datasets
  import peft
  import torch
  import transformers
  from trl import DPOConfig, DPOTrainer

  torch.manual_seed(0)
  config = transformers.LlamaConfig(**hf_cfg)
  config._attn_implementation = "sdpa"  # as bench/train_cpu.py's HF side
  model = transformers.LlamaForCausalLM(config)

  class Gate(transformers.TrainerCallback):
    """Holds the loop at every step's start until `run` lets one step through; tells `run` when it ends."""

    def __init__(self):
      self.go, self.done, self.ready, self.loss, self.failure = (
        threading.Semaphore(0),
        threading.Semaphore(0),
        threading.Event(),
        None,
        None,
      )

    def on_step_begin(self, args, state, control, **kwargs):
      self.ready.set()
      self.go.acquire()

    def on_step_end(self, args, state, control, **kwargs):
      self.done.release()

  gate = Gate()

  class IdsDPOTrainer(DPOTrainer):
    # The records already are `_prepare_dataset`'s output columns (prompt_ids, chosen_ids, rejected_ids), which
    # TRL's DataCollatorForPreference concatenates and pads as they are.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
      return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
      out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
      gate.loss = float((out[0] if return_outputs else out).detach())
      return out

  out_dir = tempfile.mkdtemp(prefix="dpo-bench-")
  settings = dict(
    output_dir=out_dir,
    per_device_train_batch_size=len(pairs),
    max_steps=10**6,  # the loop runs until the worker exits; the linear schedule barely moves in a benchmark
    learning_rate=lr,
    bf16=False,  # float32 on both sides
    use_cpu=True,
    save_strategy="no",  # no checkpoints written while timing
    report_to="none",
    disable_tqdm=True,
  )
  if not checkpointing:
    settings["activation_checkpointing"] = False  # transformers' name for DPOConfig's gradient_checkpointing
  trainer = IdsDPOTrainer(
    model=model,
    args=DPOConfig(**settings),
    train_dataset=datasets.Dataset.from_list(pairs),
    processing_class=tokenizer(config),
    peft_config=peft.LoraConfig(
      r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=HF_TARGETS, task_type="CAUSAL_LM"
    ),
  )
  if trainer.ref_model is not None:
    raise AssertionError("TRL built a separate reference model; with PEFT it should disable the adapters")
  trainer.remove_callback(transformers.PrinterCallback)  # its log lines would interleave with the worker protocol
  trainer.add_callback(gate)

  def train():
    try:
      trainer.train()
    except BaseException as e:  # surfaced by run()
      gate.failure = e
      gate.ready.set()
      gate.done.release()

  threading.Thread(target=train, daemon=True).start()
  gate.ready.wait()

  def run() -> float:
    if gate.failure is None:
      gate.go.release()
      gate.done.acquire()
    if gate.failure is not None:
      raise RuntimeError("TRL's training loop failed") from gate.failure
    return gate.loss

  n = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
  longest = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
  info = {
    "layout": f"{2 * len(pairs)} x {longest}",
    "activation_checkpointing": bool(trainer.model.get_base_model().is_activation_checkpointing),
  }
  return run, n, info


# ------------------------------------------------------------------------------------------------ the worker
def worker(args) -> None:
  """Builds one DPO side, warms up, then serves bench/train_cpu.py's `run N [S]` protocol on stdin / stdout."""
  hf_cfg = SMOKE if args.smoke else SMOLLM2_135M
  pairs = make_pairs(args.pairs, args.prompt, _span(args.completion), hf_cfg["vocab_size"], args.seed)
  t0 = time.perf_counter()
  if args.worker == "trl":
    run, n, info = trl_side(hf_cfg, pairs, args.lr, args.trl_checkpointing == "on")
  else:
    run, n, info = jaxtune_side(hf_cfg, pairs, args.worker, args.lr, args.row_length)
  build = time.perf_counter() - t0
  t0 = time.perf_counter()
  loss = first_loss = run()
  first = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    loss = run()
  print(
    json.dumps(
      {"build_s": build, "first_step_s": first, "trainable": n, "loss": loss, "first_loss": first_loss} | info
    ),
    flush=True,
  )
  serve(run)
  print(json.dumps({"peak_rss_gb": peak_rss_gb()}), flush=True)


def _span(text: str) -> tuple[int, int]:
  lo, _, hi = text.partition(",")
  return int(lo), int(hi or lo)


def _start_dpo(side: str, args) -> object:
  cmd = [sys.executable, "-m", "bench.dpo_cpu", "--worker", side]
  for flag in ("pairs", "prompt", "completion", "seed", "warmup", "lr", "row_length", "trl_checkpointing"):
    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
  cmd += ["--smoke"] if args.smoke else []
  return spawn(cmd, jaxtune=side != "trl", hugepages=args.hugepages)


# ------------------------------------------------------------------------------------------------ the parent
def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=3, help="measured steps per side per round")
  p.add_argument("--warmup", type=int, default=2, help="unmeasured steps after the build (the first compiles)")
  p.add_argument("--settle", type=int, default=1, help="unmeasured steps at the start of every turn, every side")
  p.add_argument("--pairs", type=int, default=4, help="pairs per step (TRL's per_device_train_batch_size)")
  p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
  p.add_argument("--completion", default="64,128", help="shortest,longest completion (chosen and rejected alike)")
  p.add_argument("--seed", type=int, default=0, help="of the pairs' ids and lengths")
  p.add_argument("--lr", type=float, default=DPO_LR, help="both sides (TRL's DPO default)")
  p.add_argument("--row-length", type=int, default=0, help="jaxtune's packed row length; 0: the longest pair, to 64")
  p.add_argument(
    "--trl-checkpointing",
    choices=("on", "off"),
    default="on",
    help="TRL's gradient checkpointing: on is DPOConfig's default, off the ablation",
  )
  p.add_argument(
    "--hugepages",
    choices=("cli", "none", "both"),
    default="cli",
    help="as bench/train_cpu.py: cli gives the jaxtune workers the training CLI's huge-page setting",
  )
  p.add_argument("--smoke", action="store_true", help="tiny model, 2 short pairs, 1 round of 1 step")
  p.add_argument("--json", help="also write the results here")
  p.add_argument("--worker", choices=SIDES[:3], help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    return worker(args)
  if args.smoke:
    args.rounds, args.steps, args.warmup = 1, 1, 1
    args.pairs, args.prompt, args.completion = 2, 8, "8,16"
  hf_cfg = SMOKE if args.smoke else SMOLLM2_135M
  pairs = make_pairs(args.pairs, args.prompt, _span(args.completion), hf_cfg["vocab_size"], args.seed)
  tokens = pair_tokens(pairs)
  if not args.row_length:
    args.row_length = 64 * math.ceil(longest_pair(pairs) / 64)
  sft_batch = 2 * len(pairs)
  sft_seq = max(len(q["prompt_ids"]) + max(len(q["chosen_ids"]), len(q["rejected_ids"])) for q in pairs)
  sft = parser().parse_args(
    ["--setting", "lora", "--batch", str(sft_batch), "--seq", str(sft_seq), "--warmup", str(args.warmup)]
    + ["--hugepages", args.hugepages]
    + (["--smoke"] if args.smoke else [])
  )
  sides = args.sides.split(",")
  unknown = set(sides) - set(SIDES)
  if unknown:
    raise SystemExit(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
  procs, info = {}, {}
  for s in sides:  # built and warmed one at a time: never two heavy jobs at once
    procs[s] = _start(s.removeprefix("sft-"), sft) if s.startswith("sft-") else _start_dpo(s, args)
    info[s] = started(s, procs[s])
  turns = alternate(procs, args.rounds, args.steps, args.settle)
  finish(procs, info)
  rows = {s: summary(info[s], turns[s], sft_batch * sft_seq if s.startswith("sft-") else tokens) for s in sides}
  report = _report(args, rows, pairs, tokens, sft_batch, sft_seq)
  result = {
    "cpu": cpu_model(),
    "smoke": args.smoke,
    "pairs": len(pairs),
    "prompt": args.prompt,
    "completion": args.completion,
    "tokens_per_step": tokens,
    "row_length": args.row_length,
    "sft_shape": [sft_batch, sft_seq],
    "trl_checkpointing": args.trl_checkpointing,
    "hugepages": args.hugepages,
    "settle": args.settle,
    "lr": args.lr,
    **report,
    "sides": rows,
  }
  print(json.dumps(result), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


def _ratio(rows: dict, mine: str, theirs: str) -> dict | None:
  if mine not in rows or theirs not in rows:
    return None
  a, b = rows[mine], rows[theirs]
  return {"tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"], "peak_rss": a["peak_rss_gb"] / b["peak_rss_gb"]}


def _report(args, rows: dict, pairs: list[dict], tokens: int, sft_batch: int, sft_seq: int) -> dict:
  """Prints the table and the ratios; returns the ratios and the verdicts."""
  n = len(next(iter(rows.values()))["times"])
  lo, hi = _span(args.completion)
  print(
    f"\nDPO: {len(pairs)} pairs, prompt {args.prompt} + completions {lo}..{hi} tokens ({tokens:,} tokens a step, "
    f"no padding counted), float32, LoRA r={LORA['rank']}; SFT: {sft_batch} x {sft_seq}; median of {n} steps/side"
  )
  print(f"cpu: {cpu_model()}")
  checkpointing = rows["trl"]["activation_checkpointing"] if "trl" in rows else args.trl_checkpointing == "on"
  print(
    f"TRL gradient checkpointing: {'on' if checkpointing else 'off'}; hugepages: {args.hugepages}; "
    f"unmeasured steps per turn: {args.settle}"
  )
  print(
    f"{'side':29} {'layout':>9} {'tokens/s':>9} {'step s':>7} {'min s':>6} {'peak RSS GB':>11} "
    f"{'first step s':>12} {'first loss':>10}"
  )
  for s, row in rows.items():
    first_loss = f"{row['first_loss']:10.4f}" if "first_loss" in row else f"{'':10}"
    layout = row.get("layout", f"{sft_batch} x {sft_seq}")
    print(
      f"{NAMES[s]:29} {layout:>9} {row['tokens_per_s']:9.1f} {row['step_s']:7.2f} {row['step_min_s']:6.2f} "
      f"{row['peak_rss_gb']:11.2f} {row['first_step_s']:12.1f} {first_loss}"
    )
  out = {"ratios": {}, "targets": {}}
  for mine in ("live", "precomputed"):
    r = _ratio(rows, mine, "trl")
    if r is None:
      continue
    out["ratios"][f"dpo_{mine}"] = r
    met = r["tokens_per_s"] >= TARGET and r["peak_rss"] <= 1.0
    out["targets"][f"dpo_{mine}"] = met
    print(
      f"DPO jaxtune ({mine} reference) / TRL: tokens/s {r['tokens_per_s']:.2f}x, peak RSS {r['peak_rss']:.2f}x -> "
      + ("target met" if met else f"MISSED (target: tokens/s >= {TARGET}x and peak RSS <= 1.00x)")
    )
  r = _ratio(rows, "sft-jaxtune", "sft-hf")
  if r is not None:
    out["ratios"]["sft"] = r
    print(
      f"SFT jaxtune / HF+PEFT, same run: tokens/s {r['tokens_per_s']:.2f}x, peak RSS {r['peak_rss']:.2f}x "
      "(the CPU's own lean between XLA and torch)"
    )
  if "precomputed" in rows:
    pre = rows["precomputed"]
    line = (
      f"reference pass (precomputed, once before training): {pre['ref_compile_s']:.1f} s compiling, then "
      f"{pre['ref_per_pair_s'] * 1e3:.0f} ms per pair"
    )
    if "live" in rows:
      saved = (rows["live"]["step_s"] - pre["step_s"]) / len(pairs)
      out["ref_step_saving_per_pair_s"] = saved
      line += f"; it saves {saved * 1e3:.0f} ms per pair per step against the live reference"
      if saved > 0:
        line += f" (pays for itself within {math.ceil(pre['ref_per_pair_s'] / saved)} epoch(s))"
    print(line)
  first = {s: rows[s]["first_loss"] for s in rows if "first_loss" in rows[s]}
  if first:
    print(
      "first-step DPO loss (log 2 = 0.6931 while the policy equals its reference): "
      + ", ".join(f"{s} {v:.4f}" for s, v in first.items())
    )
  every = [x for row in rows.values() for x in row["machine_gflops"]]
  print(
    f"machine float32 product rate before each turn: {min(every):.0f}-{max(every):.0f} GFLOP/s "
    f"({max(every) / min(every) - 1:.0%} apart)"
  )
  return out


if __name__ == "__main__":
  main()
