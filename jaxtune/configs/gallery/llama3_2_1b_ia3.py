"""Llama 3.2 1B Instruct (llama), IA3: a learned scale per key, value and down projection (PEFT's modules), on UltraChat.

    jaxtune train --config configs/gallery/llama3_2_1b_ia3.py

IA3 trains a few hundred thousand scales: a learning rate far above LoRA's suits it.
Memory per device: `jaxtune dry-run --config configs/gallery/llama3_2_1b_ia3.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.ia3("meta-llama/Llama-3.2-1B-Instruct", "llama3_2_1b_ia3")
