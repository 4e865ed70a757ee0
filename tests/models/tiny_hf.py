"""Tiny randomly initialised Hugging Face models, one per supported family (built with transformers/torch)."""

from __future__ import annotations

import pathlib

from tiny_configs import COMMON, FAMILIES


def hf_config(family: str, **overrides):
  import transformers

  kwargs = {**COMMON, **FAMILIES[family], **overrides}
  model_type = kwargs.pop("model_type")
  return transformers.AutoConfig.for_model(model_type, **kwargs)


def build(family: str, directory: pathlib.Path, seed: int = 0, dtype=None, **overrides):
  """Saves a random tiny model of `family` (config fields `overrides` changed) to `directory`; returns the
  torch model (eval mode, float32)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="eager")
  with torch.no_grad():  # norms start at exactly 1 (or 0 for Gemma); perturb them so the test sees them
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(directory) if dtype is None else model.to(dtype).save_pretrained(directory)
  return model.float()
