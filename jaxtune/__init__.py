"""jaxtune: fine-tune open LLMs with JAX."""
