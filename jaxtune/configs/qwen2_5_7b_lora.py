"""Qwen2.5 7B Instruct, LoRA r=32 (rsLoRA) on every linear layer, on UltraChat; one TPU v5e-8 / v4-8 or one 80 GB GPU.

    python -m jaxtune.train --config configs/qwen2_5_7b_lora.py \
        --config.output_dir=runs/qwen2_5_7b_lora

Any chat JSONL works instead: --config.data.train=my_chats.jsonl. The base is frozen in bfloat16
(15 GB); adapters and their Adam state stay float32.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/qwen2_5_7b_lora"
  config.model.path = "Qwen/Qwen2.5-7B-Instruct"
  config.model.remat = "dots_no_batch"

  config.data.train = ("HuggingFaceH4/ultrachat_200k:train_sft",)
  config.data.validation = ("HuggingFaceH4/ultrachat_200k:test_sft",)
  config.data.max_seq_len = 4096
  config.data.batch_size = 32
  config.data.num_epochs = 0

  config.peft.lora.rank = 32
  config.peft.lora.alpha = 32.0
  config.peft.lora.use_rslora = True
  config.optim.lr = 1e-4
  config.optim.warmup_ratio = 0.03
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200
  config.checkpoint.keep_best = True
  return config
