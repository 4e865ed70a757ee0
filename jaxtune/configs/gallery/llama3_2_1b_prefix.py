"""Llama 3.2 1B Instruct (llama), prefix tuning: 20 learned key/value positions in every layer (PEFT's projection MLP), on UltraChat.

    jaxtune train --config configs/gallery/llama3_2_1b_prefix.py

Only the prefix (and its projection MLP) trains; the export is a PEFT prefix-tuning adapter.
Memory per device: `jaxtune dry-run --config configs/gallery/llama3_2_1b_prefix.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.prefix("meta-llama/Llama-3.2-1B-Instruct", "llama3_2_1b_prefix")
