"""Records to tokenised examples: templating (cached on disk), splits, truncation, statistics."""

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import ml_collections
import numpy as np

from jaxtune.data import chat, records, templates
from jaxtune.data.records import DataError, SkipReport

SPLITS = ("train", "validation", "test")
_CHUNK = 512  # Records per task sent to a tokenizer worker.
PARALLEL_MIN_RECORDS = 8192  # Below this, starting workers costs more than it saves.


@dataclasses.dataclass
class Examples:
  """Tokenised examples stored flat: example i spans offsets[i]:offsets[i + 1]."""

  input_ids: np.ndarray  # int32 [tokens]
  loss_mask: np.ndarray  # int8 [tokens], 1 = the token is a target
  offsets: np.ndarray  # int64 [n + 1]
  keys: np.ndarray  # uint64 [n]: digest of each record's content; orders the splits
  locations: list[str]  # where each example came from, e.g. "train.jsonl:12"

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    start, end = self.offsets[i], self.offsets[i + 1]
    return self.input_ids[start:end], self.loss_mask[start:end]

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  @classmethod
  def from_items(cls, items: Sequence[tuple[np.ndarray, np.ndarray, int, str]]) -> "Examples":
    """Examples from (input_ids, loss_mask, key, location) tuples."""
    lengths = [len(ids) for ids, *_ in items]
    return cls(
      input_ids=np.concatenate([ids for ids, *_ in items] or [[]]).astype(np.int32),
      loss_mask=np.concatenate([mask for _, mask, *_ in items] or [[]]).astype(np.int8),
      offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
      keys=np.asarray([key for *_, key, _ in items], np.uint64),
      locations=[location for *_, location in items],
    )

  @classmethod
  def concat(cls, parts: Sequence["Examples"]) -> "Examples":
    """All examples of `parts`, in order."""
    bases = np.cumsum([0] + [len(p.input_ids) for p in parts])
    return cls(
      input_ids=np.concatenate([p.input_ids for p in parts] or [np.zeros(0, np.int32)]),
      loss_mask=np.concatenate([p.loss_mask for p in parts] or [np.zeros(0, np.int8)]),
      offsets=np.concatenate([[0]] + [p.offsets[1:] + b for p, b in zip(parts, bases)]),
      keys=np.concatenate([p.keys for p in parts] or [np.zeros(0, np.uint64)]),
      locations=[loc for p in parts for loc in p.locations],
    )

  def windows(self, indices: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> "Examples":
    """Examples `indices`, example indices[j] cut to its tokens starts[j]:ends[j] (absolute)."""
    lengths = (ends - starts).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return Examples(
      self.input_ids[gather],
      self.loss_mask[gather],
      offsets,
      self.keys[indices],
      [self.locations[i] for i in indices],
    )

  def select(self, indices: np.ndarray) -> "Examples":
    """The examples at `indices`, in that order."""
    indices = np.asarray(indices, np.int64)
    return self.windows(indices, self.offsets[indices], self.offsets[indices + 1])


@dataclasses.dataclass
class DataStats:
  """What the data stage did with one split."""

  split: str
  sources: int
  cached_sources: int  # sources whose tokenised examples came from the cache
  records: int  # templated records that fell into this split
  examples: int  # those left after truncation
  tokens: int
  trainable_tokens: int
  truncated: int  # examples cut to max_seq_len and kept
  skipped: SkipReport  # by reason: bad records and template errors (all splits), truncation drops
  batches_per_epoch: int = 0  # filled in by the loader, like the two below
  rows: int = 0
  packing_efficiency: float = 0.0  # non-padding tokens / all tokens of one epoch's batches

  @property
  def trainable_fraction(self) -> float:
    return self.trainable_tokens / self.tokens if self.tokens else 0.0

  def summary(self) -> str:
    """A few human-readable lines."""
    lines = [
      f"split {self.split}: {self.sources} source(s), {self.cached_sources} from the cache",
      f"  records {self.records:,}  examples {self.examples:,}  tokens {self.tokens:,}",
      f"  trainable tokens {self.trainable_tokens:,} ({self.trainable_fraction:.1%})",
      f"  truncated to max_seq_len {self.truncated:,}",
      "  " + self.skipped.summary().replace("\n", "\n  "),
    ]
    if self.rows:
      lines.append(
        f"  batches per epoch {self.batches_per_epoch:,} ({self.rows:,} rows), "
        f"packing efficiency {self.packing_efficiency:.1%}"
      )
    return "\n".join(lines)


@dataclasses.dataclass
class SplitData:
  """The examples of one split, one `Examples` per source, and their statistics."""

  split: str
  sources: tuple[str, ...]
  examples: list[Examples]
  stats: DataStats
  fingerprint: str  # changes whenever the examples would


def load_split(data_cfg: ml_collections.ConfigDict, tokenizer, split: str = "train") -> SplitData:
  """Tokenised, split and truncated examples of `split`, one `Examples` per source."""
  _check(data_cfg, split)
  separate = as_sources(data_cfg.validation)
  from_train = not (split == "validation" and separate)
  sources = as_sources(data_cfg.train) if from_train else separate
  validation_fraction = 0.0 if separate else data_cfg.validation_fraction
  tokenizer_id = tokenizer_fingerprint(tokenizer)
  report = SkipReport()
  parts, keys, cached, num_records, truncated = [], [], 0, 0, 0
  for source in sources:
    examples, key, hit = tokenize_source(source, tokenizer, data_cfg, tokenizer_id, report)
    if from_train:
      chosen = split_indices(examples.keys, data_cfg.seed, validation_fraction, data_cfg.test_fraction)[split]
      examples = examples.select(chosen)
    num_records += len(examples)
    examples, cut = fit_to_length(examples, data_cfg.max_seq_len, data_cfg.truncation, report)
    parts.append(examples)
    keys.append(key)
    cached += hit
    truncated += cut
  stats = DataStats(
    split=split,
    sources=len(sources),
    cached_sources=cached,
    records=num_records,
    examples=sum(len(p) for p in parts),
    tokens=sum(len(p.input_ids) for p in parts),
    trainable_tokens=sum(int(p.loss_mask.sum()) for p in parts),
    truncated=truncated,
    skipped=report,
  )
  settings = [split, keys, validation_fraction, data_cfg.test_fraction, data_cfg.seed]
  settings += [data_cfg.max_seq_len, data_cfg.truncation]
  return SplitData(split, sources, parts, stats, digest(settings))


def as_sources(value: str | Sequence[str]) -> tuple[str, ...]:
  """`data.train` / `data.validation` as a tuple of sources."""
  return (value,) if isinstance(value, str) and value else tuple(v for v in value if v)


def _check(cfg: ml_collections.ConfigDict, split: str) -> None:
  """Fails on settings that cannot work, naming the key."""
  choices = {
    "on_error": ("raise", "skip"),
    "train_on": chat.TRAIN_ON,
    "truncation": ("right", "left", "drop"),
    "packing_algorithm": ("ffd", "bfd"),
  }
  for key, allowed in choices.items():
    if cfg[key] not in allowed:
      raise ValueError(f"data.{key}: {cfg[key]!r} is not one of {allowed}.")
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}.")
  if not as_sources(cfg.train):
    raise ValueError("data.train: no source given; set it to a file, directory or dataset id.")
  if as_sources(cfg.validation) and cfg.validation_fraction:
    raise ValueError("data.validation and data.validation_fraction are both set; use one of them.")
  fractions = cfg.validation_fraction + cfg.test_fraction
  if min(cfg.validation_fraction, cfg.test_fraction) < 0 or fractions >= 1:
    raise ValueError(
      "data.validation_fraction + data.test_fraction must be in [0, 1), "
      f"got {cfg.validation_fraction} + {cfg.test_fraction}."
    )
  if cfg.max_seq_len < 2:
    raise ValueError(f"data.max_seq_len: {cfg.max_seq_len} is too short to train on.")


# Splits and lengths.


def split_indices(
  keys: np.ndarray, seed: int, validation_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
  """Indices of each split, in file order, chosen by record content and seed alone.

  Examples are ordered by a hash of (content, seed); the first ones are validation, the next
  test, the rest train. The split of an example does not depend on the tokenizer or on where
  the file lives, and equal records land next to each other.
  """
  n = len(keys)
  rank = np.argsort(_mix64(np.asarray(keys, np.uint64) ^ _mix64(np.uint64(seed))), kind="stable")
  sizes = [_share(n, validation_fraction), _share(n, test_fraction)]
  bounds = np.cumsum([0] + sizes)
  return {
    "validation": np.sort(rank[bounds[0] : bounds[1]]),
    "test": np.sort(rank[bounds[1] : bounds[2]]),
    "train": np.sort(rank[bounds[2] :]),
  }


def _share(n: int, fraction: float) -> int:
  """round(n * fraction), but at least one example when the fraction asks for some."""
  return min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a fast, well-mixed uint64 hash."""
  x = np.asarray(x, np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def fit_to_length(examples: Examples, max_seq_len: int, policy: str, report: SkipReport) -> tuple[Examples, int]:
  """Examples cut to `max_seq_len` by `policy`, and how many were cut.

  The first token of every example becomes a non-target: no position of the example predicts
  it, and in a packed row the position before it belongs to another example. Examples left
  without a target are dropped and counted in `report`.
  """
  starts, ends = examples.offsets[:-1].copy(), examples.offsets[1:].copy()
  long = ends - starts > max_seq_len
  keep = np.ones(len(examples), bool)
  if policy == "right":
    ends[long] = starts[long] + max_seq_len
  elif policy == "left":
    starts[long] = ends[long] - max_seq_len
  else:
    keep &= ~long
    _count(
      report,
      examples,
      np.flatnonzero(long),
      f"longer than max_seq_len ({max_seq_len})",
      "raise data.max_seq_len, or truncate with data.truncation='right' or 'left'",
    )
  mask = examples.loss_mask.copy()
  mask[starts[starts < ends]] = 0
  targets = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
  empty = keep & (targets[ends] == targets[starts])
  _count(
    report,
    examples,
    np.flatnonzero(empty & long),
    f"no trainable token within the first max_seq_len ({max_seq_len}) tokens"
    if policy == "right"
    else f"no trainable token within the last max_seq_len ({max_seq_len}) tokens",
    "raise data.max_seq_len, or shorten the prompt",
  )
  _count(
    report,
    examples,
    np.flatnonzero(empty & ~long),
    "only the first token is trainable",
    "nothing can predict an example's first token; check the loss mask",
  )
  keep &= ~empty
  indices = np.flatnonzero(keep)
  kept = dataclasses.replace(examples, loss_mask=mask).windows(indices, starts[keep], ends[keep])
  return kept, int(np.sum(long & keep))


def _count(report: SkipReport, examples: Examples, indices: np.ndarray, problem: str, fix: str) -> None:
  """Counts dropped examples under the reason `problem`, showing the first."""
  if len(indices):
    first = DataError(examples.locations[indices[0]], "input_ids", problem, fix)
    report.counts[first.reason] += len(indices)
    report.examples.setdefault(first.reason, str(first))


# Tokenising, with a cache on disk.


def tokenize_source(
  source: str,
  tokenizer,
  data_cfg: ml_collections.ConfigDict,
  tokenizer_id: str,
  report: SkipReport,
) -> tuple[Examples, str, bool]:
  """All templated examples of one source, their cache key, and whether the cache had them."""
  key = digest(
    [
      _code_version(),
      _source_fingerprint(source),
      tokenizer_id,
      data_cfg.format,
      _field_map(data_cfg),
      data_cfg.prompt_template,
      data_cfg.on_error,
      data_cfg.train_on,
      templates.resolve(data_cfg.chat_template),
    ]
  )
  path = pathlib.Path(data_cfg.cache_dir).expanduser() / f"{key}.npz" if data_cfg.cache_dir else None
  if path is not None and path.exists():
    examples, skipped = _load(path)
    _merge(report, skipped)
    return examples, key, True
  skipped = SkipReport()
  stream = records.read_records(
    source,
    format=data_cfg.format,
    field_map=_field_map(data_cfg) or None,
    prompt_template=data_cfg.prompt_template or None,
    on_error=data_cfg.on_error,
    report=skipped,
  )
  settings = (data_cfg.train_on, templates.resolve(data_cfg.chat_template), data_cfg.on_error)
  examples = Examples.from_items(_encode_all(stream, tokenizer, settings, data_cfg.num_workers, skipped))
  if path is not None:
    _save(path, examples, skipped)
  _merge(report, skipped)
  return examples, key, False


def _encode_all(stream: Iterable, tokenizer, settings: tuple, num_workers: int, report: SkipReport) -> list:
  """Encoded items of every record, in order; in worker processes when there are many."""
  chunks = _chunked(stream, _CHUNK)
  ahead = list(itertools.islice(chunks, max(1, PARALLEL_MIN_RECORDS // _CHUNK)))
  more = next(chunks, None)
  items = []
  if num_workers <= 1 or more is None:
    for chunk in itertools.chain(ahead, [more] if more else [], chunks):
      items += _unpack_chunk(_encode_chunk(chunk, tokenizer, settings), settings, report)
    return items
  # spawn, not fork: the parent may hold threads (jax, tokenizers) that fork would break.
  context = multiprocessing.get_context("spawn")
  with context.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
    pending = collections.deque()
    for chunk in itertools.chain(ahead, [more], chunks):
      pending.append(pool.apply_async(_encode_in_worker, (chunk, settings)))
      if len(pending) > 2 * num_workers:
        items += _unpack_chunk(pending.popleft().get(), settings, report)
    while pending:
      items += _unpack_chunk(pending.popleft().get(), settings, report)
  return items


def _chunked(stream: Iterable, size: int) -> Iterator[list]:
  iterator = iter(stream)
  while chunk := list(itertools.islice(iterator, size)):
    yield chunk


def _encode_chunk(chunk: list, tokenizer, settings: tuple) -> tuple[list, list[tuple]]:
  """(items, errors) for a list of records; stops at the first error when on_error='raise'."""
  train_on, chat_template, on_error = settings
  items, errors = [], []
  for record in chunk:
    try:
      encoded = chat.encode_record(record, tokenizer, train_on=train_on, chat_template=chat_template)
    except DataError as e:
      # DataError's arguments, not the exception: it does not survive pickling back.
      errors.append((e.location, e.field, e.problem, e.fix, e.reason))
      if on_error == "raise":
        break
      continue
    ids = np.asarray(encoded.input_ids, np.int32)
    items.append((ids, np.asarray(encoded.loss_mask, np.int8), _record_key(record), encoded.location))
  return items, errors


def _unpack_chunk(result: tuple[list, list], settings: tuple, report: SkipReport) -> list:
  items, errors = result
  for location, field, problem, fix, reason in errors:
    error = DataError(location, field, problem, fix, reason=reason)
    if settings[2] == "raise":
      raise error
    report.add(error)
  return items


_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
  global _worker_tokenizer
  _worker_tokenizer = tokenizer


def _encode_in_worker(chunk: list, settings: tuple) -> tuple[list, list]:
  return _encode_chunk(chunk, _worker_tokenizer, settings)


def _record_key(record) -> int:
  """A digest of a record's content, independent of its location and the tokenizer."""
  content = {k: v for k, v in dataclasses.asdict(record).items() if k != "location"}
  text = json.dumps(content, sort_keys=True, default=str).encode()
  return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def tokenizer_fingerprint(tokenizer) -> str:
  """A digest of everything about a tokenizer that changes token ids: vocab, rules, template."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
  return digest(
    [
      type(tokenizer).__name__,
      vocab,
      tokenizer.chat_template,
      tokenizer.special_tokens_map,
      getattr(tokenizer, "add_bos_token", None),
      getattr(tokenizer, "add_eos_token", None),
    ]
  )


def _source_fingerprint(source: str) -> list:
  """A source's resolved path with each file's size and mtime; a hub id stands for itself."""
  path = pathlib.Path(source).expanduser()
  if not path.exists():
    return [source]
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  stats = [(str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns) for f in files]
  return [str(path.resolve()), stats]


@functools.cache
def _code_version() -> str:
  """A digest of the code that makes cached examples: a fix to masking must not meet old caches."""
  return digest([pathlib.Path(m.__file__).read_text() for m in (records, chat, sys.modules[__name__])])


def _field_map(cfg: ml_collections.ConfigDict) -> dict:
  field_map = cfg.field_map
  return dict(field_map.to_dict() if hasattr(field_map, "to_dict") else field_map or {})


def digest(value) -> str:
  """A short, stable hash of a JSON-able value (cache keys, fingerprints)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save(path: pathlib.Path, examples: Examples, skipped: SkipReport) -> None:
  """Writes the cache file atomically, so an interrupted run leaves no half-written entry."""
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = {"locations": examples.locations, "skipped": dict(skipped.counts), "examples": skipped.examples}
  tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
  np.savez(
    tmp,
    input_ids=examples.input_ids,
    loss_mask=examples.loss_mask,
    offsets=examples.offsets,
    keys=examples.keys,
    meta=np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8),
  )
  os.replace(tmp, path)


def _load(path: pathlib.Path) -> tuple[Examples, SkipReport]:
  with np.load(path) as f:
    meta = json.loads(f["meta"].tobytes())
    examples = Examples(f["input_ids"], f["loss_mask"], f["offsets"], f["keys"], meta["locations"])
  skipped = SkipReport()
  skipped.counts.update(meta["skipped"])
  skipped.examples.update(meta["examples"])
  return examples, skipped


def _merge(total: SkipReport, part: SkipReport) -> None:
  total.counts.update(part.counts)
  for reason, example in part.examples.items():
    total.examples.setdefault(reason, example)
