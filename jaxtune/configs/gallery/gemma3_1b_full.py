"""Gemma 3 1B IT (gemma3_text), full fine-tuning (float32 masters, bfloat16 compute), on UltraChat.

    jaxtune train --config configs/gallery/gemma3_1b_full.py

Full fine-tuning keeps float32 parameters and Adam state for every weight: several devices
(`--config.mesh.preset=fsdp`, the default) share them; checkpoints hold every weight.
Memory per device: `jaxtune dry-run --config configs/gallery/gemma3_1b_full.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.full("google/gemma-3-1b-it", "gemma3_1b_full")
