"""Qwen3 1.7B (qwen3), GRPO with LoRA r=16: TL;DR summaries rewarded by ROUGE-L against the reference.

    jaxtune train --config configs/gallery/qwen3_1_7b_grpo.py

Each step samples 8 completions for each of 8 prompts on the training weights; docs/rl.md has the
losses (dapo by default) and the rewards.
Memory per device: `jaxtune dry-run --config configs/gallery/qwen3_1_7b_grpo.py --num_devices 8`.
"""

import ml_collections

from jaxtune.configs import gallery


def get_config() -> ml_collections.ConfigDict:
  return gallery.grpo("Qwen/Qwen3-1.7B", "qwen3_1_7b_grpo")
