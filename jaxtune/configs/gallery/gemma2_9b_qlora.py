"""Gemma 2 9B IT (gemma2), QLoRA: LoRA r=16 on every linear layer over an NF4 base (double-quantised), on UltraChat.

    jaxtune train --config configs/gallery/gemma2_9b_qlora.py

The frozen decoder weights are stored as bitsandbytes' NF4 (their absmax values in 8 bits); adapters and
their Adam state stay float32. docs/quantization.md: the dry run's figures and the export to PEFT.
Memory per device: `jaxtune dry-run --config configs/gallery/gemma2_9b_qlora.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.qlora("google/gemma-2-9b-it", "gemma2_9b_qlora")
