"""Defaults for the data section of a config; training configs embed it as `config.data`."""

import ml_collections

from jaxtune import configs


def data_config() -> ml_collections.ConfigDict:
  """The data stage's settings and their defaults."""
  c = ml_collections.ConfigDict()

  # Sources: local JSONL/JSON/Parquet/CSV files, saved `datasets` directories or hub ids.
  # A tuple, so `--config.data.train=a.jsonl` and `("a.jsonl", "b.jsonl")` both work.
  c.train = ()
  # Mixing: one weight per train source, or empty for "every example once per epoch".
  # With weights, an epoch still holds as many examples as all sources together, source i
  # taking the share weights[i] / sum(weights) of it (sampled without replacement, cycling
  # through a source again when it is up-sampled).
  c.weights = ()
  # Validation: either separate sources here, or a fraction held out of each train source.
  c.validation = ()
  c.validation_fraction = 0.0  # the share of each train source held out for validation when data.validation is empty
  # The share of each train source held out as test examples (task.test_file's stand-in); always from the train sources.
  c.test_fraction = 0.0
  # Seeds the train/validation/test split and the per-epoch shuffle and mixing.
  c.seed = 0

  # Reading records (see jaxtune.data.records).

  # The record format: auto | messages | sharegpt | alpaca | completion | text | preference | kto | template. Auto tells
  # preference pairs (chosen/rejected) and KTO records (a label field) apart from SFT data.
  c.format = "auto"
  # Your records' field names under jaxtune's ({jaxtune's name: yours}), e.g. {"instruction": "question"}.
  c.field_map = ml_collections.ConfigDict()
  # The template format's user turn: a Python format string over each record's fields, e.g. "Q: {question}"; the
  # answer is the response field. Empty: none.
  c.prompt_template = ""
  c.on_error = "raise"  # raise | skip: a bad record stops the run, or is skipped and counted.

  # Templating and loss masks (see jaxtune.data.chat).

  # The tokens that carry loss: assistant | all | last_assistant (SFT; pairs and KTO train on the final answer)
  c.train_on = "assistant"
  # Empty: the tokenizer's own template. A name (llama2, llama3, mistral, qwen2.5, qwen3, gemma, phi3:
  # jaxtune/data/templates) or Jinja text replaces it, in training, task scoring and the exported tokenizer.
  c.chat_template = ""

  # Lengths.

  c.max_seq_len = 2048  # the longest row in tokens; longer examples are cut as truncation says
  # right: keep the start; left: keep the end; drop: drop every example longer than
  # max_seq_len. Examples left without a trainable token are dropped and counted.
  c.truncation = "right"
  # Prompt and prefix tuning's virtual tokens before every example (set by the trainer from peft.prompt /
  # peft.prefix num_virtual_tokens): examples are cut to max_seq_len minus them, then each gets its own.
  c.virtual_tokens = 0
  # Preference and KTO data: each prompt keeps its last max_prompt_length tokens and each completion
  # its first max_completion_length (0: no limit). Both sequences of an example (prompt + chosen and
  # prompt + rejected, or a KTO completion and its KL sequence) must then fit max_seq_len together; an
  # example that does not is never cut but refused or skipped, by on_error.
  c.max_prompt_length = 0
  c.max_completion_length = 0  # preference and KTO data: a completion keeps its first this many tokens (0: all)
  c.packing = True  # Rows of exactly max_seq_len holding several examples each.
  c.packing_algorithm = "ffd"  # ffd (first-fit decreasing) | bfd (best-fit decreasing)
  # Unpacked rows are padded to the smallest of these lengths that fits the batch's longest
  # example; max_seq_len is always one of them. Empty: 64, 128, 256, ... below max_seq_len.
  c.bucket_lengths = ()

  # Loading.

  # Rows per optimizer update, global: each of N hosts gets batch_size / N rows. KTO also pairs each record with
  # another's completion for its KL sequence within groups of batch_size records (jaxtune.data.preference.with_kl).
  c.batch_size = 32
  c.num_epochs = 1  # 0: repeat forever (step-based training).
  c.shuffle = True  # shuffle the examples every epoch (seeded by data.seed)
  c.prefetch = 4  # Batches prepared ahead by a background thread.
  c.cache_dir = "~/.cache/jaxtune/data"  # Tokenised examples; empty: no cache.
  c.num_workers = 0  # Tokenizer processes for large sources; 0 or 1: tokenise in-process.
  return configs.locked(c)


def data_only_config() -> ml_collections.ConfigDict:
  """A config for `jaxtune data` alone: the tokenizer and the data section (a training config works too)."""
  c = ml_collections.ConfigDict()
  # A tokenizer directory, a hub id in the local cache, or a built-in model (smollm2-gguf, tiny-random).
  c.tokenizer = ""
  c.data = data_config()
  return configs.locked(c)
