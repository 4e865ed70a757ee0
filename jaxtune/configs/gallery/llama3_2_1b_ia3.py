"""Llama 3.2 1B Instruct (llama), IA3: a learned scale per key, value and down projection (PEFT's modules), on UltraChat.

    jaxtune train --config configs/gallery/llama3_2_1b_ia3.py

IA3 trains a few hundred thousand scales: a learning rate far above LoRA's suits it.
Memory per device: `jaxtune dry-run --config configs/gallery/llama3_2_1b_ia3.py --num_devices 8`.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/llama3_2_1b_ia3"
  config.model.path = "meta-llama/Llama-3.2-1B-Instruct"

  config.data.train = ("HuggingFaceH4/ultrachat_200k:train_sft",)
  config.data.validation = ("HuggingFaceH4/ultrachat_200k:test_sft",)
  config.data.max_seq_len = 2048
  config.data.batch_size = 32
  config.data.num_epochs = 0

  config.peft.method = "ia3"
  config.optim.lr = 3e-3
  config.optim.warmup_ratio = 0.03
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200
  return config
