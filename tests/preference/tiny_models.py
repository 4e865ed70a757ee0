"""Tiny Llama and Qwen2 checkpoints and toy preference records for the TRL reference runs (trl_reference.py).

The configs are tests/tiny_configs.py's llama and qwen2 families (llama3 rope scaling, head_dim 24 != hidden/heads,
untied lm_head; qwen2 with q/k/v biases and tied embeddings), shrunk to 2 layers and hidden 32 so a TRL step takes
milliseconds. Special ids come from tiny_configs.COMMON: pad 0, bos 1, eos 2; the records use ids 3..127 for text.

The weights are drawn with `init_std` (default 0.3) instead of the configs' initializer_range (0.02): at 0.02 every
next-token distribution is nearly uniform, the log-probs of chosen and rejected completions hardly differ and plain
SGD moves the preference losses by less than float32 noise, so the first steps would prove nothing. At 0.3 the
sequence log-probs differ by several nats and the losses move by 1e-3..1e-1 per step at lr 1e-3..1e-1.
"""

from __future__ import annotations

import pathlib

from tiny_configs import COMMON, FAMILIES

# The preference runs' overrides of tiny_configs (smaller than COMMON; everything else as the family has it).
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
PAD, BOS, EOS = COMMON["pad_token_id"], COMMON["bos_token_id"], COMMON["eos_token_id"]


def config(family: str):
  """The transformers config of the tiny `family` ("llama" or "qwen2"); no dropout anywhere."""
  import transformers

  kwargs = {**COMMON, **FAMILIES[family], **SMALL, "attention_dropout": 0.0}
  model_type = kwargs.pop("model_type")
  return transformers.AutoConfig.for_model(model_type, **kwargs)


def build(family: str, directory: str | pathlib.Path, seed: int = 0, init_std: float = 0.3) -> pathlib.Path:
  """Saves a random tiny *ForCausalLM of `family` (float32, safetensors) to `directory`; returns the directory.

  Every matrix and bias is drawn N(0, init_std) (biases 0.1 * that), norm weights 1 + N(0, 0.1): deterministic for a
  seed on any machine that runs torch's CPU generator.
  """
  import torch
  import transformers

  directory = pathlib.Path(directory)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config(family), attn_implementation="eager")
  with torch.no_grad():
    for name, p in model.named_parameters():  # tied weights appear once
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * init_std * torch.randn_like(p))
      else:
        p.copy_(init_std * torch.randn_like(p))
  model.float().eval().save_pretrained(directory)
  return directory


# Four pairs with different prompt and completion lengths (prompts start with BOS, completions end with EOS: the
# records carry every token the model sees; the reference adds nothing). Pair 2 has a one-token completion (EOS
# alone), pair 3 a one-token prompt (BOS alone).
PAIRS = [
  {"prompt_ids": [BOS, 17, 42, 99, 5], "chosen_ids": [23, 64, 8, EOS], "rejected_ids": [77, 31, EOS]},
  {"prompt_ids": [BOS, 120, 3], "chosen_ids": [11, 12, 13, 14, 15, 16, EOS], "rejected_ids": [50, 51, 52, EOS]},
  {"prompt_ids": [BOS, 9, 9, 70, 71, 72, 73], "chosen_ids": [EOS], "rejected_ids": [101, 44, EOS]},
  {"prompt_ids": [BOS], "chosen_ids": [88, 27, 61, 95, 4, EOS], "rejected_ids": [88, 27, 60, EOS]},
]

# The reward trainer's margins for PAIRS (optional column: `margin` is subtracted inside the logsigmoid).
MARGINS = [0.5, 0.0, 1.0, -0.25]

# Unpaired (KTO) records: three desirable, one undesirable, so a per-class mean and a mean over the batch differ.
KTO = [
  {"prompt_ids": [BOS, 17, 42, 99, 5], "completion_ids": [23, 64, 8, EOS], "label": True},
  {"prompt_ids": [BOS, 120, 3], "completion_ids": [50, 51, 52, EOS], "label": False},
  {"prompt_ids": [BOS, 9, 9, 70, 71, 72, 73], "completion_ids": [EOS], "label": True},
  {"prompt_ids": [BOS], "completion_ids": [88, 27, 61, 95, 4, EOS], "label": True},
]


def pairs(margins: bool = False) -> list[dict]:
  """Fresh copies of PAIRS, with MARGINS under "margin" if asked."""
  out = [{k: list(v) for k, v in r.items()} for r in PAIRS]
  if margins:
    for r, m in zip(out, MARGINS, strict=True):
      r["margin"] = m
  return out


def kto_records() -> list[dict]:
  """Fresh copies of KTO."""
  return [{k: (list(v) if isinstance(v, list) else v) for k, v in r.items()} for r in KTO]
