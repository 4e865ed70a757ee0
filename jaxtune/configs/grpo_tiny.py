"""GRPO on the tiny random Llama: sampling, rewards and the policy loss end to end in seconds (the tests run it).

    python -m jaxtune.train --config configs/grpo_tiny.py

The quickstart's meeting-to-JSON prompts, 2 prompts x 4 completions of up to 16 characters per step,
rewarded for valid JSON and each matching field. The random model earns nothing: this config checks
the machinery (resume, devices, metrics), not learning; configs/grpo_quickstart.py learns.
"""

import ml_collections

from jaxtune.tasks import meeting_json
from jaxtune.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/grpo_tiny"
  config.model.path = "tiny-random"
  config.objective = "grpo"
  config.grpo.num_generations = 4
  config.grpo.max_completion_length = 16
  config.grpo.reward_funcs = ("json_valid", "json_fields", "format:[{].*")
  config.grpo.reward_weights = (1.0, 1.0, 0.5)

  config.data.train = (str(meeting_json.DATA / "validation.jsonl"),)
  config.data.max_seq_len = 320  # one token per character: prompts of ~200, padded to 224, and 16 new
  config.data.batch_size = 8  # completions: 2 prompts x 4
  config.data.num_epochs = 0

  config.peft.lora.rank = 8
  config.peft.lora.alpha = 16.0
  config.optim.lr = 1e-2
  config.optim.warmup_steps = 2
  config.train.steps = 6
  config.train.grad_accum = 2
  config.train.log_every = 1
  config.train.eval_every = 3
  config.checkpoint.every = 2
  config.checkpoint.keep = 3
  config.logging.progress = False
  return config
