"""Qwen2.5 7B Instruct (qwen2), DoRA: LoRA r=16 with a trained magnitude per output row, on every linear layer, on UltraChat.

    jaxtune train --config configs/gallery/qwen2_5_7b_dora.py

Exported with `jaxtune export --format adapter`, it loads in PEFT as `use_dora=True` (docs/guide.md, Export).
Memory per device: `jaxtune dry-run --config configs/gallery/qwen2_5_7b_dora.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.dora("Qwen/Qwen2.5-7B-Instruct", "qwen2_5_7b_dora")
