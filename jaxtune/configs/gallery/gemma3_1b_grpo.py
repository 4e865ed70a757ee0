"""Gemma 3 1B IT (gemma3_text), GRPO with LoRA r=16: TL;DR summaries rewarded by ROUGE-L against the reference.

    jaxtune train --config configs/gallery/gemma3_1b_grpo.py

Each step samples 8 completions for each of 8 prompts on the training weights; docs/rl.md has the
losses (dapo by default) and the rewards.
Memory per device: `jaxtune dry-run --config configs/gallery/gemma3_1b_grpo.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.grpo("google/gemma-3-1b-it", "gemma3_1b_grpo")
