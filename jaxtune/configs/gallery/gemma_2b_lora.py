"""Gemma 2B IT (gemma), LoRA r=16 on every linear layer, on UltraChat.

    jaxtune train --config configs/gallery/gemma_2b_lora.py

Any chat JSONL works instead: --config.data.train=my_chats.jsonl.
Memory per device: `jaxtune dry-run --config configs/gallery/gemma_2b_lora.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.lora("google/gemma-2b-it", "gemma_2b_lora")
