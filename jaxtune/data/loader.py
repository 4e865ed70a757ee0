"""Batches for training and evaluation: a grain pipeline that resumes exactly from its state.

Each epoch's batches are a pure function of (examples, settings, seed, epoch): which examples
(mixing), their order (shuffle), how they are grouped into rows (packing) and rows into global
batches. The iterator state is just (epoch, batch), so a resumed run recomputes that epoch's
plan and continues with exactly the next batch, on any number of hosts with the same global
batch size. Every host computes the same plan and keeps its own slice of each global batch.
"""

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxtune.data import packing, pipeline
from jaxtune.errors import ConfigError

_SORT_WINDOW = 64  # Unpacked training: batches whose examples are sorted by length together.


def make_loader(
  data_cfg: ml_collections.ConfigDict,
  tokenizer,
  *,
  split: str = "train",
  process_index: int = 0,
  process_count: int = 1,
  batch_size: int | None = None,
) -> "BatchIterator":
  """This host's batches of `split` (see `loader_for`), tokenising or reading the cache first."""
  data = pipeline.load_split(data_cfg, tokenizer, split)
  return loader_for(data, data_cfg, process_index=process_index, process_count=process_count, batch_size=batch_size)


def loader_for(
  data: pipeline.SplitData,
  data_cfg: ml_collections.ConfigDict,
  *,
  process_index: int = 0,
  process_count: int = 1,
  batch_size: int | None = None,
) -> "BatchIterator":
  """This host's batches of already loaded examples: dicts of [rows, T] arrays (see jaxtune.data.packing).

  Each host gets batch_size / process_count rows of every global batch. T is max_seq_len when
  packing, else the smallest of the bucket lengths that holds the batch's longest example.
  Training ("train") shuffles by seed, runs `num_epochs` epochs (0: forever) and drops each
  epoch's last incomplete global batch. Evaluation ("validation", "test") reads every example
  once, in order, padding the last batch with empty rows (segment_ids and loss_mask all 0).
  """
  batch_size = batch_size or data_cfg.batch_size
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise ConfigError(
      f"data.batch_size {batch_size} must split evenly over {process_count} processes (process_index {process_index})."
    )
  plan = _Plan(data, data_cfg, batch_size, training=data.split == "train")
  first = plan.epoch(0)
  if not first:
    hint = (
      "set data.validation or data.validation_fraction"
      if data.split == "validation"
      else ("set data.test_fraction" if data.split == "test" else "lower data.batch_size or add data")
    )
    raise ConfigError(
      f"split {data.split!r} has {plan.num_examples} examples, not enough for one global batch"
      f" of {batch_size} rows; {hint}."
    )
  tokens = sum(int(plan.lengths[np.concatenate(rows)].sum()) for _, rows in first)
  stats = dataclasses.replace(
    data.stats,
    batches_per_epoch=len(first),
    rows=sum(len(rows) for _, rows in first),
    packing_efficiency=tokens / sum(length * len(rows) for length, rows in first),
  )
  num_epochs = data_cfg.num_epochs if data.split == "train" else 1
  dataset = _BatchPlanDataset(plan, num_epochs, process_index, process_count).map(plan.collate)
  if data_cfg.prefetch > 0:
    dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=data_cfg.prefetch)
  return BatchIterator(iter(dataset), stats, plan.fingerprint, plan.longest_row())


class BatchIterator(grain.DatasetIterator):
  """This host's batches, with `stats` and a JSON-serialisable `get_state()`/`set_state()`.

  longest_row: the longest row (T) any of its batches can have, in any epoch.
  """

  def __init__(self, parent: grain.DatasetIterator, stats: pipeline.DataStats, fingerprint: str, longest_row: int):
    super().__init__(parent)
    self.stats = stats
    self.longest_row = longest_row
    self._fingerprint = fingerprint

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    """{"epoch", "batch" (the next one within the epoch), "fingerprint" (of data and settings)}."""
    return {**self._parent.get_state(), "fingerprint": self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues with the batch after the one that was last taken when `state` was saved."""
    if state.get("fingerprint", self._fingerprint) != self._fingerprint:
      raise ConfigError(
        "the data iterator state comes from different data or data settings (sources, "
        "tokenizer, splits, lengths, packing, batch size or seed), so it cannot resume exactly."
        " Restore the original data settings, or drop 'fingerprint' from the state to resume "
        "at the same (epoch, batch) anyway."
      )
    self._parent.set_state({"epoch": int(state["epoch"]), "batch": int(state["batch"])})


class _Plan:
  """The global batches of each epoch: (row length, rows), a row being example indices."""

  def __init__(self, data: pipeline.SplitData, cfg: ml_collections.ConfigDict, batch_size: int, training: bool):
    self.examples = pipeline.Examples.concat(data.examples)
    # The batch keys beyond packing.BATCH_KEYS, the same for every batch of the split.
    self.optional = ("labels",) * (data.kind == "kto") + ("ref_logps",) * (self.examples.ref_logps is not None)
    self.lengths = self.examples.lengths
    self.num_examples = len(self.examples)
    self.sizes = [len(e) for e in data.examples]
    self.weights = tuple(cfg.weights) if training else ()
    if self.weights and (len(self.weights) != len(self.sizes) or min(self.weights) < 0 or sum(self.weights) <= 0):
      raise ConfigError(
        f"data.weights {self.weights}: need one non-negative weight per train source ({len(self.sizes)}), not all zero."
      )
    for w, n, source in zip(self.weights, self.sizes, data.sources):
      if w > 0 and n == 0:
        raise ConfigError(f"data.weights: source {source!r} has weight {w} but no examples.")
    self.training = training
    self.shuffle = cfg.shuffle and training
    self.seed = cfg.seed
    self.batch_size = batch_size
    self.packing = cfg.packing
    self.algorithm = cfg.packing_algorithm
    self.max_seq_len = cfg.max_seq_len
    self.buckets = packing.bucket_lengths(tuple(cfg.bucket_lengths), cfg.max_seq_len)
    self.fingerprint = pipeline.digest(
      [
        data.fingerprint,
        self.weights,
        self.shuffle,
        self.seed,
        batch_size,
        self.packing,
        self.algorithm,
        self.buckets,
      ]
    )
    self._cached: tuple[int, list] | None = None

  def epoch(self, epoch: int) -> list[tuple[int, list[np.ndarray]]]:
    if self._cached is None or self._cached[0] != epoch:
      self._cached = (epoch, self._build(epoch))
    return self._cached[1]

  def _build(self, epoch: int) -> list[tuple[int, list[np.ndarray]]]:
    rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
    chosen = self._select(rng)
    if self.packing:
      order = rng.permutation(len(chosen)) if rng is not None else None
      rows = [chosen[r] for r in packing.pack(self.lengths[chosen], self.max_seq_len, self.algorithm, order)]
      if rng is not None:
        rows = [rows[i] for i in rng.permutation(len(rows))]
      return [(self.max_seq_len, b) for b in self._batches(rows)]
    if rng is not None:
      # Batches of similar lengths pad less; sorting only within windows keeps them random.
      chosen = chosen[rng.permutation(len(chosen))]
      window = self.batch_size * _SORT_WINDOW
      chosen = np.concatenate(
        [
          w[np.argsort(self.lengths[w], kind="stable")]
          for w in np.array_split(chosen, range(window, len(chosen), window))
        ]
        or [chosen]
      )
    batches = self._batches([chosen[i : i + 1] for i in range(len(chosen))])
    if rng is not None:
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return [(self._bucket(b), b) for b in batches]

  def _select(self, rng: np.random.Generator | None) -> np.ndarray:
    """This epoch's examples: all of them, or each source's share under `weights`."""
    if not self.weights:
      return np.arange(self.num_examples)
    total, starts = sum(self.sizes), np.cumsum([0] + self.sizes)
    exact = np.asarray(self.weights, float) / sum(self.weights) * total
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: total - counts.sum()]] += 1
    chosen = []
    for start, size, count in zip(starts, self.sizes, counts):
      cycles = -(-count // max(size, 1))  # passes over the source, reshuffled each time
      passes = [rng.permutation(size) if rng is not None else np.arange(size) for _ in range(cycles)]
      chosen.append(start + np.concatenate(passes or [np.zeros(0, int)])[:count])
    return np.concatenate(chosen).astype(np.int64)

  def _batches(self, rows: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Rows cut into global batches: training drops the remainder, evaluation pads it."""
    if not self.training and len(rows) % self.batch_size:
      rows = rows + [np.zeros(0, np.int64)] * (self.batch_size - len(rows) % self.batch_size)
    size = self.batch_size
    return [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]

  def longest_row(self) -> int:
    """max_seq_len when packing; else the bucket of the longest example (batches hold any example)."""
    if self.packing or not self.num_examples:
      return self.max_seq_len
    return packing.bucket_for(int(self.lengths.max()), self.buckets)

  def _bucket(self, rows: list[np.ndarray]) -> int:
    longest = max((int(self.lengths[r].max()) for r in rows if len(r)), default=1)
    return packing.bucket_for(longest, self.buckets)

  def collate(self, batch: tuple[int, list[np.ndarray]]) -> dict[str, np.ndarray]:
    length, rows = batch
    return packing.collate([[self.example(i) for i in row] for row in rows], length, self.optional)

  def example(self, i: int) -> packing.Example:
    examples = self.examples
    ids, mask = examples[i]
    ref = examples.ref_logps
    ref = None if ref is None else ref[examples.offsets[i] : examples.offsets[i + 1]]
    return packing.Example(ids, mask, int(examples.parts[i]), int(examples.labels[i]), ref)


class _BatchPlanDataset(grain.IterDataset):
  """This host's (row length, rows) of every global batch, epoch after epoch."""

  def __init__(self, plan: _Plan, num_epochs: int, process_index: int, process_count: int):
    super().__init__()
    self._args = (plan, num_epochs, process_index, process_count)

  def __iter__(self) -> "_BatchPlanIterator":
    return _BatchPlanIterator(*self._args)


class _BatchPlanIterator(grain.DatasetIterator):
  def __init__(self, plan: _Plan, num_epochs: int, process_index: int, process_count: int):
    super().__init__()
    self._plan, self._num_epochs = plan, num_epochs
    rows = plan.batch_size // process_count
    self._rows = slice(process_index * rows, (process_index + 1) * rows)
    self._epoch, self._batch = 0, 0

  def __next__(self) -> tuple[int, list[np.ndarray]]:
    while True:
      if self._num_epochs and self._epoch >= self._num_epochs:
        raise StopIteration
      batches = self._plan.epoch(self._epoch)
      if self._batch < len(batches):
        break
      self._epoch, self._batch = self._epoch + 1, 0
    length, rows = batches[self._batch]
    self._batch += 1
    return length, rows[self._rows]

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "batch": self._batch}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._batch = state["epoch"], state["batch"]
