"""Packing: first/best-fit decreasing against plain reference loops; rows unpack exactly."""

import numpy as np
import pytest

from jaxtune.data import packing

from test_pipeline_helpers import make_examples


def _reference(lengths, capacity, best: bool):
  """Textbook FFD/BFD: scan every row for each item, longest item first (ties: lower index)."""
  rows, room = [], []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
    if best and fits:
      fits = [min(fits, key=lambda r: (room[r], r))]
    if not fits:
      rows.append([])
      room.append(capacity)
      fits = [len(rows) - 1]
    rows[fits[0]].append(i)
    room[fits[0]] -= lengths[i]
  return rows


@pytest.mark.parametrize("algorithm", ["ffd", "bfd"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_matches_reference(algorithm, seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 100, size=300).tolist()
  rows = packing.pack(lengths, 128, algorithm)
  assert [r.tolist() for r in rows] == _reference(lengths, 128, best=algorithm == "bfd")
  assert sorted(np.concatenate(rows).tolist()) == list(range(300))
  assert max(sum(lengths[i] for i in r) for r in rows) <= 128


def test_ffd_and_bfd_differ_and_report_efficiency():
  # 8 and 6 open rows 0 and 1 (room 2 and 4) and the 3 fits only row 1. The 1 then goes to
  # the first row with room under FFD (row 0) but to the tightest under BFD (row 1, room 1).
  lengths = [8, 6, 3, 1]
  assert [r.tolist() for r in packing.pack(lengths, 10, "ffd")] == [[0, 3], [1, 2]]
  assert [r.tolist() for r in packing.pack(lengths, 10, "bfd")] == [[0], [1, 2, 3]]
  assert packing.efficiency(lengths, 2, 10) == pytest.approx(0.9)


@pytest.mark.parametrize("algorithm", ["ffd", "bfd"])
def test_efficiency_on_many_short_examples(algorithm):
  lengths = np.random.default_rng(0).integers(1, 512, size=2000)
  rows = packing.pack(lengths, 1024, algorithm)
  lower_bound = -(-int(lengths.sum()) // 1024)  # no packing beats total / capacity rows
  assert lower_bound <= len(rows) <= lower_bound + 2
  assert packing.efficiency(lengths, len(rows), 1024) > 0.99


def test_pack_rejects_too_long_and_unknown_algorithm():
  with pytest.raises(ValueError, match="truncate"):
    packing.pack([5, 11], 10)
  with pytest.raises(ValueError, match="packing_algorithm"):
    packing.pack([5], 10, "nfd")


def test_order_breaks_ties_only():
  lengths = [3, 3, 3, 5]
  a = packing.pack(lengths, 6, order=np.array([0, 1, 2, 3]))
  b = packing.pack(lengths, 6, order=np.array([2, 1, 0, 3]))
  assert [r.tolist() for r in a] == [[3], [0, 1], [2]]
  assert [r.tolist() for r in b] == [[3], [2, 1], [0]]


@pytest.mark.parametrize("algorithm", ["ffd", "bfd"])
def test_packed_rows_unpack_to_the_examples(algorithm):
  """Every example's tokens, mask and positions come back exactly from the packed rows."""
  examples = make_examples(np.random.default_rng(3).integers(1, 40, size=50))
  rows = packing.pack(examples.lengths, 64, algorithm)
  batch = packing.collate([[examples[i] for i in row] for row in rows], 64)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
    k: ((len(rows), 64), np.int32) for k in packing.BATCH_KEYS
  }
  recovered = packing.unpack(batch)
  order = np.concatenate(rows)
  assert len(recovered) == len(examples)
  for i, got in zip(order, recovered):
    ids, mask = examples[i]
    np.testing.assert_array_equal(got["input_ids"], ids)
    np.testing.assert_array_equal(got["loss_mask"], mask)
    np.testing.assert_array_equal(got["positions"], np.arange(len(ids)))
  # Unpacked, one example per row: the same examples, padded differently.
  single = packing.collate([[examples[i]] for i in order], 64)
  for a, b in zip(packing.unpack(single), recovered):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Segments are contiguous 1, 2, ... then padding; padding is all zeros.
  for segments in batch["segment_ids"]:
    used = segments[segments > 0]
    assert (np.diff(used) >= 0).all() and used[0] == 1 and (segments[len(used) :] == 0).all()
  pad = batch["segment_ids"] == 0
  assert not batch["input_ids"][pad].any() and not batch["loss_mask"][pad].any()
  assert not batch["positions"][pad].any()
  assert packing.efficiency(examples.lengths, len(rows), 64) == pytest.approx(1 - pad.mean())


def test_bucket_lengths():
  assert packing.bucket_lengths((), 300) == (64, 128, 256, 300)
  assert packing.bucket_lengths((512, 128), 1024) == (128, 512, 1024)
  with pytest.raises(ValueError, match="bucket_lengths"):
    packing.bucket_lengths((4096,), 1024)
  assert packing.bucket_for(129, (128, 512)) == 512
  assert packing.bucket_for(128, (128, 512)) == 128
