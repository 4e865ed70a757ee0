"""The grain loader: exact resume, host sharding, shuffling, buckets, evaluation, mixing."""

import json

import grain
import numpy as np
import pytest

from jaxtune.data import loader, packing

from test_pipeline_helpers import data_cfg, make_examples, make_split

LENGTHS = np.random.default_rng(0).integers(2, 60, size=90)


def _cfg(tmp_path, **overrides):
  settings = dict(train=("synthetic",), max_seq_len=64, batch_size=4, num_epochs=3, seed=7)
  return data_cfg(tmp_path, **{**settings, **overrides})


def _batches(it, n=None):
  out = []
  for batch in it:
    out.append(batch)
    if n is not None and len(out) == n:
      break
  return out


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("packed", [True, False])
def test_resume_yields_the_same_batches_across_epochs(tmp_path, packed):
  cfg = _cfg(tmp_path, packing=packed)
  split = make_split([make_examples(LENGTHS)])
  full = _batches(loader.loader_for(split, cfg))
  per_epoch = loader.loader_for(split, cfg).stats.batches_per_epoch
  assert len(full) >= 3 * per_epoch - 2  # packed epochs may differ by a row or so
  for stop in (1, per_epoch - 1, per_epoch, per_epoch + 2):  # around the first epoch boundary
    it = loader.loader_for(split, cfg)
    head = _batches(it, stop)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
    resumed = loader.loader_for(split, cfg)
    resumed.set_state(state)
    _same(head + _batches(resumed), full)


def test_two_processes_split_each_global_batch_and_resume(tmp_path):
  cfg = _cfg(tmp_path, packing=False, num_epochs=2)
  split = make_split([make_examples(LENGTHS)])
  whole = _batches(loader.loader_for(split, cfg))
  hosts = [_batches(loader.loader_for(split, cfg, process_index=p, process_count=2)) for p in (0, 1)]
  assert len(hosts[0]) == len(hosts[1]) == len(whole)
  for g, h0, h1 in zip(whole, *hosts):
    assert h0["input_ids"].shape[0] == 2
    for key in g:
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), g[key])
  # Each host resumes from its own state; a run saved on 2 hosts may resume on 1.
  it = loader.loader_for(split, cfg, process_index=1, process_count=2)
  _batches(it, 5)
  resumed = loader.loader_for(split, cfg, process_index=1, process_count=2)
  resumed.set_state(it.get_state())
  _same(_batches(resumed), hosts[1][5:])
  single = loader.loader_for(split, cfg)
  single.set_state(it.get_state())
  _same(_batches(single), whole[5:])


def test_state_round_trips_through_grains_orbax_handler(tmp_path):
  from etils import epath

  cfg = _cfg(tmp_path)
  split = make_split([make_examples(LENGTHS)])
  full = _batches(loader.loader_for(split, cfg))
  it = loader.loader_for(split, cfg)
  head = _batches(it, 7)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  resumed = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=loader.loader_for(split, cfg))
  _same(head + _batches(resumed), full)


def test_shuffle_is_deterministic_by_seed(tmp_path):
  split = make_split([make_examples(LENGTHS)])
  a = _batches(loader.loader_for(split, _cfg(tmp_path)))
  _same(a, _batches(loader.loader_for(split, _cfg(tmp_path))))
  b = _batches(loader.loader_for(split, _cfg(tmp_path, seed=8)))
  assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_state_from_other_settings_is_refused(tmp_path):
  split = make_split([make_examples(LENGTHS)])
  state = loader.loader_for(split, _cfg(tmp_path)).get_state()
  with pytest.raises(ValueError, match="different data"):
    loader.loader_for(split, _cfg(tmp_path, batch_size=2)).set_state(state)


def test_packed_batches_have_max_seq_len_and_cover_each_epoch(tmp_path):
  cfg = _cfg(tmp_path, num_epochs=1, batch_size=2, packing_algorithm="bfd")
  examples = make_examples(LENGTHS)
  it = loader.loader_for(make_split([examples]), cfg)
  batches = _batches(it)
  assert {(k, b[k].shape, b[k].dtype) for b in batches for k in b} == {
    (k, (2, 64), np.dtype(np.int32)) for k in packing.BATCH_KEYS
  }
  seen = [tuple(e["input_ids"]) for b in batches for e in packing.unpack(b)]
  everything = {tuple(examples[i][0]) for i in range(len(examples))}
  assert len(seen) == len(set(seen)) and set(seen) <= everything
  assert len(seen) >= len(examples) - 2 * 2 * 2  # only the last incomplete batch is dropped
  tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  assert it.stats.packing_efficiency == pytest.approx(tokens / (len(batches) * 2 * 64))
  assert it.stats.batches_per_epoch == len(batches)
  assert it.longest_row == 64


def test_unpacked_batches_use_only_bucket_lengths(tmp_path):
  cfg = _cfg(tmp_path, packing=False, bucket_lengths=(16, 32), num_epochs=2)
  it = loader.loader_for(make_split([make_examples(LENGTHS)]), cfg)
  batches = _batches(it)
  assert {b["input_ids"].shape[1] for b in batches} <= {16, 32, 64}
  assert it.longest_row == max(b["input_ids"].shape[1] for b in batches) == 64  # examples up to 59 tokens
  short = loader.loader_for(make_split([make_examples(np.minimum(LENGTHS, 30))]), cfg)
  assert short.longest_row == 32  # what the train step is compiled and memory-checked for first
  for b in batches:
    assert (b["segment_ids"].max(axis=1) == 1).all()
    lengths = (b["segment_ids"] > 0).sum(axis=1)
    assert packing.bucket_for(int(lengths.max()), (16, 32, 64)) == b["input_ids"].shape[1]


def test_evaluation_reads_every_example_once_in_order(tmp_path):
  examples = make_examples(LENGTHS[:10])
  it = loader.loader_for(make_split([examples], "validation"), _cfg(tmp_path, packing=False))
  batches = _batches(it)
  assert len(batches) == 3  # 10 examples in batches of 4; the last holds 2 empty rows
  got = [tuple(e["input_ids"]) for b in batches for e in packing.unpack(b)]
  assert got == [tuple(examples[i][0]) for i in range(10)]
  assert not batches[-1]["segment_ids"][2:].any()


def test_weights_set_each_sources_share_of_an_epoch(tmp_path):
  small, large = make_examples([8] * 10, seed=1), make_examples([8] * 30, seed=2)
  cfg = _cfg(tmp_path, packing=False, weights=(3.0, 1.0), batch_size=40, num_epochs=2)
  batches = _batches(loader.loader_for(make_split([small, large]), cfg))
  assert len(batches) == 2  # an epoch still holds 40 examples
  ids_small = {tuple(small[i][0]) for i in range(10)}
  for b in batches:
    from_small = [tuple(e["input_ids"]) in ids_small for e in packing.unpack(b)]
    assert sum(from_small) == 30  # 3/4 of 40: every small example three times
  with pytest.raises(ValueError, match="weights"):
    loader.loader_for(make_split([small, large]), _cfg(tmp_path, weights=(1.0,)))


def test_too_little_data_for_a_batch_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="batch_size"):
    loader.loader_for(make_split([make_examples([8, 8])]), _cfg(tmp_path, packing=False))
  with pytest.raises(ValueError, match="processes"):
    loader.loader_for(make_split([make_examples(LENGTHS)]), _cfg(tmp_path), process_count=3)


def test_forever_repeats_past_the_epochs(tmp_path):
  cfg = _cfg(tmp_path, num_epochs=0, packing=False)
  it = loader.loader_for(make_split([make_examples(LENGTHS)]), cfg)
  assert len(_batches(it, 5 * it.stats.batches_per_epoch)) == 5 * it.stats.batches_per_epoch
  assert it.get_state()["epoch"] == 4
