"""DPO on top of the quickstart: SmolLM2-135M-Instruct learns to answer in compact JSON, on a laptop CPU.

    jaxtune train --config quickstart
    jaxtune export --run runs/quickstart --format adapter --out runs/quickstart/adapter
    python -m jaxtune.train --config configs/dpo_quickstart.py

The quickstart's adapter answers '{"person": "Mateo", "day": "Sunday", "time": "09:30"}'. The pairs of
`jaxtune.tasks.meeting_prefs` prefer the same object without spaces. Training continues that adapter
(model.adapter), and the model it starts from is the reference: its log-probs are computed once
before the first step. Before and after, the run scores exact match against the compact answer on 50
held-out sentences (the share of answers in the preferred form, each also the right object), and
evaluates reward accuracy on 32 held-out pairs. Figures: docs/preference.md.
"""

import ml_collections

from jaxtune.tasks import meeting_prefs
from jaxtune.train.config import default_config

DATA = meeting_prefs.DATA


def get_config() -> ml_collections.ConfigDict:
  config = default_config()
  config.output_dir = "runs/dpo_quickstart"
  config.model.path = "smollm2-gguf"
  config.objective = "dpo"
  config.model.adapter = "runs/quickstart/adapter"

  config.data.train = (str(DATA / "train.jsonl"),)
  config.data.validation = (str(DATA / "validation.jsonl"),)
  config.data.max_seq_len = 256  # a pair: two sequences of 80-95 tokens
  config.data.packing = False
  config.data.bucket_lengths = (192,)
  config.data.batch_size = 8
  config.data.num_epochs = 0

  # DPO moves fast here (the first differing token decides the form): at 1e-3 the chosen answers' own
  # likelihood collapses within 10 steps and generations degrade; 1e-4 raises it.
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 2
  config.train.steps = 20
  config.train.log_every = 2
  config.train.eval_batches = 0  # all 32 validation pairs
  config.checkpoint.every = 10
  config.checkpoint.keep = 2

  config.task.test_file = str(DATA / "test.jsonl")
  config.task.scorer = "exact"  # the compact string itself
  config.task.num_examples = 50
  config.task.max_new_tokens = 28
  return config
