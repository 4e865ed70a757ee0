"""Parameter-efficient fine-tuning: adapters applied as transforms of the model's parameter tree."""

from jaxtune.peft.lora import LoRA, LoRADropoutKey, LoRAParam, apply_lora, lora_weights, merge_lora

__all__ = ["LoRA", "LoRADropoutKey", "LoRAParam", "apply_lora", "lora_weights", "merge_lora"]
