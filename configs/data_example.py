"""Look at the quickstart data as training will see it: statistics, masked examples, a JSONL dump.

  python -m jaxtune.hf.gguf --smollm2 --out runs/smollm2   # once: SmolLM2 and its tokenizer
  python -m jaxtune.data --config configs/data_example.py --show 2
  python -m jaxtune.data --config configs/data_example.py --split validation \
      --config.data.packing=False --dump /tmp/validation.jsonl

Training configs embed the same data section as `config.data`.
"""

import ml_collections

from jaxtune.data.config import data_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # A tokenizer directory ("./" keeps it from reading as a hub id), or a hub id in the local cache.
  config.tokenizer = "./runs/smollm2"
  config.data = data_config()
  config.data.train = ("data/quickstart/train.jsonl",)
  config.data.validation = ("data/quickstart/validation.jsonl",)
  config.data.max_seq_len = 512
  config.data.batch_size = 8
  return config
