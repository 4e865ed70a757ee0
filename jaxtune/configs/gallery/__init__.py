"""The gallery: one config per sensible (model family x method); `--config gallery/NAME` runs one by name.

Each gallery file names a model and calls its method's recipe below, so a recipe (data, lengths, rank,
learning rate, steps) is written once for every family it serves. Copy a file and its recipe into a config
of your own to change either.
"""

import ml_collections

from jaxtune.train.config import default_config


def _base(path: str, name: str) -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = f"runs/{name}"
  config.model.path = path
  return config


def _schedule(config: ml_collections.ConfigDict) -> None:
  """2,000 steps after a 3% warmup, evaluated (20 batches) and saved every 200."""
  config.optim.warmup_ratio = 0.03
  config.train.steps = 2000
  config.train.eval_every = 200
  config.train.eval_batches = 20
  config.checkpoint.every = 200


def _sft(path: str, name: str, lr: float) -> ml_collections.ConfigDict:
  """Supervised fine-tuning on UltraChat: 2,000 steps of 32 rows of 2,048 tokens, evaluated every 200."""
  config = _base(path, name)
  config.data.train = ("HuggingFaceH4/ultrachat_200k:train_sft",)
  config.data.validation = ("HuggingFaceH4/ultrachat_200k:test_sft",)
  config.data.max_seq_len = 2048
  config.data.batch_size = 32
  config.data.num_epochs = 0
  config.optim.lr = lr
  _schedule(config)
  return config


def lora(path: str, name: str) -> ml_collections.ConfigDict:
  """LoRA r=16 on every linear layer, for the model at `path` (an HF hub id or directory), run into runs/NAME."""
  config = _sft(path, name, lr=2e-4)
  config.peft.lora.rank = 16
  config.peft.lora.alpha = 32.0
  config.peft.lora.dropout = 0.05
  return config


def qlora(path: str, name: str) -> ml_collections.ConfigDict:
  """`lora` over an NF4 base with double quantisation."""
  config = lora(path, name)
  config.model.quantize = "nf4"
  config.model.double_quant = True
  return config


def dora(path: str, name: str) -> ml_collections.ConfigDict:
  """`lora` with DoRA's magnitude per output row."""
  config = lora(path, name)
  config.peft.lora.use_dora = True
  return config


def ia3(path: str, name: str) -> ml_collections.ConfigDict:
  """IA3 on PEFT's default modules for the family."""
  config = _sft(path, name, lr=3e-3)
  config.peft.method = "ia3"
  return config


def prompt(path: str, name: str) -> ml_collections.ConfigDict:
  """Prompt tuning, 20 virtual tokens."""
  config = _sft(path, name, lr=3e-2)
  config.peft.method = "prompt"
  config.peft.prompt.num_virtual_tokens = 20
  return config


def prefix(path: str, name: str) -> ml_collections.ConfigDict:
  """Prefix tuning, 20 virtual tokens per layer through PEFT's projection MLP."""
  config = _sft(path, name, lr=1e-2)
  config.peft.method = "prefix"
  config.peft.prefix.num_virtual_tokens = 20
  config.peft.prefix.projection = True
  return config


def full(path: str, name: str) -> ml_collections.ConfigDict:
  """Full fine-tuning, every layer recomputed in the backward."""
  config = _sft(path, name, lr=1e-5)
  config.peft.method = "full"
  config.model.remat = "full"
  config.optim.weight_decay = 0.01
  return config


def dpo(path: str, name: str) -> ml_collections.ConfigDict:
  """DPO (beta 0.1) with LoRA r=16 on UltraFeedback pairs."""
  config = _base(path, name)
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
  _schedule(config)
  return config


def grpo(path: str, name: str) -> ml_collections.ConfigDict:
  """GRPO with LoRA r=16: TL;DR summaries rewarded by ROUGE-L against the reference."""
  config = _base(path, name)
  config.objective = "grpo"
  config.grpo.num_generations = 8
  config.grpo.max_completion_length = 128
  config.grpo.reward_funcs = ("rougeL",)  # against the record's completion, the reference summary
  config.data.train = ("trl-lib/tldr:train",)
  config.data.max_seq_len = 768  # a prompt and grpo.max_completion_length new tokens
  config.data.batch_size = 64  # completions: 8 prompts x 8
  config.data.num_epochs = 0

  config.peft.lora.rank = 16
  config.peft.lora.alpha = 32.0
  config.optim.lr = 1e-5
  config.optim.warmup_steps = 10
  config.train.steps = 500
  config.train.grad_accum = 4
  config.checkpoint.every = 50
  return config
