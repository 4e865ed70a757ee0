"""Llama 3.2 1B Instruct (llama), prompt tuning: 20 learned virtual-token embeddings before every example, on UltraChat.

    jaxtune train --config configs/gallery/llama3_2_1b_prompt.py

Only the virtual tokens' embeddings train; the export is a PEFT prompt-tuning adapter.
Memory per device: `jaxtune dry-run --config configs/gallery/llama3_2_1b_prompt.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.prompt("meta-llama/Llama-3.2-1B-Instruct", "llama3_2_1b_prompt")
