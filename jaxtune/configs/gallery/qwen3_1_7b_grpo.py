"""Qwen3 1.7B (qwen3), GRPO with LoRA r=16: TL;DR summaries rewarded by ROUGE-L against the reference.

    jaxtune train --config configs/gallery/qwen3_1_7b_grpo.py

Each step samples 8 completions for each of 8 prompts on the training weights; docs/rl.md has the
losses (dapo by default) and the rewards.
Memory per device: `jaxtune dry-run --config configs/gallery/qwen3_1_7b_grpo.py --num_devices 8`.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/qwen3_1_7b_grpo"
  config.model.path = "Qwen/Qwen3-1.7B"

  config.objective = "grpo"
  config.grpo.num_generations = 8
  config.grpo.max_completion_length = 128
  config.grpo.reward_funcs = ("rougeL",)  # against the record's completion, the reference summary
  config.data.train = ("trl-lib/tldr:train",)
  config.data.max_seq_len = 768  # a prompt and grpo.max_completion_length new tokens
  config.data.batch_size = 64  # completions: 8 prompts x 8
  config.data.num_epochs = 0

  config.peft.lora.rank = 16
  config.peft.lora.alpha = 32.0
  config.optim.lr = 1e-5
  config.optim.warmup_steps = 10
  config.train.steps = 500
  config.train.grad_accum = 4
  config.checkpoint.every = 50
  return config
