"""Tiny randomly initialised Hugging Face models, one per supported family (built with transformers/torch)."""

from __future__ import annotations

import pathlib

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> config overrides: each one exercises the family's distinctive features.
FAMILIES = {
    # Llama 3.1/3.2: llama3 rope scaling and head_dim != hidden/heads.
    "llama": dict(model_type="llama", head_dim=24, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral": dict(model_type="mistral", sliding_window=8, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                     rope_theta=1000000.0)),
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True),
    "gemma": dict(model_type="gemma", head_dim=16, num_key_value_heads=1),
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
}
SLIDING = {"mistral", "gemma2", "gemma3_text"}


def hf_config(family: str):
  import transformers

  kwargs = {**COMMON, **FAMILIES[family]}
  model_type = kwargs.pop("model_type")
  return transformers.AutoConfig.for_model(model_type, **kwargs)


def build(family: str, directory: pathlib.Path, seed: int = 0, dtype=None):
  """Saves a random tiny model of `family` to `directory`; returns the torch model (eval mode, float32)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
  with torch.no_grad():  # norms start at exactly 1 (or 0 for Gemma); perturb them so the test sees them
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(directory) if dtype is None else model.to(dtype).save_pretrained(directory)
  return model.float()
