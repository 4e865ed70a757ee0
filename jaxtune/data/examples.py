"""Tokenised examples stored flat, and their cache file on disk.

An example is one sequence (SFT, continued pre-training) or two sequences stored back to back (a
preference pair: prompt + chosen, then prompt + rejected; a KTO example: prompt + completion, then its KL
sequence, the same prompt + another record's completion). `parts` tells them apart: the first sequence's
length, 0 for a one-sequence example. Whatever moves examples (splitting, mixing, shuffling, packing)
moves a pair as one unit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

KINDS = ("sft", "pairs", "kto")


@dataclasses.dataclass
class Examples:
  """Tokenised examples stored flat: example i spans offsets[i]:offsets[i + 1]."""

  input_ids: np.ndarray  # int32 [tokens]
  loss_mask: np.ndarray  # int8 [tokens], 1 = the token is a target
  offsets: np.ndarray  # int64 [n + 1]
  keys: np.ndarray  # uint64 [n]: digest of each record's content; orders the splits
  locations: list[str]  # where each example came from, e.g. "train.jsonl:12"
  parts: np.ndarray | None = None  # int64 [n]: tokens of the first of two sequences; 0: one sequence
  labels: np.ndarray | None = None  # int8 [n]: KTO 1 desirable, 0 undesirable; -1 for everything else
  ref_logps: np.ndarray | None = None  # float32 [tokens]: reference log-probs, when precomputed

  def __post_init__(self):
    n = len(self.offsets) - 1
    self.parts = np.zeros(n, np.int64) if self.parts is None else np.asarray(self.parts, np.int64)
    self.labels = np.full(n, -1, np.int8) if self.labels is None else np.asarray(self.labels, np.int8)
    if self.ref_logps is not None:
      self.ref_logps = np.asarray(self.ref_logps, np.float32)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    start, end = self.offsets[i], self.offsets[i + 1]
    return self.input_ids[start:end], self.loss_mask[start:end]

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  @property
  def kind(self) -> str | None:
    """The kind of data: "kto" (labelled), "pairs" (two sequences) or "sft"; None when there are no examples."""
    if not len(self):
      return None
    if (self.labels >= 0).any():
      return "kto"
    return "pairs" if (self.parts > 0).any() else "sft"

  @classmethod
  def from_items(cls, items: Sequence[tuple]) -> Examples:
    """Examples from (input_ids, loss_mask, key, location) or (..., parts, label) tuples."""
    lengths = [len(ids) for ids, *_ in items]
    return cls(
      input_ids=np.concatenate([item[0] for item in items] or [[]]).astype(np.int32),
      loss_mask=np.concatenate([item[1] for item in items] or [[]]).astype(np.int8),
      offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
      keys=np.asarray([item[2] for item in items], np.uint64),
      locations=[item[3] for item in items],
      parts=np.asarray([item[4] if len(item) > 4 else 0 for item in items], np.int64),
      labels=np.asarray([item[5] if len(item) > 5 else -1 for item in items], np.int8),
    )

  @classmethod
  def concat(cls, parts: Sequence[Examples]) -> Examples:
    """All examples of `parts`, in order."""
    bases = np.cumsum([0] + [len(p.input_ids) for p in parts])
    with_ref = [p.ref_logps is not None for p in parts]
    if any(with_ref) and not all(with_ref):
      raise ValueError("cannot concatenate examples with and without ref_logps")
    return cls(
      input_ids=np.concatenate([p.input_ids for p in parts] or [np.zeros(0, np.int32)]),
      loss_mask=np.concatenate([p.loss_mask for p in parts] or [np.zeros(0, np.int8)]),
      offsets=np.concatenate([[0]] + [p.offsets[1:] + b for p, b in zip(parts, bases)]),
      keys=np.concatenate([p.keys for p in parts] or [np.zeros(0, np.uint64)]),
      locations=[loc for p in parts for loc in p.locations],
      parts=np.concatenate([p.parts for p in parts] or [np.zeros(0, np.int64)]),
      labels=np.concatenate([p.labels for p in parts] or [np.zeros(0, np.int8)]),
      ref_logps=np.concatenate([p.ref_logps for p in parts]) if parts and all(with_ref) else None,
    )

  def windows(self, indices: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Examples:
    """Examples `indices`, example indices[j] cut to its tokens starts[j]:ends[j] (absolute).

    A two-sequence example is never cut: its sequences are trained against each other.
    """
    indices = np.asarray(indices, np.int64)
    cut = (self.parts[indices] > 0) & ((starts != self.offsets[indices]) | (ends != self.offsets[indices + 1]))
    if cut.any():
      raise ValueError(f"{self.locations[indices[np.argmax(cut)]]}: a two-sequence example cannot be cut")
    lengths = (ends - starts).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return Examples(
      self.input_ids[gather],
      self.loss_mask[gather],
      offsets,
      self.keys[indices],
      [self.locations[i] for i in indices],
      self.parts[indices],
      self.labels[indices],
      None if self.ref_logps is None else self.ref_logps[gather],
    )

  def select(self, indices: np.ndarray) -> Examples:
    """The examples at `indices`, in that order."""
    indices = np.asarray(indices, np.int64)
    return self.windows(indices, self.offsets[indices], self.offsets[indices + 1])


def save(path: pathlib.Path, examples: Examples, meta: dict) -> None:
  """Writes a cache file atomically, so an interrupted run leaves no half-written entry."""
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = {**meta, "locations": examples.locations}
  arrays = {name: getattr(examples, name) for name in ("input_ids", "loss_mask", "offsets", "keys", "parts", "labels")}
  if examples.ref_logps is not None:
    arrays["ref_logps"] = examples.ref_logps
  tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
  np.savez(tmp, **arrays, meta=np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8))
  os.replace(tmp, path)


def load(path: pathlib.Path) -> tuple[Examples, dict]:
  """The examples of a cache file and the rest of what `save` was given."""
  with np.load(path) as f:
    meta = json.loads(f["meta"].tobytes())
    arrays = {name: f[name] for name in f.files if name != "meta"}
  return Examples(**arrays, locations=meta.pop("locations")), meta
