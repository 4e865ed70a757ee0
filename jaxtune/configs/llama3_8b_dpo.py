"""Llama 3.1 8B Instruct, DPO with LoRA r=16 on every linear layer, on UltraFeedback pairs; one TPU v5e-8 / v4-8
or one 80 GB GPU.

    python -m jaxtune.train --config configs/llama3_8b_dpo.py --config.output_dir=runs/llama3_8b_dpo

trl-lib/ultrafeedback_binarized holds TRL's conversational prompt / chosen / rejected records. The reference
is the base with the adapters off (no second copy of the 16 GB of weights); with 2,000 steps of 32 pairs the
run sees 64k of its 62k pairs, so `reference=auto` precomputes the reference log-probs once instead (one
forward pass over the data, cached with the tokenised pairs). Memory: `jaxtune dry-run --config
llama3_8b_dpo --num_devices 8`.
"""

import ml_collections

from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/llama3_8b_dpo"
  config.model.path = "meta-llama/Llama-3.1-8B-Instruct"
  config.model.remat = "dots_no_batch"
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
  config.optim.warmup_ratio = 0.1
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200
  return config
