"""Gemma 3 1B IT (gemma3_text), LoRA r=16 on every linear layer, on UltraChat.

    jaxtune train --config configs/gallery/gemma3_1b_lora.py

Any chat JSONL works instead: --config.data.train=my_chats.jsonl.
Memory per device: `jaxtune dry-run --config configs/gallery/gemma3_1b_lora.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.lora("google/gemma-3-1b-it", "gemma3_1b_lora")
