"""Preference and KTO examples stored and served: KL sequences, examples and the cache, batches packed and unpacked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxtune.data import loader, packing, pipeline
from jaxtune.data.examples import Examples
from jaxtune.data.records import DataError, SkipReport
from jaxtune.errors import ConfigError

from test_pipeline_helpers import cfg_for, decoded, kto_rows, pair_rows, sequences, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer()


# ----------------------------------------------------------------------------------------------------------------
# KTO's KL sequences


@pytest.mark.parametrize(
  "batch_size, partners", [(3, [2, 0, 1, 6, 3, 4, 5]), (1, [1, 0, 3, 2, 6, 4, 5]), (8, [6, 0, 1, 2, 3, 4, 5])]
)
def test_kl_sequences_rotate_completions_within_groups_of_batch_size(tmp_path, tokenizer, batch_size, partners):
  path = write_jsonl(tmp_path / "k.jsonl", kto_rows(7))
  data = pipeline.load_split(cfg_for(tmp_path, path, batch_size=batch_size), tokenizer)
  (examples,) = data.examples
  assert data.kind == "kto" and examples.labels.tolist() == [1, 0, 1, 1, 0, 1, 1]
  for i, j in enumerate(partners):
    (completion, mask), (kl, kl_mask) = sequences(examples, i)
    prompt = int(np.argmax(mask))
    assert decoded(tokenizer, completion[mask == 1]) == f"ran quickly {i}<|im_end|>"
    assert decoded(tokenizer, kl[kl_mask == 1]) == f"ran quickly {j}<|im_end|>"  # the KL completion is trained too
    np.testing.assert_array_equal(kl[:prompt], completion[:prompt])
    assert f"the dog {i}<" in decoded(tokenizer, kl) and kl_mask[:prompt].sum() == 0


# ----------------------------------------------------------------------------------------------------------------
# Storage


def test_examples_keep_parts_labels_and_ref_logps_through_every_operation(tmp_path):
  rng = np.random.default_rng(0)
  items = []
  for i, (a, b) in enumerate([(5, 4), (3, 6), (7, 7)]):
    mask = np.r_[np.zeros(2), np.ones(a - 2), np.zeros(2), np.ones(b - 2)]
    items.append((rng.integers(1, 99, a + b), mask, i, f"s:{i}", a, i % 2))
  examples = Examples.from_items(items)
  examples.ref_logps = -rng.random(len(examples.input_ids)).astype(np.float32)
  both = Examples.concat([examples, examples.select([2, 0])])
  assert both.parts.tolist() == [5, 3, 7, 7, 5] and both.labels.tolist() == [0, 1, 0, 0, 0]
  np.testing.assert_array_equal(both.ref_logps[: both.offsets[3]], examples.ref_logps)
  np.testing.assert_array_equal(
    both.ref_logps[both.offsets[3] :], np.r_[examples.ref_logps[18:], examples.ref_logps[:9]]
  )
  assert both.kind == "kto" and Examples.concat([]).kind is None
  with pytest.raises(ValueError, match="with and without ref_logps"):
    Examples.concat([examples, dataclasses.replace(examples, ref_logps=None)])
  with pytest.raises(ValueError, match="s:1: a two-sequence example cannot be cut"):
    examples.windows(np.array([1]), examples.offsets[1:2], examples.offsets[2:3] - 1)
  # The cache file holds them all.
  pipeline._save(tmp_path / "c.npz", both, SkipReport())
  loaded, _ = pipeline._load(tmp_path / "c.npz")
  for name in ("input_ids", "loss_mask", "offsets", "keys", "parts", "labels", "ref_logps", "locations"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(both, name))
  # fit_to_length never cuts a pair, whatever the policy: it drops and counts it (or raises).
  report = SkipReport()
  kept, cut = pipeline.fit_to_length(examples, 10, "right", report)
  assert kept.locations == ["s:0", "s:1"] and cut == 0 and report.total == 1
  assert kept.loss_mask[[0, 5]].tolist() == [0, 0] and kept.parts.tolist() == [5, 3]
  np.testing.assert_array_equal(kept.ref_logps, examples.ref_logps[:18])
  with pytest.raises(DataError, match="^s:2: record: its two sequences together are longer than max_seq_len"):
    pipeline.fit_to_length(examples, 10, "left", SkipReport(), on_error="raise")


def test_cache_round_trip_and_key(tmp_path, tokenizer):
  path = write_jsonl(tmp_path / "p.jsonl", pair_rows(12))
  cfg = cfg_for(tmp_path, path, validation_fraction=0.25)
  first = pipeline.load_split(cfg, tokenizer)
  second = pipeline.load_split(cfg, tokenizer)
  assert (first.stats.cached_sources, second.stats.cached_sources, first.kind) == (0, 1, "pairs")
  for name in ("input_ids", "loss_mask", "offsets", "keys", "parts", "labels", "locations"):
    np.testing.assert_array_equal(getattr(first.examples[0], name), getattr(second.examples[0], name))
  assert first.fingerprint == second.fingerprint and (first.examples[0].parts > 0).all()
  validation = pipeline.load_split(cfg, tokenizer, "validation")
  assert validation.kind == "pairs" and len(validation.examples[0]) == 3
  assert not set(validation.examples[0].locations) & set(first.examples[0].locations)
  cfg.max_prompt_length = 8
  assert pipeline.load_split(cfg, tokenizer).stats.cached_sources == 0
  cfg.max_completion_length = 8
  assert pipeline.load_split(cfg, tokenizer).stats.cached_sources == 0
  # KTO: batch_size groups the KL sequences after the cache, so it changes the examples, not the cache.
  kto_path = write_jsonl(tmp_path / "k.jsonl", kto_rows(8))
  a = pipeline.load_split(cfg_for(tmp_path, kto_path, batch_size=4), tokenizer)
  b = pipeline.load_split(cfg_for(tmp_path, kto_path, batch_size=2), tokenizer)
  assert b.stats.cached_sources == 1 and a.fingerprint != b.fingerprint
  assert not np.array_equal(a.examples[0].input_ids, b.examples[0].input_ids)


def test_parallel_workers_encode_pairs_like_the_main_process(tmp_path, tokenizer, monkeypatch):
  path = write_jsonl(tmp_path / "p.jsonl", pair_rows(12) + [{"prompt": "p", "chosen": "x", "rejected": "x"}])
  serial = pipeline.load_split(cfg_for(tmp_path, path, cache_dir="", on_error="skip"), tokenizer)
  monkeypatch.setattr(pipeline, "PARALLEL_MIN_RECORDS", 4)
  monkeypatch.setattr(pipeline, "_CHUNK", 4)
  parallel = pipeline.load_split(cfg_for(tmp_path, path, cache_dir="", on_error="skip", num_workers=2), tokenizer)
  for name in ("input_ids", "loss_mask", "offsets", "keys", "parts", "labels", "locations"):
    np.testing.assert_array_equal(getattr(serial.examples[0], name), getattr(parallel.examples[0], name))
  assert dict(parallel.stats.skipped.counts) == {"identical pair": 1}


def test_summary_and_mixed_kinds(tmp_path, tokenizer):
  from test_pipeline_helpers import write_chats

  pair_path = write_jsonl(tmp_path / "p.jsonl", pair_rows(5))
  kto_path = write_jsonl(tmp_path / "k.jsonl", kto_rows(6))
  assert "records 5  pairs 5  tokens" in pipeline.load_split(cfg_for(tmp_path, pair_path), tokenizer).stats.summary()
  summary = pipeline.load_split(cfg_for(tmp_path, kto_path), tokenizer).stats.summary()
  assert "records 6  KTO examples 6 (desirable 4, undesirable 2)  tokens" in summary
  chats = write_chats(tmp_path / "c.jsonl", 4)
  with pytest.raises(ConfigError) as err:
    pipeline.load_split(cfg_for(tmp_path, pair_path, chats), tokenizer)
  assert str(err.value) == (
    f"data.train: the sources of one split hold different kinds of data: {pair_path} (pairs), {chats} (sft); "
    "train on one kind at a time (SFT records, preference pairs, or KTO records)"
  )


# ----------------------------------------------------------------------------------------------------------------
# Batches


def _loaded(tmp_path, tokenizer, rows, **overrides):
  path = write_jsonl(tmp_path / "d.jsonl", rows)
  cfg = cfg_for(tmp_path, path, max_seq_len=128, batch_size=4, shuffle=False, **overrides)
  return pipeline.load_split(cfg, tokenizer), cfg


def _epoch(data, cfg, packed: bool) -> list[dict]:
  cfg.packing = packed
  batches = list(loader.loader_for(data, cfg))
  return batches


@pytest.mark.parametrize("kind", ["pairs", "kto"])
def test_packed_and_unpacked_batches_hold_the_same_pairs_intact(tmp_path, tokenizer, kind):
  data, cfg = _loaded(tmp_path, tokenizer, pair_rows(16) if kind == "pairs" else kto_rows(16))
  (examples,) = data.examples
  by_ids = {examples[i][0].tobytes(): i for i in range(len(examples))}
  recovered = {}
  for packed in (True, False):
    batches = _epoch(data, cfg, packed)
    assert all(set(b) == set(packing.BATCH_KEYS) | ({"labels"} if kind == "kto" else set()) for b in batches)
    got = [e for b in batches for e in packing.unpack(b, pairs=True)]
    for batch in batches:
      for r, segments in enumerate(batch["segment_ids"]):
        used = segments[segments > 0]
        assert used.max(initial=0) % 2 == 0  # whole examples only: 2k segments per row
        for segment in range(1, used.max(initial=0) + 1):
          where = segments == segment
          assert batch["positions"][r, where].tolist() == list(range(where.sum()))
        if kind == "kto":
          labels = batch["labels"][r]
          assert set(labels[segments == 0]) <= {0} and set(labels[segments > 0]) <= {1, 2}
    recovered[packed] = {}
    for e in got:
      i = by_ids[e["input_ids"].tobytes()]
      ids, mask = examples[i]
      np.testing.assert_array_equal(e["loss_mask"], mask)
      assert e["parts"] == examples.parts[i]
      first, second = e["parts"], len(ids) - e["parts"]
      assert e["positions"].tolist() == list(range(first)) + list(range(second))
      if kind == "kto":
        assert set(e["labels"].tolist()) == {1 if examples.labels[i] == 1 else 2}
      recovered[packed][i] = {k: np.asarray(v).tolist() for k, v in e.items()}
  # Every example once per epoch (a training epoch drops the last incomplete batch), identical in both modes.
  common = recovered[True].keys() & recovered[False].keys()
  assert len(common) >= len(examples) - cfg.batch_size
  assert all(recovered[True][i] == recovered[False][i] for i in common)


def test_every_batch_of_a_split_has_the_same_keys_and_ref_logps_flow_through(tmp_path, tokenizer):
  _, cfg = _loaded(tmp_path, tokenizer, kto_rows(10), validation_fraction=0.5, packing=False)
  validation = pipeline.load_split(cfg, tokenizer, "validation")
  (examples,) = validation.examples
  assert len(examples) == 5  # 2 batches of 4 rows: the second holds one example and three padding rows
  examples.ref_logps = -np.arange(len(examples.input_ids), dtype=np.float32)
  keys = set(packing.BATCH_KEYS + packing.OPTIONAL_KEYS)
  hosts = [list(loader.loader_for(validation, cfg, process_index=p, process_count=2)) for p in (0, 1)]
  assert [len(h) for h in hosts] == [2, 2] and all(set(b) == keys for h in hosts for b in h)
  assert not hosts[1][1]["segment_ids"].any()  # padding rows alone, keys all the same
  got = [e for h in zip(*hosts) for b in h for e in packing.unpack(b, pairs=True)]
  assert len(got) == 5
  for i, e in enumerate(got):
    start, end = examples.offsets[i], examples.offsets[i + 1]
    np.testing.assert_array_equal(e["ref_logps"], examples.ref_logps[start:end])
    assert set(e["labels"].tolist()) == {1 if examples.labels[i] == 1 else 2}


def test_collate_segments_labels_and_ref_logps():
  ids = np.arange(1, 10, dtype=np.int32)
  mask = np.array([0, 1, 1, 0, 0, 1, 1, 1, 1], np.int8)
  ref = -np.arange(9, dtype=np.float32)
  rows = [
    [packing.Example(ids, mask, 3, 1, ref), packing.Example(ids[:5], mask[:5], 2, 0, ref[:5])],
    [packing.Example(ids[:4], mask[:4], 2, 1, ref[:4])],
  ]
  batch = packing.collate(rows, 16)
  assert set(batch) == set(packing.BATCH_KEYS + packing.OPTIONAL_KEYS)
  assert batch["segment_ids"].tolist() == [
    [1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 0, 0],
    [1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  ]
  assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 0, 0]
  assert batch["labels"].tolist() == [[1] * 9 + [2] * 5 + [0] * 2, [1] * 4 + [0] * 12]
  assert batch["ref_logps"].dtype == np.float32 and batch["ref_logps"][0, 9:14].tolist() == ref[:5].tolist()
  assert batch["ref_logps"][1, 4:].tolist() == [0.0] * 12
  # SFT examples (plain tuples) get the four int keys only, one segment each.
  plain = packing.collate([[(ids, mask), (ids[:3], mask[:3])]], 16)
  assert set(plain) == set(packing.BATCH_KEYS) and plain["segment_ids"][0].max() == 2
  assert [e["parts"] for e in packing.unpack(batch, pairs=True)] == [3, 2, 2]
  with pytest.raises(ValueError, match="ref_logps"):
    packing.collate([[packing.Example(ids, mask, 3, 1, ref), (ids, mask)]], 32)
