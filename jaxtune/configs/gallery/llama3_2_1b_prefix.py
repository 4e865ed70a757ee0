"""Llama 3.2 1B Instruct (llama), prefix tuning: 20 learned key/value positions in every layer (PEFT's projection MLP), on UltraChat.

    jaxtune train --config configs/gallery/llama3_2_1b_prefix.py

Only the prefix (and its projection MLP) trains; the export is a PEFT prefix-tuning adapter.
Memory per device: `jaxtune dry-run --config configs/gallery/llama3_2_1b_prefix.py --num_devices 8`.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/llama3_2_1b_prefix"
  config.model.path = "meta-llama/Llama-3.2-1B-Instruct"

  config.data.train = ("HuggingFaceH4/ultrachat_200k:train_sft",)
  config.data.validation = ("HuggingFaceH4/ultrachat_200k:test_sft",)
  config.data.max_seq_len = 2048
  config.data.batch_size = 32
  config.data.num_epochs = 0

  config.peft.method = "prefix"
  config.peft.prefix.num_virtual_tokens = 20
  config.peft.prefix.projection = True
  config.optim.lr = 1e-2
  config.optim.warmup_ratio = 0.03
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200
  return config
