"""GRPO on CPU: jaxtune against TRL's GRPOTrainer with PEFT (transformers generation), same prompts, G and lengths.

    python -m bench.grpo_cpu                 # SmolLM2-135M-Instruct, 2 prompts x 8 completions of <= 32 tokens, 4 steps
    python -m bench.grpo_cpu --steps 2       # shorter

Both sides: the built-in smollm2-gguf checkpoint in float32, LoRA r=16, alpha=32 on the seven projections, the
quickstart's meeting-to-JSON prompts (the same ones, in order), temperature 1.0, beta 0, DAPO, AdamW at TRL's
learning rate, one optimiser step per sampled batch, the same reward (`reward` below). Each side runs in its own
process, one after the other. Reported per step after the first (which compiles / warms up): whole-step time,
generation time and rollout tokens/s (completion tokens generated, stop tokens included, padding not).
TRL's generation time is its `_generate_single_turn` (transformers `generate`); its step is the Trainer's step
(generation, reward, the log-prob forward passes, backward, optimiser). jaxtune's are the run's
`time/generation_s` and `time/generation_s + time/train_s` from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

PROMPTS, G, NEW, LR = 2, 8, 32, 1e-6


def reward(prompts, completions, reference=None, answer=None, **_):
  """json_fields against the reference answer (TRL passes the dataset's `answer` column, jaxtune `reference`)."""
  from jaxtune.eval.metrics import json_fields

  refs = reference if reference is not None else answer
  texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
  return [json_fields(t.strip(), [r]) for t, r in zip(texts, refs)]


def _records(n: int) -> list[dict]:
  from jaxtune.tasks import meeting_json

  lines = (meeting_json.DATA / "train.jsonl").read_text().splitlines()[:n]
  return [json.loads(line) for line in lines]


def trl_side(steps: int) -> dict:
  import torch
  from datasets import Dataset
  from peft import LoraConfig
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl import GRPOConfig, GRPOTrainer

  from jaxtune.train import builtin_models

  torch.manual_seed(0)
  path = builtin_models.resolve("smollm2-gguf", builtin_models.DEFAULT_CACHE)
  records = _records(PROMPTS * steps)
  data = Dataset.from_list([{"prompt": r["messages"][:-1], "answer": r["messages"][-1]["content"]} for r in records])
  times = {"step": [], "generate": [], "tokens": []}

  class Timed(GRPOTrainer):
    def _generate_single_turn(self, *args, **kwargs):
      start = time.perf_counter()
      out = super()._generate_single_turn(*args, **kwargs)
      times["generate"].append(time.perf_counter() - start)
      times["tokens"].append(sum(len(c) for c in out[0]))  # completion ids per row, stop token included
      return out

  class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      times["step"].append(time.perf_counter() - self.start)

  args = GRPOConfig(
    output_dir=tempfile.mkdtemp(),
    per_device_train_batch_size=PROMPTS * G,
    num_generations=G,
    max_completion_length=NEW,
    temperature=1.0,
    learning_rate=LR,
    max_steps=steps,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    bf16=False,
    shuffle_dataset=False,
    save_strategy="no",
  )
  lora = LoraConfig(
    r=16,
    lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
  )
  model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
  trainer = Timed(
    model=model,
    reward_funcs=reward,
    args=args,
    train_dataset=data,
    processing_class=AutoTokenizer.from_pretrained(path),
    peft_config=lora,
    callbacks=[Clock()],
  )
  trainer.train()
  return times


def jaxtune_side(steps: int) -> dict:
  from jaxtune.configs import grpo_quickstart
  from jaxtune.train import loop

  with tempfile.TemporaryDirectory() as tmp:
    prompts = pathlib.Path(tmp) / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in _records(PROMPTS * steps)))
    config = grpo_quickstart.get_config()
    config.output_dir = str(pathlib.Path(tmp) / "run")
    config.data.train = (str(prompts),)
    config.data.batch_size, config.train.grad_accum = PROMPTS * G, 1
    config.grpo.update(dict(max_completion_length=NEW, temperature=1.0, reward_funcs=("bench.grpo_cpu:reward",)))
    config.grpo.reward_weights = ()
    config.optim.update(dict(lr=LR, warmup_steps=0, schedule="linear"))
    config.train.update(dict(steps=steps, eval=False, eval_every=0, eval_metrics="", seed=0))
    config.task.test_file, config.checkpoint.every = "", 0
    config.logging.progress = False
    loop.train(config)
    lines = [json.loads(x) for x in (pathlib.Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
  lines = [m for m in lines if "train/time/generation_s" in m]
  return {
    "step": [m["train/time/generation_s"] + m["train/time/train_s"] for m in lines],
    "generate": [m["train/time/generation_s"] for m in lines],
    "tokens": [m["train/completions/mean_length"] * PROMPTS * G for m in lines],
  }


def _summary(times: dict) -> dict:
  skip = 1 if len(times["step"]) > 1 else 0  # the first step compiles (jaxtune) / warms up (torch)
  step = sum(times["step"][skip:]) / len(times["step"][skip:])
  gen = sum(times["generate"][skip:])
  return {
    "step_s": step,
    "generate_s": gen / len(times["generate"][skip:]),
    "tokens_per_s": sum(times["tokens"][skip:]) / gen,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser("python -m bench.grpo_cpu", description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--worker", choices=("trl", "jaxtune"))
  args = parser.parse_args(argv)
  if args.worker:
    times = (trl_side if args.worker == "trl" else jaxtune_side)(args.steps)
    print("RESULT " + json.dumps(times))
    return times
  rows = {}
  for side in ("jaxtune", "trl"):
    out = subprocess.run(
      [sys.executable, "-m", "bench.grpo_cpu", "--worker", side, "--steps", str(args.steps)],
      capture_output=True,
      text=True,
    )
    if out.returncode:
      raise SystemExit(f"{side} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    rows[side] = _summary(json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0]))
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
  print(f"CPU: {cpu}; {PROMPTS} prompts x {G} completions of <= {NEW} tokens, SmolLM2-135M float32, LoRA r16")
  for side, r in rows.items():
    print(f"{side:8s} step {r['step_s']:.2f} s, generation {r['generate_s']:.2f} s, {r['tokens_per_s']:.1f} tokens/s")
  ratios = {
    "rollout_tokens_per_s": rows["jaxtune"]["tokens_per_s"] / rows["trl"]["tokens_per_s"],
    "step_time": rows["trl"]["step_s"] / rows["jaxtune"]["step_s"],
  }
  print(
    f"jaxtune / TRL rollout tokens/s: {ratios['rollout_tokens_per_s']:.2f}; "
    f"TRL step time / jaxtune step time: {ratios['step_time']:.2f}"
  )
  return {"rows": rows, "ratios": ratios}


if __name__ == "__main__":
  main()
