"""Gemma 2 2B IT (gemma2), prompt tuning: 20 learned virtual-token embeddings before every example, on UltraChat.

    jaxtune train --config configs/gallery/gemma2_2b_prompt.py

Only the virtual tokens' embeddings train; the export is a PEFT prompt-tuning adapter.
Memory per device: `jaxtune dry-run --config configs/gallery/gemma2_2b_prompt.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.prompt("google/gemma-2-2b-it", "gemma2_2b_prompt")
