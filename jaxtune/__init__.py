"""jaxtune: fine-tune open LLMs with JAX.

Public API: `load_model`, `load_tokenizer`, `generate`. They are imported on first
use, so light entry points (the data CLI, tokenizer worker processes) do not pay
for importing jax and flax.
"""

import importlib

_API = {"generate": "jaxtune.generation", "load_model": "jaxtune.hf.load", "load_tokenizer": "jaxtune.hf.load"}
__all__ = list(_API)


def __getattr__(name: str):
  if name in _API:
    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")
