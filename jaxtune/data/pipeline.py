"""Records to tokenised examples: templating (cached on disk), splits, truncation, statistics.

SFT records become one-sequence examples (jaxtune.data.chat); preference and KTO records become two-sequence
examples (jaxtune.data.preference), and a split says which it holds in `SplitData.kind`.
"""

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import ml_collections
import numpy as np

from jaxtune.data import chat, preference, records, templates
from jaxtune.data import examples as examples_lib
from jaxtune.data.examples import Examples
from jaxtune.data.records import DataError, SkipReport

SPLITS = ("train", "validation", "test")
_CHUNK = 512  # Records per task sent to a tokenizer worker.
PARALLEL_MIN_RECORDS = 8192  # Below this, starting workers costs more than it saves.


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
  kind: str = "sft"  # "sft" | "pairs" | "kto" (see SplitData.kind)
  desirable: int = 0  # kto: examples labelled true, and false below
  undesirable: int = 0

  @property
  def trainable_fraction(self) -> float:
    return self.trainable_tokens / self.tokens if self.tokens else 0.0

  def _examples(self) -> str:
    if self.kind == "pairs":
      return f"pairs {self.examples:,}"
    if self.kind == "kto":
      return f"KTO examples {self.examples:,} (desirable {self.desirable:,}, undesirable {self.undesirable:,})"
    return f"examples {self.examples:,}"

  def summary(self) -> str:
    """A few human-readable lines."""
    lines = [
      f"split {self.split}: {self.sources} source(s), {self.cached_sources} from the cache",
      f"  records {self.records:,}  {self._examples()}  tokens {self.tokens:,}",
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
  """The examples of one split, one `Examples` per source, and their statistics.

  kind: what the split holds, for the training objective to check (`preference.check_kind`): "sft"
  (one-sequence examples), "pairs" (preference pairs: prompt + chosen, then prompt + rejected) or "kto"
  (prompt + completion, then its KL sequence, each example labelled).
  """

  split: str
  sources: tuple[str, ...]
  examples: list[Examples]
  stats: DataStats
  fingerprint: str  # changes whenever the examples would
  kind: str = "sft"


def load_split(data_cfg: ml_collections.ConfigDict, tokenizer, split: str = "train") -> SplitData:
  """Tokenised, split and truncated examples of `split`, one `Examples` per source."""
  _check(data_cfg, split)
  separate = as_sources(data_cfg.validation)
  from_train = not (split == "validation" and separate)
  sources = as_sources(data_cfg.train) if from_train else separate
  validation_fraction = 0.0 if separate else data_cfg.validation_fraction
  tokenizer_id = tokenizer_fingerprint(tokenizer)
  report = SkipReport()
  parts, keys, kinds, cached, num_records, truncated = [], [], [], 0, 0, 0
  for source in sources:
    examples, key, hit = tokenize_source(source, tokenizer, data_cfg, tokenizer_id, report)
    kinds.append(examples.kind)
    if from_train:
      chosen = split_indices(examples.keys, data_cfg.seed, validation_fraction, data_cfg.test_fraction)[split]
      examples = examples.select(chosen)
    num_records += len(examples)
    if examples.kind == "kto":
      examples = preference.with_kl(examples, data_cfg.batch_size)
    virtual = data_cfg.get("virtual_tokens", 0)
    examples, cut = fit_to_length(
      examples, data_cfg.max_seq_len - virtual, data_cfg.truncation, report, on_error=data_cfg.on_error
    )
    examples = with_virtual_tokens(examples, virtual)
    parts.append(examples)
    keys.append(key)
    cached += hit
    truncated += cut
  kind = preference.split_kind(kinds, sources, "data.train" if from_train else "data.validation")
  if kind == "kto" and split == "train":
    preference.check_labels(parts, sources)
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
    kind=kind,
    desirable=sum(int(np.sum(p.labels == 1)) for p in parts),
    undesirable=sum(int(np.sum(p.labels == 0)) for p in parts),
  )
  settings = [split, keys, validation_fraction, data_cfg.test_fraction, data_cfg.seed]
  settings += [data_cfg.max_seq_len, data_cfg.truncation] + ([virtual] if virtual else [])
  if kind == "kto":  # the KL sequences pair records within groups of batch_size
    settings.append(data_cfg.batch_size)
  return SplitData(split, sources, parts, stats, digest(settings), kind)


def split_records(data_cfg: ml_collections.ConfigDict, split: str) -> list[records.Record]:
  """The records of `split` as `load_split` chooses them (same keys, seed and fractions), untokenised.

  Records that templating would skip (data.on_error=skip) still count here, so with skipped records
  the split can differ from training's by those records.
  """
  _check(data_cfg, split)
  separate = as_sources(data_cfg.validation)
  from_train = not (split == "validation" and separate)
  out = []
  for source in as_sources(data_cfg.train) if from_train else separate:
    found = list(
      records.read_records(
        source,
        format=data_cfg.format,
        field_map=_field_map(data_cfg) or None,
        prompt_template=data_cfg.prompt_template or None,
        on_error=data_cfg.on_error,
        report=SkipReport(),
      )
    )
    if from_train:
      keys = np.asarray([_record_key(r) for r in found], np.uint64)
      fraction = 0.0 if separate else data_cfg.validation_fraction
      found = [found[i] for i in split_indices(keys, data_cfg.seed, fraction, data_cfg.test_fraction)[split]]
    out += found
  return out


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
  for key in ("max_prompt_length", "max_completion_length"):
    if not isinstance(cfg[key], int) or cfg[key] < 0:
      raise ValueError(f"data.{key}: {cfg[key]!r} must be a number of tokens, or 0 for no limit.")


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


def with_virtual_tokens(examples: Examples, count: int) -> Examples:
  """Every example after `count` virtual slots (input ids -1 - k, not targets: jaxtune/peft/virtual.py), so
  packing, positions and segments give each example its own. One-sequence examples only (config refuses the
  others with prompt and prefix tuning)."""
  if not count or not len(examples):
    return examples
  lengths = examples.lengths
  offsets = np.concatenate([[0], np.cumsum(lengths + count)]).astype(np.int64)
  ids = np.empty(offsets[-1], examples.input_ids.dtype)
  mask = np.zeros(offsets[-1], examples.loss_mask.dtype)
  example = np.repeat(np.arange(len(examples)), lengths)
  dest = np.arange(len(examples.input_ids)) - examples.offsets[:-1][example] + offsets[:-1][example] + count
  ids[dest], mask[dest] = examples.input_ids, examples.loss_mask
  virtual = (offsets[:-1, None] + np.arange(count)).reshape(-1)
  ids[virtual] = np.tile(-1 - np.arange(count), len(examples))
  return dataclasses.replace(examples, input_ids=ids, loss_mask=mask, offsets=offsets, ref_logps=None)


def fit_to_length(
  examples: Examples, max_seq_len: int, policy: str, report: SkipReport, *, on_error: str = "skip"
) -> tuple[Examples, int]:
  """Examples cut to `max_seq_len` by `policy`, and how many were cut.

  The first token of every sequence becomes a non-target: no position of the example predicts
  it, and in a packed row the position before it belongs to another sequence. Examples left
  without a target are dropped and counted in `report`. A two-sequence example (a preference pair, a
  KTO example) is never cut: one too long is refused with a DataError (`on_error="raise"`) or dropped
  and counted, whatever the policy.
  """
  starts, ends = examples.offsets[:-1].copy(), examples.offsets[1:].copy()
  two = examples.parts > 0
  long = ends - starts > max_seq_len
  keep = ~(long & two)
  for indices, field, problem, fix in preference.overlong(examples, np.flatnonzero(long & two), max_seq_len):
    if len(indices) and on_error == "raise":
      raise DataError(examples.locations[indices[0]], field, problem, fix)
    _count(report, examples, indices, problem, fix, field)
  long &= ~two
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
  mask[starts[two] + examples.parts[two]] = 0
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


def _count(
  report: SkipReport, examples: Examples, indices: np.ndarray, problem: str, fix: str, field: str = "input_ids"
) -> None:
  """Counts dropped examples under the reason `problem`, showing the first."""
  if len(indices):
    first = DataError(examples.locations[indices[0]], field, problem, fix)
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
      data_cfg.max_prompt_length,
      data_cfg.max_completion_length,
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
  settings = (
    data_cfg.train_on,
    templates.resolve(data_cfg.chat_template),
    data_cfg.on_error,
    data_cfg.max_prompt_length,
    data_cfg.max_completion_length,
  )
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
  train_on, chat_template, on_error, max_prompt_length, max_completion_length = settings
  items, errors = [], []
  for record in chunk:
    try:
      if record.kind in ("preference", "kto"):
        ids, mask, parts, label = preference.encode(
          record,
          tokenizer,
          chat_template=chat_template,
          max_prompt_length=max_prompt_length,
          max_completion_length=max_completion_length,
        )
      else:
        encoded = chat.encode_record(record, tokenizer, train_on=train_on, chat_template=chat_template)
        ids, mask, parts, label = encoded.input_ids, encoded.loss_mask, 0, -1
    except DataError as e:
      # DataError's arguments, not the exception: it does not survive pickling back.
      errors.append((e.location, e.field, e.problem, e.fix, e.reason))
      if on_error == "raise":
        break
      continue
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int8)
    items.append((ids, mask, _record_key(record), record.location, parts, label))
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
  modules = (records, chat, preference, examples_lib, sys.modules[__name__])
  return digest([pathlib.Path(m.__file__).read_text() for m in modules])


def _field_map(cfg: ml_collections.ConfigDict) -> dict:
  field_map = cfg.field_map
  return dict(field_map.to_dict() if hasattr(field_map, "to_dict") else field_map or {})


def digest(value) -> str:
  """A short, stable hash of a JSON-able value (cache keys, fingerprints)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save(path: pathlib.Path, examples: Examples, skipped: SkipReport) -> None:
  examples_lib.save(path, examples, {"skipped": dict(skipped.counts), "examples": skipped.examples})


def _load(path: pathlib.Path) -> tuple[Examples, SkipReport]:
  examples, meta = examples_lib.load(path)
  skipped = SkipReport()
  skipped.counts.update(meta["skipped"])
  skipped.examples.update(meta["examples"])
  return examples, skipped


def _merge(total: SkipReport, part: SkipReport) -> None:
  total.counts.update(part.counts)
  for reason, example in part.examples.items():
    total.examples.setdefault(reason, example)
