"""Packing examples into fixed-length rows, bucket lengths, and collating rows into batches.

A batch is a dict of int32 [B, T] arrays (`BATCH_KEYS`):
  input_ids    token ids; 0 on padding.
  loss_mask    1 where input_ids[:, t] is a target (predicted from position t - 1).
  segment_ids  1, 2, ... for the sequences of a row in order; 0 on padding.
  positions    0, 1, ... restarting at every segment; 0 on padding.
and, only when some example of the batch carries them (`OPTIONAL_KEYS`):
  labels       int32: on every token of a KTO example (both its sequences) 1 if it is desirable, 2 if
               undesirable; 0 on padding and on any other example's tokens.
  ref_logps    float32: the examples' precomputed reference log-probs, token by token; 0 on padding.

An example of two sequences (`Example.parts` > 0: a preference pair, a KTO example) takes two consecutive
segments of its row, each with positions from 0: in a row of such examples, segments 2k+1 hold the first
sequences (prompt + chosen, or prompt + KTO completion) and segments 2k+2 the second (prompt + rejected, or
the KL sequence). Packing moves an example as a whole, so its two segments always share a row.
"""

import bisect
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxtune.errors import ConfigError

BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")
OPTIONAL_KEYS = ("labels", "ref_logps")
LABEL_IDS = {1: 1, 0: 2}  # KTO label (1 desirable, 0 undesirable) -> its value in the batch's `labels`


class Example(NamedTuple):
  """One example to collate; a plain (input_ids, loss_mask) tuple is one too."""

  input_ids: np.ndarray
  loss_mask: np.ndarray
  parts: int = 0  # tokens of the first sequence of a two-sequence example; 0: one sequence
  label: int = -1  # KTO: 1 desirable, 0 undesirable; -1: none
  ref_logps: np.ndarray | None = None  # float32, one per token


def pack(
  lengths: Sequence[int] | np.ndarray,
  capacity: int,
  algorithm: str = "ffd",
  order: np.ndarray | None = None,
) -> list[np.ndarray]:
  """Groups example indices into rows of at most `capacity` tokens, fullest first.

  Examples are placed longest first; `order` (a permutation of the indices) breaks ties
  between equal lengths, so a shuffled order gives different rows for the same lengths.
  """
  lengths = np.asarray(lengths, np.int64)
  if order is None:
    order = np.arange(len(lengths))
  if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
    raise ValueError(
      f"packing needs example lengths in [1, {capacity}], got {lengths.min()}..{lengths.max()}:"
      " truncate to max_seq_len first."
    )
  order = np.asarray(order)
  by_length = order[np.argsort(-lengths[order], kind="stable")]
  placed = lengths[by_length].tolist()
  if algorithm == "ffd":
    bins = _first_fit(placed, capacity)
  elif algorithm == "bfd":
    bins = _best_fit(placed, capacity)
  else:
    raise ConfigError(f"data.packing_algorithm: unknown {algorithm!r}; use 'ffd' or 'bfd'.")
  rows: list[list[int]] = [[] for _ in range(max(bins, default=-1) + 1)]
  for example, row in zip(by_length.tolist(), bins):
    rows[row].append(example)
  return [np.asarray(r, np.int64) for r in rows]


def _first_fit(lengths: list[int], capacity: int) -> list[int]:
  """Row of each item: the lowest-numbered row with room (a max segment tree over rows)."""
  size = 1
  while size < max(len(lengths), 1):
    size *= 2
  room = [capacity] * (2 * size)  # room[size + r] is row r's free space; parents hold maxima.
  rows = []
  for length in lengths:
    node = 1
    while node < size:
      node = 2 * node if room[2 * node] >= length else 2 * node + 1
    rows.append(node - size)
    room[node] -= length
    node //= 2
    while node:
      room[node] = max(room[2 * node], room[2 * node + 1])
      node //= 2
  return rows


def _best_fit(lengths: list[int], capacity: int) -> list[int]:
  """Row of each item: the row with the least room that still fits it (ties: lowest row)."""
  open_rows: list[tuple[int, int]] = []  # sorted (room, row) of rows with room left
  rows = []
  num_rows = 0
  for length in lengths:
    j = bisect.bisect_left(open_rows, (length, -1))
    if j == len(open_rows):
      row, room = num_rows, capacity
      num_rows += 1
    else:
      room, row = open_rows.pop(j)
    rows.append(row)
    if room - length > 0:
      bisect.insort(open_rows, (room - length, row))
  return rows


def efficiency(lengths: Sequence[int] | np.ndarray, num_rows: int, row_length: int) -> float:
  """Non-padding tokens over all tokens of `num_rows` rows of `row_length`."""
  total = num_rows * row_length
  return float(np.sum(lengths)) / total if total else 0.0


def bucket_lengths(configured: Sequence[int], max_seq_len: int) -> tuple[int, ...]:
  """The row lengths unpacked batches may have: the configured ones plus max_seq_len."""
  if not configured:
    configured = [64 * 2**k for k in range(32) if 64 * 2**k < max_seq_len]
  too_long = [b for b in configured if not 0 < b <= max_seq_len]
  if too_long:
    raise ConfigError(
      f"data.bucket_lengths: {too_long} outside 1..max_seq_len ({max_seq_len}); drop them or raise data.max_seq_len."
    )
  return tuple(sorted(set(configured) | {max_seq_len}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `length` tokens."""
  i = bisect.bisect_left(buckets, length)
  if i == len(buckets):
    raise ValueError(f"no bucket holds {length} tokens (buckets {list(buckets)}).")
  return buckets[i]


def collate(
  rows: Sequence[Sequence[Example]], length: int, optional: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
  """A batch of `len(rows)` rows of `length`, each row the concatenation of its examples' sequences.

  optional: which of `OPTIONAL_KEYS` the batch has; None: those that some example carries. A loader names
  them, so that every batch of a split has the same keys, even one of padding rows alone.
  """
  rows = [[Example(*example) for example in row] for row in rows]
  examples = [example for row in rows for example in row]
  if optional is None:
    optional = [k for k, some in zip(OPTIONAL_KEYS, _carried(examples)) if some]
  batch = {k: np.zeros((len(rows), length), np.int32) for k in BATCH_KEYS}
  if "labels" in optional:
    batch["labels"] = np.zeros((len(rows), length), np.int32)
  if "ref_logps" in optional:
    if not all(e.ref_logps is not None for e in examples):
      raise ValueError("ref_logps asked for, but some examples of the batch carry none.")
    batch["ref_logps"] = np.zeros((len(rows), length), np.float32)
  for r, row in enumerate(rows):
    start, segment = 0, 0
    for example in row:
      end = start + len(example.input_ids)
      if end > length:
        raise ValueError(f"row {r} holds {end} tokens, more than its length {length}.")
      batch["input_ids"][r, start:end] = example.input_ids
      batch["loss_mask"][r, start:end] = example.loss_mask
      if "labels" in batch and example.label >= 0:
        batch["labels"][r, start:end] = LABEL_IDS[example.label]
      if "ref_logps" in batch:
        batch["ref_logps"][r, start:end] = example.ref_logps
      bounds = (start, start + example.parts, end) if example.parts else (start, end)
      for a, b in zip(bounds[:-1], bounds[1:]):
        segment += 1
        batch["segment_ids"][r, a:b] = segment
        batch["positions"][r, a:b] = np.arange(b - a)
      start = end
  return batch


def _carried(examples: Sequence[Example]) -> tuple[bool, bool]:
  """Whether some example carries a label, and ref_logps (`OPTIONAL_KEYS`' order)."""
  return any(e.label >= 0 for e in examples), any(e.ref_logps is not None for e in examples)


def unpack(batch: dict[str, np.ndarray], *, pairs: bool = False) -> list[dict[str, np.ndarray]]:
  """Every example of a batch, in row and segment order: its input_ids, loss_mask, positions, the optional
  keys the batch has, and parts.

  pairs: the batch holds two-sequence examples, so segments 2k+1 and 2k+2 of a row are one example (parts =
  the first one's length); otherwise every segment is an example of its own (parts 0).
  """
  keys = ("input_ids", "loss_mask", "positions") + tuple(k for k in OPTIONAL_KEYS if k in batch)
  examples = []
  for r in range(batch["segment_ids"].shape[0]):
    segments = batch["segment_ids"][r]
    step = 2 if pairs else 1
    for segment in range(1, int(segments.max(initial=0)) + 1, step):
      first = segments == segment
      where = (first | (segments == segment + 1)) if pairs else first
      example = {k: batch[k][r, where] for k in keys}
      example["parts"] = int(first.sum()) if pairs else 0
      examples.append(example)
  return examples
