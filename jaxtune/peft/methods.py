"""One entry point from a run's `peft` config to the model's adapters, for every method but full fine-tuning."""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxtune.models.transformer import CausalLM
from jaxtune.peft import ia3 as ia3_lib
from jaxtune.peft import virtual as virtual_lib
from jaxtune.peft.lora import apply_lora


def apply(model: CausalLM, peft: Any, *, rngs: nnx.Rngs, tokenizer: Any = None) -> CausalLM:
  """Applies `peft.method`'s adapters as `peft` (the run's config section, or its saved dict) sets them; in place.

  tokenizer: for prompt tuning's text init (without one, e.g. when only the shapes matter, the init is random).
  """
  method = peft["method"]
  if method == "lora":
    lora = peft["lora"]
    return apply_lora(
      model,
      rank=lora["rank"],
      alpha=lora["alpha"],
      dropout=lora.get("dropout", 0.0),
      use_rslora=lora.get("use_rslora", False),
      use_dora=lora.get("use_dora", False),
      targets=lora.get("targets", "all-linear"),
      rngs=rngs,
    )
  if method == "ia3":
    ia3 = peft["ia3"]
    return ia3_lib.apply_ia3(
      model, targets=ia3.get("targets", "default"), feedforward=ia3.get("feedforward", "default")
    )
  if method == "prompt":
    prompt = peft["prompt"]
    count = prompt["num_virtual_tokens"]
    init_ids = None
    if prompt.get("init", "random") == "text" and tokenizer is not None:
      init_ids = virtual_lib.init_text_ids(tokenizer, prompt["init_text"], count)
    return virtual_lib.apply_prompt_tuning(model, num_virtual_tokens=count, init_ids=init_ids, rngs=rngs)
  if method == "prefix":
    prefix = peft["prefix"]
    return virtual_lib.apply_prefix_tuning(
      model,
      num_virtual_tokens=prefix["num_virtual_tokens"],
      projection=prefix.get("projection", False),
      hidden=prefix.get("projection_hidden", 0),
      rngs=rngs,
    )
  return model  # full: no adapters
