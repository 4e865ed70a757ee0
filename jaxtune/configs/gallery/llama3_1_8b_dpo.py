"""Llama 3.1 8B Instruct (llama), DPO with LoRA r=16 on every linear layer, on UltraFeedback pairs.

    jaxtune train --config configs/gallery/llama3_1_8b_dpo.py

The reference is the same weights with the adapters off, or log-probs precomputed once
(`reference=auto`); docs/preference.md has the other objectives (orpo, simpo, kto, reward).
Memory per device: `jaxtune dry-run --config configs/gallery/llama3_1_8b_dpo.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.dpo("meta-llama/Llama-3.1-8B-Instruct", "llama3_1_8b_dpo")
