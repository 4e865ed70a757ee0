"""GRPO quickstart: SmolLM2-135M-Instruct learns the meeting-to-JSON task from rewards alone (no SFT), on a CPU.

    python -m jaxtune.train --config configs/grpo_quickstart.py

Each step samples 8 completions for each of 4 training prompts (the system prompt names the keys),
rewards them for an object shape, valid JSON, each right field and the time's hour and minutes, and
takes a DAPO step on a LoRA adapter; the sampler runs on the training weights. Greedy exact match on 50 held-out
sentences is scored before and after, and every 10 steps (eval/json). docs/rl.md has the curve
this run reaches and the machine it ran on.
"""

import ml_collections

from jaxtune.tasks import meeting_json
from jaxtune.train.config import default_config

DATA = meeting_json.DATA


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/grpo_quickstart"
  config.model.path = "smollm2-gguf"
  config.objective = "grpo"
  config.grpo.num_generations = 8
  config.grpo.max_completion_length = 32  # an answer is ~22 tokens
  config.grpo.temperature = 0.9
  # Partial credit: an object, valid JSON, each field right, and the time's hour and minutes when it is written
  # as HH:MM (meeting_json.time_reward, which also rewards keeping the time: a missing field scores in
  # json_fields what a wrong one does, and a run can otherwise settle on answers without it).
  config.grpo.reward_funcs = (
    "format:\\s*\\{.*\\}\\s*",
    "json_valid",
    "json_fields",
    "jaxtune.tasks.meeting_json:time_reward",
  )
  config.grpo.reward_weights = (0.5, 0.5, 2.0, 1.0)

  config.data.train = (str(DATA / "train.jsonl"),)
  config.data.max_seq_len = 104  # prompts of <= 66 tokens (padded to 72), 32 new
  config.data.batch_size = 32  # completions: 4 prompts x 8
  config.data.num_epochs = 0

  config.peft.lora.rank = 16
  config.peft.lora.alpha = 32.0
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 3
  config.train.steps = 80
  config.train.grad_accum = 4
  config.train.log_every = 1
  config.train.eval_every = 10
  config.train.eval_metrics = "json,json_fields"
  config.checkpoint.every = 10
  config.checkpoint.keep = 2

  config.task.test_file = str(DATA / "test.jsonl")
  config.task.scorer = "json"
  config.task.num_examples = 50
  config.task.max_new_tokens = 32
  return config
