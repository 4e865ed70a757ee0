"""Gemma 2B IT (gemma), LoRA r=16 on every linear layer, on UltraChat.

    jaxtune train --config configs/gallery/gemma_2b_lora.py

Any chat JSONL works instead: --config.data.train=my_chats.jsonl.
Memory per device: `jaxtune dry-run --config configs/gallery/gemma_2b_lora.py --num_devices 8`.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/gemma_2b_lora"
  config.model.path = "google/gemma-2b-it"

  config.data.train = ("HuggingFaceH4/ultrachat_200k:train_sft",)
  config.data.validation = ("HuggingFaceH4/ultrachat_200k:test_sft",)
  config.data.max_seq_len = 2048
  config.data.batch_size = 32
  config.data.num_epochs = 0

  config.peft.lora.rank = 16
  config.peft.lora.alpha = 32.0
  config.peft.lora.dropout = 0.05
  config.optim.lr = 2e-4
  config.optim.warmup_ratio = 0.03
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200
  return config
