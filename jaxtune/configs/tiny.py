"""Tiny: a 2-layer random Llama with a character tokenizer on the quickstart data; the whole pipeline in seconds.

    python -m jaxtune.train --config configs/tiny.py

Used by the tests (loss goes down, exact resume, SIGTERM, NaN stop) and as an install smoke test.
"""

import ml_collections

from jaxtune.tasks import meeting_json
from jaxtune.train.config import default_config

DATA = meeting_json.DATA  # shipped inside the package: the config runs from an installed wheel


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/tiny"
  config.model.path = "tiny-random"

  config.data.train = (str(DATA / "train.jsonl"),)
  config.data.validation = (str(DATA / "validation.jsonl"),)
  # One token per character: examples are ~230 long; keeping their last 128 keeps the answer and
  # most of the question, and a short sequence keeps each step at a few milliseconds on CPU.
  config.data.max_seq_len = 128
  config.data.truncation = "left"
  config.data.batch_size = 8
  config.data.num_epochs = 0
  config.data.prefetch = 2

  config.peft.lora.rank = 8
  config.peft.lora.alpha = 16.0
  config.optim.lr = 1e-2
  config.optim.warmup_steps = 2
  config.train.steps = 40
  config.train.grad_accum = 2
  config.train.log_every = 1
  config.train.eval_every = 20
  config.train.eval_batches = 2
  config.checkpoint.every = 10
  config.checkpoint.keep = 2
  config.logging.progress = False
  return config
