"""Gemma 3 1B IT (gemma3_text), DoRA: LoRA r=16 with a trained magnitude per output row, on every linear layer, on UltraChat.

    jaxtune train --config configs/gallery/gemma3_1b_dora.py

Exported with `jaxtune export --format adapter`, it loads in PEFT as `use_dora=True` (docs/guide.md, Export).
Memory per device: `jaxtune dry-run --config configs/gallery/gemma3_1b_dora.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.dora("google/gemma-3-1b-it", "gemma3_1b_dora")
