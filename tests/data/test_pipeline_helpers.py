"""Small builders shared by the data-stage tests: a byte-level tokenizer, chat files, examples."""

import json
import pathlib

import numpy as np

CHATML = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = "the a cat dog sat ran on under mat log red big small quickly slowly and then".split()


def tiny_tokenizer(chat_template: str = CHATML):
  """A byte-level BPE tokenizer with no merges (one token per byte) and ChatML specials."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
  backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens(specials)
  return PreTrainedTokenizerFast(
    tokenizer_object=backend,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    chat_template=chat_template,
  )


def chat(rng: np.random.Generator, turns: int, words: int = 6) -> dict:
  """A record in the messages format: optional system prompt, `turns` user/assistant pairs."""

  def say():
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, words + 1))))

  messages = [{"role": "system", "content": say()}] if rng.random() < 0.3 else []
  for _ in range(turns):
    messages += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
  return {"messages": messages}


def write_chats(path: pathlib.Path, n: int, seed: int = 0, max_turns: int = 2) -> pathlib.Path:
  """`n` distinct random conversations as JSONL."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(n):
      record = chat(rng, int(rng.integers(1, max_turns + 1)))
      record["messages"][-1]["content"] += f" {i}"  # distinct records
      f.write(json.dumps(record) + "\n")
  return path


def make_examples(lengths, seed: int = 0, source: str = "synthetic"):
  """Examples of the given lengths: random ids, the first third of each untrained."""
  from jaxtune.data.pipeline import Examples

  rng = np.random.default_rng(seed)
  items = []
  for i, length in enumerate(lengths):
    mask = (np.arange(length) >= max(1, length // 3)).astype(np.int8)
    items.append((rng.integers(1, 1000, length).astype(np.int32), mask, i, f"{source}:{i + 1}"))
  return Examples.from_items(items)


def make_split(parts, split: str = "train"):
  """A SplitData over synthetic `Examples` (one per source), skipping records and templating."""
  from jaxtune.data.pipeline import DataStats, SplitData
  from jaxtune.data.records import SkipReport

  stats = DataStats(
    split=split,
    sources=len(parts),
    cached_sources=0,
    records=sum(len(p) for p in parts),
    examples=sum(len(p) for p in parts),
    tokens=sum(len(p.input_ids) for p in parts),
    trainable_tokens=sum(int(p.loss_mask.sum()) for p in parts),
    truncated=0,
    skipped=SkipReport(),
  )
  sources = tuple(f"source{i}" for i in range(len(parts)))
  return SplitData(split, sources, list(parts), stats, fingerprint=f"synthetic-{split}")


def data_cfg(tmp_path: pathlib.Path, **overrides):
  """The default data config, caching under tmp_path, with `overrides` applied."""
  from jaxtune.data.config import data_config

  cfg = data_config()
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.prefetch = 2
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def write_jsonl(path, rows) -> str:
  """Rows are dicts (written as JSON) or raw strings (written verbatim)."""
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def pair_rows(n: int, start: int = 0) -> list[dict]:
  """`n` distinct preference pairs with string prompt, chosen and rejected."""
  return [{"prompt": f"the cat {i}", "chosen": f"sat on the mat {i}", "rejected": f"ran {i}"} for i in range(start, n)]


def kto_rows(n: int) -> list[dict]:
  """`n` distinct KTO records; every third one (i % 3 == 1) undesirable."""
  return [{"prompt": f"the dog {i}", "completion": f"ran quickly {i}", "label": i % 3 != 1} for i in range(n)]


def cfg_for(tmp_path, *sources, **overrides):
  """`data_cfg` reading `sources`, rows up to 256 tokens."""
  return data_cfg(tmp_path, **{"train": tuple(str(s) for s in sources), "max_seq_len": 256, **overrides})


def decoded(tokenizer, ids) -> str:
  """Token ids as text, special tokens shown."""
  return tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


def sequences(examples, i: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """((input_ids, loss_mask) of the first sequence, of the second) of two-sequence example i."""
  ids, mask = examples[i]
  k = examples.parts[i]
  return (ids[:k], mask[:k]), (ids[k:], mask[k:])
