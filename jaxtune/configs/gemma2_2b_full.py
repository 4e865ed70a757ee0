"""Gemma 2 2B IT, full fine-tuning (float32 masters, bfloat16 compute), on UltraChat; one TPU v5e-8 / v4-8.

    python -m jaxtune.train --config configs/gemma2_2b_full.py \
        --config.output_dir=runs/gemma2_2b_full

Full fine-tuning keeps float32 parameters and Adam state for all 2.6B weights (~42 GB before
activations), so it wants several chips or one 80 GB GPU; checkpoints hold every weight.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/gemma2_2b_full"
  config.model.path = "google/gemma-2-2b-it"
  config.model.remat = "full"

  config.data.train = ("HuggingFaceH4/ultrachat_200k:train_sft",)
  config.data.validation = ("HuggingFaceH4/ultrachat_200k:test_sft",)
  config.data.max_seq_len = 2048
  config.data.batch_size = 32
  config.data.num_epochs = 0

  config.peft.method = "full"
  config.optim.lr = 1e-5
  config.optim.warmup_ratio = 0.03
  config.optim.weight_decay = 0.01
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200
  config.checkpoint.keep = 2
  return config
