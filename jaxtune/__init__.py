"""jaxtune: fine-tune open LLMs with JAX.

Public API: `load_model`, `load_tokenizer`, `generate`.
"""

from jaxtune.generate import generate
from jaxtune.hf.load import load_model, load_tokenizer

__all__ = ["generate", "load_model", "load_tokenizer"]
