"""Packing examples into fixed-length rows, bucket lengths, and collating rows into batches.

A batch is a dict of int32 [B, T] arrays:
  input_ids    token ids; 0 on padding.
  loss_mask    1 where input_ids[:, t] is a target (predicted from position t - 1).
  segment_ids  1, 2, ... for the examples of a row in order; 0 on padding.
  positions    0, 1, ... restarting at every segment; 0 on padding.
"""

import bisect
from collections.abc import Sequence

import numpy as np

from jaxtune.errors import ConfigError

Example = tuple[np.ndarray, np.ndarray]  # (input_ids, loss_mask) of one example
BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


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


def collate(rows: Sequence[Sequence[Example]], length: int) -> dict[str, np.ndarray]:
  """A batch of `len(rows)` rows of `length`, each row the concatenation of its examples."""
  batch = {k: np.zeros((len(rows), length), np.int32) for k in BATCH_KEYS}
  for r, row in enumerate(rows):
    start = 0
    for segment, (ids, mask) in enumerate(row, start=1):
      end = start + len(ids)
      if end > length:
        raise ValueError(f"row {r} holds {end} tokens, more than its length {length}.")
      batch["input_ids"][r, start:end] = ids
      batch["loss_mask"][r, start:end] = mask
      batch["segment_ids"][r, start:end] = segment
      batch["positions"][r, start:end] = np.arange(end - start)
      start = end
  return batch


def unpack(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """Every example of a batch, in row and segment order, with its input_ids, loss_mask, positions."""
  examples = []
  for r in range(batch["segment_ids"].shape[0]):
    segments = batch["segment_ids"][r]
    for segment in range(1, int(segments.max(initial=0)) + 1):
      where = segments == segment
      examples.append({k: batch[k][r, where] for k in ("input_ids", "loss_mask", "positions")})
  return examples
