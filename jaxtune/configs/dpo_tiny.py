"""DPO on the tiny random Llama: the preference pipeline end to end in seconds (the tests run it).

    python -m jaxtune.train --config configs/dpo_tiny.py

Pairs from `jaxtune.tasks.meeting_prefs` (compact over spaced JSON). LoRA with the reference
computed live (the same weights with the adapters off); `--config.reference=precomputed` or
`--config.peft.method=full` take the precomputed route. Other objectives run on the same data:
`--config.objective=orpo` (or simpo, reward).
"""

import ml_collections

from jaxtune.tasks import meeting_prefs
from jaxtune.train.config import default_config

DATA = meeting_prefs.DATA


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/dpo_tiny"
  config.model.path = "tiny-random"
  config.objective = "dpo"
  config.reference = "live"

  config.data.train = (str(DATA / "train.jsonl"),)
  config.data.validation = (str(DATA / "validation.jsonl"),)
  # One token per character: a pair is two ~230-token sequences; keep the prompts' last 100.
  config.data.max_prompt_length = 100
  config.data.max_seq_len = 320
  config.data.batch_size = 4
  config.data.num_epochs = 0

  config.peft.lora.rank = 8
  config.peft.lora.alpha = 16.0
  config.optim.lr = 1e-2
  config.optim.warmup_steps = 2
  config.train.steps = 12
  config.train.grad_accum = 2
  config.train.log_every = 1
  config.train.eval_every = 6
  config.train.eval_batches = 2
  config.checkpoint.every = 6
  config.checkpoint.keep = 2
  config.logging.progress = False
  return config
