"""Parameter-efficient fine-tuning: adapters applied as transforms of the model's parameter tree."""

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
  "LoRA",
  "LoRADropoutKey",
  "LoRAParam",
  "apply_lora",
  "lora_weights",
  "merge_and_unload",
  "merge_lora",
  "peft_config",
  "peft_state_dict",
]
