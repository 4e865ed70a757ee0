"""Parameter-efficient fine-tuning: adapters applied as transforms of the model's parameter tree."""

from jaxtune.peft.import_adapter import AdapterError, load_adapter
from jaxtune.peft.lora import (
  LoRA,
  LoRADropoutKey,
  LoRAParam,
  apply_lora,
  lora_weights,
  merge_and_unload,
  merge_lora,
  peft_config,
  peft_state_dict,
)

__all__ = [
  "AdapterError",
  "LoRA",
  "LoRADropoutKey",
  "LoRAParam",
  "apply_lora",
  "load_adapter",
  "lora_weights",
  "merge_and_unload",
  "merge_lora",
  "peft_config",
  "peft_state_dict",
]
