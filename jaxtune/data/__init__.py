"""The data stage: records -> chat template and loss masks -> examples -> packed batches.

records.py reads and validates files; chat.py templates records into token ids and masks;
preference.py templates preference pairs and KTO records into two-sequence examples and checks data
against an objective; pipeline.py tokenises whole sources (cached, examples.py), splits and truncates
them; packing.py groups examples into rows; loader.py serves resumable batches through grain.
"""

from jaxtune.data.chat import Encoded, encode_record
from jaxtune.data.config import data_config
from jaxtune.data.examples import Examples
from jaxtune.data.loader import BatchIterator, loader_for, make_loader
from jaxtune.data.packing import BATCH_KEYS, OPTIONAL_KEYS, bucket_lengths, collate, efficiency, pack, unpack
from jaxtune.data.pipeline import (
  DataStats,
  SplitData,
  fit_to_length,
  load_split,
  split_indices,
  tokenizer_fingerprint,
)
from jaxtune.data.preference import OBJECTIVES, check_kind
from jaxtune.data.records import DataError, Record, SkipReport, read_records

__all__ = [
  "BATCH_KEYS",
  "BatchIterator",
  "DataError",
  "DataStats",
  "Encoded",
  "Examples",
  "OBJECTIVES",
  "OPTIONAL_KEYS",
  "Record",
  "SkipReport",
  "SplitData",
  "bucket_lengths",
  "check_kind",
  "collate",
  "data_config",
  "efficiency",
  "encode_record",
  "fit_to_length",
  "load_split",
  "loader_for",
  "make_loader",
  "pack",
  "read_records",
  "split_indices",
  "tokenizer_fingerprint",
  "unpack",
]
