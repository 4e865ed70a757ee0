"""Gemma 3 1B IT (gemma3_text), full fine-tuning (float32 masters, bfloat16 compute), on UltraChat.

    jaxtune train --config configs/gallery/gemma3_1b_full.py

Full fine-tuning keeps float32 parameters and Adam state for every weight: several devices
(`--config.mesh.preset=fsdp`, the default) share them; checkpoints hold every weight.
Memory per device: `jaxtune dry-run --config configs/gallery/gemma3_1b_full.py --num_devices 8`.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/gemma3_1b_full"
  config.model.path = "google/gemma-3-1b-it"

  config.data.train = ("HuggingFaceH4/ultrachat_200k:train_sft",)
  config.data.validation = ("HuggingFaceH4/ultrachat_200k:test_sft",)
  config.data.max_seq_len = 2048
  config.data.batch_size = 32
  config.data.num_epochs = 0

  config.peft.method = "full"
  config.model.remat = "full"
  config.optim.lr = 1e-5
  config.optim.warmup_ratio = 0.03
  config.optim.weight_decay = 0.01
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200
  return config
