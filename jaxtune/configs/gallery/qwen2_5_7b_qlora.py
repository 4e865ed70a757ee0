"""Qwen2.5 7B Instruct (qwen2), QLoRA: LoRA r=16 on every linear layer over an NF4 base (double-quantised), on UltraChat.

    jaxtune train --config configs/gallery/qwen2_5_7b_qlora.py

The frozen decoder weights are stored as bitsandbytes' NF4 (their absmax values in 8 bits); adapters and
their Adam state stay float32. docs/quantization.md: the dry run's figures and the export to PEFT.
Memory per device: `jaxtune dry-run --config configs/gallery/qwen2_5_7b_qlora.py --num_devices 8`.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/qwen2_5_7b_qlora"
  config.model.path = "Qwen/Qwen2.5-7B-Instruct"
  config.model.quantize = "nf4"
  config.model.double_quant = True

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
