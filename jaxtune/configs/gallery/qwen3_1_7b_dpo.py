"""Qwen3 1.7B (qwen3), DPO with LoRA r=16 on every linear layer, on UltraFeedback pairs.

    jaxtune train --config configs/gallery/qwen3_1_7b_dpo.py

The reference is the same weights with the adapters off, or log-probs precomputed once
(`reference=auto`); docs/preference.md has the other objectives (orpo, simpo, kto, reward).
Memory per device: `jaxtune dry-run --config configs/gallery/qwen3_1_7b_dpo.py --num_devices 8`.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/qwen3_1_7b_dpo"
  config.model.path = "Qwen/Qwen3-1.7B"

  config.objective = "dpo"
  config.dpo.beta = 0.1
  config.data.train = ("trl-lib/ultrafeedback_binarized:train",)
  config.data.validation = ("trl-lib/ultrafeedback_binarized:test",)
  config.data.max_prompt_length = 512
  config.data.max_completion_length = 1024
  config.data.max_seq_len = 3072  # a pair: both sequences in one row
  config.data.batch_size = 32
  config.data.num_epochs = 0

  config.peft.lora.rank = 16
  config.peft.lora.alpha = 32.0
  config.optim.lr = 5e-6
  config.optim.warmup_ratio = 0.03
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200
  return config
