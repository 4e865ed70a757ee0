"""Gemma 2 2B IT (gemma2), prompt tuning: 20 learned virtual-token embeddings before every example, on UltraChat.

    jaxtune train --config configs/gallery/gemma2_2b_prompt.py

Only the virtual tokens' embeddings train; the export is a PEFT prompt-tuning adapter.
Memory per device: `jaxtune dry-run --config configs/gallery/gemma2_2b_prompt.py --num_devices 8`.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/gemma2_2b_prompt"
  config.model.path = "google/gemma-2-2b-it"

  config.data.train = ("HuggingFaceH4/ultrachat_200k:train_sft",)
  config.data.validation = ("HuggingFaceH4/ultrachat_200k:test_sft",)
  config.data.max_seq_len = 2048
  config.data.batch_size = 32
  config.data.num_epochs = 0

  config.peft.method = "prompt"
  config.peft.prompt.num_virtual_tokens = 20
  config.optim.lr = 3e-2
  config.optim.warmup_ratio = 0.03
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200
  return config
