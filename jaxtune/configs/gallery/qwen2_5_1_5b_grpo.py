"""Qwen2.5 1.5B Instruct (qwen2), GRPO with LoRA r=16: TL;DR summaries rewarded by ROUGE-L against the reference.

    jaxtune train --config configs/gallery/qwen2_5_1_5b_grpo.py

Each step samples 8 completions for each of 8 prompts on the training weights; docs/rl.md has the
losses (dapo by default) and the rewards.
Memory per device: `jaxtune dry-run --config configs/gallery/qwen2_5_1_5b_grpo.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.grpo("Qwen/Qwen2.5-1.5B-Instruct", "qwen2_5_1_5b_grpo")
