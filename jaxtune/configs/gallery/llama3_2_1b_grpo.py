"""Llama 3.2 1B Instruct (llama), GRPO with LoRA r=16: TL;DR summaries rewarded by ROUGE-L against the reference.

    jaxtune train --config configs/gallery/llama3_2_1b_grpo.py

Each step samples 8 completions for each of 8 prompts on the training weights; docs/rl.md has the
losses (dapo by default) and the rewards.
Memory per device: `jaxtune dry-run --config configs/gallery/llama3_2_1b_grpo.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.grpo("meta-llama/Llama-3.2-1B-Instruct", "llama3_2_1b_grpo")
