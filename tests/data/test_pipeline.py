"""Tokenising sources: splits, the cache, truncation, skips, parallel workers."""

import json

import numpy as np
import pytest

from jaxtune.data import pipeline
from jaxtune.data.records import DataError, SkipReport

from test_pipeline_helpers import data_cfg, make_examples, tiny_tokenizer, write_chats


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer()


def _cfg(tmp_path, source, **overrides):
  return data_cfg(tmp_path, **{"train": (str(source),), "max_seq_len": 256, **overrides})


def _locations(data):
  return [loc for part in data.examples for loc in part.locations]


def test_split_indices_are_stable_disjoint_and_sized():
  keys = np.random.default_rng(0).integers(0, 2**63, size=1000).astype(np.uint64)
  a = pipeline.split_indices(keys, 3, 0.1, 0.05)
  b = pipeline.split_indices(keys.copy(), 3, 0.1, 0.05)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert [len(a[k]) for k in ("train", "validation", "test")] == [850, 100, 50]
  assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(1000))
  # A split follows the record, not its position in the file.
  perm = np.random.default_rng(1).permutation(1000)
  shuffled = pipeline.split_indices(keys[perm], 3, 0.1, 0.05)
  assert set(keys[perm][shuffled["validation"]]) == set(keys[a["validation"]])
  other_seed = pipeline.split_indices(keys, 4, 0.1, 0.05)
  assert set(other_seed["validation"]) != set(a["validation"])
  assert len(pipeline.split_indices(keys[:5], 0, 0.01, 0.0)["validation"]) == 1


def test_splits_of_a_file_are_disjoint_and_stable_across_runs(tmp_path, tokenizer):
  source = write_chats(tmp_path / "chats.jsonl", 60)
  cfg = _cfg(tmp_path, source, validation_fraction=0.2, test_fraction=0.1)
  splits = {s: _locations(pipeline.load_split(cfg, tokenizer, s)) for s in pipeline.SPLITS}
  assert [len(splits[s]) for s in pipeline.SPLITS] == [42, 12, 6]
  everything = [loc for s in pipeline.SPLITS for loc in splits[s]]
  assert sorted(everything) == sorted(f"{source}:{i}" for i in range(1, 61))
  cfg.cache_dir = ""  # a fresh run, tokenising again
  again = {s: _locations(pipeline.load_split(cfg, tokenizer, s)) for s in pipeline.SPLITS}
  assert again == splits


def test_separate_validation_source(tmp_path, tokenizer):
  train = write_chats(tmp_path / "train.jsonl", 20)
  validation = write_chats(tmp_path / "validation.jsonl", 5, seed=1)
  cfg = _cfg(tmp_path, train, validation=(str(validation),), test_fraction=0.1)
  assert len(_locations(pipeline.load_split(cfg, tokenizer, "validation"))) == 5
  assert len(_locations(pipeline.load_split(cfg, tokenizer, "train"))) == 18
  cfg.validation_fraction = 0.1
  with pytest.raises(ValueError, match="validation_fraction"):
    pipeline.load_split(cfg, tokenizer, "train")


def test_cache_hits_and_misses(tmp_path, tokenizer):
  source = write_chats(tmp_path / "chats.jsonl", 30)
  cfg = _cfg(tmp_path, source)
  first = pipeline.load_split(cfg, tokenizer)
  second = pipeline.load_split(cfg, tokenizer)
  assert (first.stats.cached_sources, second.stats.cached_sources) == (0, 1)
  for name in ("input_ids", "loss_mask", "offsets", "keys", "locations"):
    np.testing.assert_array_equal(getattr(first.examples[0], name), getattr(second.examples[0], name))
  assert first.fingerprint == second.fingerprint
  # Settings applied after the cache do not invalidate it.
  cfg.max_seq_len = 128
  cfg.validation_fraction = 0.1
  assert pipeline.load_split(cfg, tokenizer).stats.cached_sources == 1
  # Templating settings, the tokenizer and the data do.
  cfg.train_on = "all"
  assert pipeline.load_split(cfg, tokenizer).stats.cached_sources == 0
  other_template = tiny_tokenizer(chat_template=tokenizer.chat_template.replace("\n", "\n\n"))
  assert pipeline.load_split(cfg, other_template).stats.cached_sources == 0
  assert pipeline.load_split(cfg, tokenizer).stats.cached_sources == 1
  with open(source, "a") as f:
    f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
  assert pipeline.load_split(cfg, tokenizer).stats.cached_sources == 0


def test_skipped_records_are_counted_and_kept_in_the_cache(tmp_path, tokenizer):
  source = write_chats(tmp_path / "chats.jsonl", 10)
  with open(source, "a") as f:
    f.write("{not json\n")
    f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  cfg = _cfg(tmp_path, source, on_error="skip")
  for cached in (0, 1):
    data = pipeline.load_split(cfg, tokenizer)
    assert data.stats.cached_sources == cached
    assert dict(data.stats.skipped.counts) == {"invalid JSON": 1, "ends on user turn": 1}
    assert data.stats.examples == 10
  cfg.on_error = "raise"
  with pytest.raises(DataError, match=":11: line: invalid JSON"):
    pipeline.load_split(cfg, tokenizer)


def test_truncation_policies_and_drop_counts():
  examples = make_examples([10, 30, 30])  # trained from token 3, 10 and 10 on
  examples.loss_mask[:] = 0
  examples.loss_mask[5:10] = 1  # example 0: tokens 5..9
  examples.loss_mask[10 + 25 : 40] = 1  # example 1: only its last 5 tokens
  examples.loss_mask[40:70] = 1  # example 2: every token

  report = SkipReport()
  kept, truncated = pipeline.fit_to_length(examples, 20, "right", report)
  assert kept.locations == ["synthetic:1", "synthetic:3"] and truncated == 1
  assert list(report.counts.values()) == [1] and "within the first max_seq_len" in str(report.examples)
  assert kept.lengths.tolist() == [10, 20]
  np.testing.assert_array_equal(kept[1][0], examples[2][0][:20])
  assert kept[1][1][0] == 0 and kept[1][1][1:].all()  # the first token is never a target

  report = SkipReport()
  kept, truncated = pipeline.fit_to_length(examples, 20, "left", report)
  assert len(kept) == 3 and truncated == 2 and not report.counts
  np.testing.assert_array_equal(kept[1][0], examples[1][0][-20:])

  report = SkipReport()
  kept, truncated = pipeline.fit_to_length(examples, 20, "drop", report)
  assert kept.locations == ["synthetic:1"] and truncated == 0
  assert sum(report.counts.values()) == 2


def test_statistics(tmp_path, tokenizer):
  source = write_chats(tmp_path / "chats.jsonl", 20, max_turns=3)
  stats = pipeline.load_split(_cfg(tmp_path, source, max_seq_len=64), tokenizer).stats
  assert stats.records == 20 and stats.examples + sum(stats.skipped.counts.values()) == 20
  assert 0 < stats.truncated and 0 < stats.trainable_fraction < 1
  assert "trainable tokens" in stats.summary()


def test_parallel_workers_match_in_process(tmp_path, tokenizer, monkeypatch):
  source = write_chats(tmp_path / "chats.jsonl", 40)
  serial = pipeline.load_split(_cfg(tmp_path, source, cache_dir=""), tokenizer)
  monkeypatch.setattr(pipeline, "PARALLEL_MIN_RECORDS", 8)
  monkeypatch.setattr(pipeline, "_CHUNK", 4)
  parallel = pipeline.load_split(_cfg(tmp_path, source, cache_dir="", num_workers=2), tokenizer)
  for name in ("input_ids", "loss_mask", "offsets", "keys", "locations"):
    np.testing.assert_array_equal(getattr(serial.examples[0], name), getattr(parallel.examples[0], name))


def test_settings_are_checked(tmp_path, tokenizer):
  source = write_chats(tmp_path / "chats.jsonl", 3)
  for key, value, message in [
    ("train_on", "users", "train_on"),
    ("truncation", "middle", "truncation"),
    ("test_fraction", 1.0, "fraction"),
    ("train", (), "data.train"),
  ]:
    with pytest.raises(ValueError, match=message):
      pipeline.load_split(_cfg(tmp_path, source, **{key: value}), tokenizer)
