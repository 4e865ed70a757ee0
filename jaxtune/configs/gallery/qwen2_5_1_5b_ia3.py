"""Qwen2.5 1.5B Instruct (qwen2), IA3: a learned scale per key, value and down projection (PEFT's modules), on UltraChat.

    jaxtune train --config configs/gallery/qwen2_5_1_5b_ia3.py

IA3 trains a few hundred thousand scales: a learning rate far above LoRA's suits it.
Memory per device: `jaxtune dry-run --config configs/gallery/qwen2_5_1_5b_ia3.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.ia3("Qwen/Qwen2.5-1.5B-Instruct", "qwen2_5_1_5b_ia3")
