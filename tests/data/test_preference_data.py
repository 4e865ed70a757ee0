"""Preference pairs and KTO records: formats, masks against real templates, truncation, bad input, KL sequences,
storage, and the batches the train step reads."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from jaxtune.data import chat, loader, packing, pipeline, preference
from jaxtune.data.examples import Examples
from jaxtune.data.records import DataError, Record, SkipReport, read_records
from jaxtune.errors import ConfigError

from test_pipeline_helpers import data_cfg, tiny_tokenizer

SYSTEM = {"role": "system", "content": "Answer briefly."}
PROMPT = [SYSTEM, {"role": "user", "content": "What is two plus two?"}]
GOOD = {"role": "assistant", "content": "Two plus two is four."}
BAD = {"role": "assistant", "content": "Hello there!"}
# Templates and the tokenizer family that knows their special tokens ("chatml": the byte-level ChatML tokenizer).
TEMPLATES = {
  "llama-3.1": "llama3",
  "llama-3-original": "llama3",  # writes the assistant header after the last turn, always
  "gemma-3": "gemma",
  "phi-3": "phi3",
  "smollm2": "chatml",
  "qwen2.5": "chatml",
}
END_OF_TURN = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi3": "<|end|>", "chatml": "<|im_end|>"}


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer()


def write_jsonl(path, rows) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def pairs(n: int, start: int = 0) -> list[dict]:
  return [{"prompt": f"the cat {i}", "chosen": f"sat on the mat {i}", "rejected": f"ran {i}"} for i in range(start, n)]


def kto(n: int) -> list[dict]:
  return [{"prompt": f"the dog {i}", "completion": f"ran quickly {i}", "label": i % 3 != 1} for i in range(n)]


def cfg_for(tmp_path, *sources, **overrides):
  return data_cfg(tmp_path, **{"train": tuple(str(s) for s in sources), "max_seq_len": 256, **overrides})


def decoded(tokenizer, ids) -> str:
  return tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


def sequences(examples: Examples, i: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  ids, mask = examples[i]
  k = examples.parts[i]
  return (ids[:k], mask[:k]), (ids[k:], mask[k:])


# ----------------------------------------------------------------------------------------------------------------
# Formats


def test_each_format_is_detected_and_read(tmp_path):
  rows = {
    "strings": [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "system": "Be kind."}],
    "conversational": [{"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]}],
    "shared prefix": [{"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]}],
    "kto strings": [{"prompt": "Hi", "completion": "Hello!", "label": True}],
    "kto messages": [{"prompt": PROMPT, "completion": [BAD], "label": False}],
  }
  records = {name: list(read_records(write_jsonl(tmp_path / "d.jsonl", r))) for name, r in rows.items()}
  user = {"role": "user", "content": "Hi"}
  assert records["strings"][0].kind == "preference"
  assert records["strings"][0].chosen == [{"role": "system", "content": "Be kind."}, user, GOOD | {"content": "Hello!"}]
  assert records["strings"][0].rejected[-1] == {"role": "assistant", "content": "Go away."}
  for name in ("conversational", "shared prefix"):
    (record,) = records[name]
    assert (record.kind, record.chosen, record.rejected) == ("preference", PROMPT + [GOOD], PROMPT + [BAD])
  assert records["kto strings"][0] == Record(
    "kto", messages=[user, {"role": "assistant", "content": "Hello!"}], label=True, location=f"{tmp_path}/d.jsonl:1"
  )
  assert (records["kto messages"][0].messages, records["kto messages"][0].label) == (PROMPT + [BAD], False)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_pair_masks_are_exactly_the_completions(name, family_tokenizer, template_text):
  """Each sequence is the template's rendering token for token; only the final answer and its end-of-turn marker
  are trained, and everything before them is the prompt as rendered for generation."""
  family = TEMPLATES[name]
  template = template_text(name)
  tok = tiny_tokenizer(template) if family == "chatml" else family_tokenizer(family, template)
  record = Record("preference", chosen=PROMPT + [GOOD], rejected=PROMPT + [BAD], location="p.jsonl:3")
  ids, mask, parts, label = preference.encode(record, tok)
  assert (ids.dtype, mask.dtype, label) == (np.int32, np.int8, -1)
  generation_prompt = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
  for (seq, seq_mask), answer in zip(((ids[:parts], mask[:parts]), (ids[parts:], mask[parts:])), (GOOD, BAD)):
    reference = tok.apply_chat_template(PROMPT + [answer], tokenize=True)
    assert seq.tolist() == list(reference["input_ids"] if hasattr(reference, "keys") else reference)
    trained = np.flatnonzero(seq_mask)
    start, end = trained[0], trained[-1] + 1
    assert trained.tolist() == list(range(start, end))  # one run: the completion's first tokens
    assert decoded(tok, seq[:start]) == generation_prompt
    assert decoded(tok, seq[start:end]) == answer["content"] + END_OF_TURN[family]
    assert int(seq[end - 1]) in chat.end_of_turn_ids(tok)  # the model learns to stop, once
  # Both sequences share the prompt's tokens.
  np.testing.assert_array_equal(ids[: np.argmax(mask)], ids[parts : parts + np.argmax(mask[parts:])])


def test_string_pairs_use_the_template_and_its_end_of_turn_not_an_appended_eos(tmp_path, tokenizer):
  """TRL appends EOS to plain-text answers; templated answers end with the template's own end-of-turn marker."""
  (record,) = read_records(
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat", "chosen": "sat", "rejected": "ran"}])
  )
  ids, mask, parts, _ = preference.encode(record, tokenizer)
  assert (
    decoded(tokenizer, ids[:parts]) == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\nsat<|im_end|>\n"
  )
  assert decoded(tokenizer, ids[:parts][mask[:parts] == 1]) == "sat<|im_end|>"
  assert decoded(tokenizer, ids[parts:][mask[parts:] == 1]) == "ran<|im_end|>"


def test_truncation_keeps_the_prompts_end_and_the_completions_start(tokenizer):
  record = Record("preference", chosen=PROMPT + [GOOD], rejected=PROMPT + [BAD], location="p.jsonl:1")
  full_ids, full_mask, full_parts, _ = preference.encode(record, tokenizer)
  ids, mask, parts, _ = preference.encode(record, tokenizer, max_prompt_length=5, max_completion_length=4)
  prompt = int(np.argmax(full_mask))
  (chosen, chosen_mask), (rejected, _) = sequences(Examples.from_items([(ids, mask, 0, "x", parts, -1)]), 0)
  assert parts == 5 + 4 and len(rejected) == 5 + 4
  np.testing.assert_array_equal(chosen[:5], full_ids[prompt - 5 : prompt])
  np.testing.assert_array_equal(chosen[5:], full_ids[prompt : prompt + 4])
  np.testing.assert_array_equal(rejected[5:], full_ids[full_parts + prompt : full_parts + prompt + 4])
  assert chosen_mask.tolist() == [0] * 5 + [1] * 4
  # A KTO record truncates the same way.
  kto_record = Record("kto", messages=PROMPT + [GOOD], label=True, location="k.jsonl:1")
  ids, mask, parts, label = preference.encode(kto_record, tokenizer, max_prompt_length=5, max_completion_length=4)
  np.testing.assert_array_equal(ids, chosen)
  assert (parts, label) == (0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: exact errors, and counted skips


BAD_RECORDS = [
  ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected: identical to chosen; a pair needs two different"),
  (
    {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [GOOD]},
    "rejected: identical to chosen",
  ),
  ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen: empty content; remove the record or fill in the text"),
  (
    {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": " "}], "rejected": [BAD]},
    "chosen[0].content: empty content",
  ),
  ({"prompt": "p", "chosen": "a"}, "rejected: missing field"),
  ({"chosen": "a", "rejected": "b"}, "prompt: missing field; a text 'chosen' answer needs a prompt"),
  (
    {"chosen": [PROMPT[1], GOOD, PROMPT[1], GOOD], "rejected": [PROMPT[1], BAD, PROMPT[1], GOOD | {"content": "x"}]},
    "rejected[1]: chosen and rejected differ before their final answer (4 and 4 messages, the first 1 shared); keep",
  ),
  (
    {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD, PROMPT[1], GOOD]},
    "rejected[2]: chosen and rejected differ before their final answer (3 and 5 messages, the first 2 shared)",
  ),
  ({"chosen": PROMPT + [GOOD], "rejected": PROMPT}, "rejected: the conversation ends on a user turn"),
  ({"prompt": "p", "completion": "c", "label": "yes"}, "label: expected true or false, got a string; write the"),
  ({"prompt": "p", "label": True}, "completion: missing field"),
  ({"prompt": [PROMPT[1]], "completion": [PROMPT[1]], "label": True}, "completion[0].role: two 'user' turns in a row"),
]


@pytest.mark.parametrize("bad, expected", BAD_RECORDS)
def test_bad_records_name_the_line_and_field(bad, expected, tmp_path):
  good = kto(1)[0] if "label" in bad else pairs(1)[0]
  path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
  with pytest.raises(DataError) as err:
    list(read_records(path))
  assert str(err.value).startswith(f"{path}:2: {expected}")


@pytest.mark.parametrize("kind", ["pairs", "kto"])
def test_bad_records_are_counted_under_skip(kind, tmp_path):
  bad = [b for b, _ in BAD_RECORDS if ("label" in b) == (kind == "kto")]
  good = kto(3) if kind == "kto" else pairs(3)
  report = SkipReport()
  records = list(read_records(write_jsonl(tmp_path / "d.jsonl", good + bad), on_error="skip", report=report))
  assert len(records) == 3 and report.total == len(bad)
  assert all(example.startswith(f"{tmp_path}/d.jsonl:") for example in report.examples.values())


def test_sft_refuses_labelled_records(tmp_path, tokenizer):
  path = write_jsonl(tmp_path / "k.jsonl", kto(2))
  for fmt in ("completion", "kto"):
    records = read_records(path, format=fmt)
    if fmt == "kto":
      assert [r.kind for r in records] == ["kto", "kto"]
      continue
    with pytest.raises(DataError) as err:
      list(records)
    assert str(err.value) == (
      f"{path}:1: label: a labelled record read as SFT data: SFT trains on every completion, the undesirable ones "
      "too; train on labelled prompt/completion records with objective=kto (data.format 'kto' or 'auto')"
    )
  data = pipeline.load_split(cfg_for(tmp_path, path), tokenizer)
  with pytest.raises(ConfigError, match="SFT would train on the undesirable completions too; set objective=kto"):
    preference.check_kind(data.kind, "sft", data.sources)


def test_bad_pairs_raise_or_are_counted(tmp_path, tokenizer):
  long_prompt = " ".join(["the big red dog"] * 20)  # about 80 tokens
  rows = pairs(4) + [
    {"prompt": "p", "chosen": "same", "rejected": "same"},  # line 5
    {"prompt": "the cat", "chosen": "sat on the mat and", "rejected": "sat on the mat then"},  # line 6
    {"prompt": long_prompt, "chosen": "a", "rejected": "b"},  # line 7: no room for completions
    {"prompt": "the cat " * 7, "chosen": "sat quickly then", "rejected": "ran slowly under"},  # line 8: too long
  ]
  path = write_jsonl(tmp_path / "p.jsonl", rows)
  first = {"max_seq_len": 160, "max_completion_length": 10, "cache_dir": ""}
  for line, expected, settings in [
    (5, "rejected: identical to chosen", first),
    (
      6,
      "rejected: the same as chosen within their first max_completion_length (10) tokens; raise data.max_",
      first,
    ),
    (
      7,
      "prompt: the prompt leaves no room for a completion: its two sequences hold it twice within max_seq_len (160)",
      {"max_seq_len": 160},
    ),
    (
      8,
      "record: its two sequences together are longer than max_seq_len (160) after truncation; lower data.max_prompt_",
      {"max_seq_len": 160},
    ),
  ]:
    rows_up_to = write_jsonl(tmp_path / f"upto{line}.jsonl", rows[:4] + rows[line - 1 : line])
    with pytest.raises(DataError) as err:
      pipeline.load_split(cfg_for(tmp_path, rows_up_to, **settings), tokenizer)
    assert str(err.value).startswith(f"{rows_up_to}:5: {expected}"), str(err.value)
  data = pipeline.load_split(
    cfg_for(tmp_path, path, on_error="skip", max_seq_len=160, max_completion_length=10), tokenizer
  )
  assert data.stats.skipped.total == 4, data.stats.skipped.summary()
  assert data.stats.examples == 4
  assert sorted(data.stats.skipped.counts) == sorted(
    [
      "identical pair",
      "identical pair after truncation",
      "the prompt leaves no room for a completion: its two sequences hold it twice within max_seq_len (160)",
      "its two sequences together are longer than max_seq_len (160) after truncation",
    ]
  )
  # Without the completion limit, and with room enough, only the true duplicate is left out.
  data = pipeline.load_split(cfg_for(tmp_path, path, on_error="skip", max_seq_len=800), tokenizer)
  assert data.stats.examples == 7 and dict(data.stats.skipped.counts) == {"identical pair": 1}


def test_kto_needs_both_classes_and_two_records_per_source(tmp_path, tokenizer):
  rows = [r | {"label": True} for r in kto(4)]
  path = write_jsonl(tmp_path / "all_good.jsonl", rows)
  other = write_jsonl(tmp_path / "more_good.jsonl", [r | {"prompt": r["prompt"] + "!"} for r in rows[:2]])
  with pytest.raises(DataError) as err:
    pipeline.load_split(cfg_for(tmp_path, path, other), tokenizer)
  assert str(err.value) == (
    f"{path}, {other}: label: the KTO training split has no undesirable (label false) examples "
    f"({path}: 4 true, 0 false; {other}: 2 true, 0 false); KTO learns from both desirable and undesirable "
    "completions: add records with the missing label"
  )
  lone = write_jsonl(tmp_path / "lone.jsonl", kto(1))
  with pytest.raises(DataError, match=f"^{lone}:1: completion: the only KTO record of its source in this split"):
    pipeline.load_split(cfg_for(tmp_path, lone), tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# KTO's KL sequences


@pytest.mark.parametrize(
  "batch_size, partners", [(3, [2, 0, 1, 6, 3, 4, 5]), (1, [1, 0, 3, 2, 6, 4, 5]), (8, [6, 0, 1, 2, 3, 4, 5])]
)
def test_kl_sequences_rotate_completions_within_groups_of_batch_size(tmp_path, tokenizer, batch_size, partners):
  path = write_jsonl(tmp_path / "k.jsonl", kto(7))
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
    Examples.concat([examples, dataclasses_replace(examples, ref_logps=None)])
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


def dataclasses_replace(examples, **kw):
  import dataclasses

  return dataclasses.replace(examples, **kw)


def test_cache_round_trip_and_key(tmp_path, tokenizer):
  path = write_jsonl(tmp_path / "p.jsonl", pairs(12))
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
  kto_path = write_jsonl(tmp_path / "k.jsonl", kto(8))
  a = pipeline.load_split(cfg_for(tmp_path, kto_path, batch_size=4), tokenizer)
  b = pipeline.load_split(cfg_for(tmp_path, kto_path, batch_size=2), tokenizer)
  assert b.stats.cached_sources == 1 and a.fingerprint != b.fingerprint
  assert not np.array_equal(a.examples[0].input_ids, b.examples[0].input_ids)


def test_parallel_workers_encode_pairs_like_the_main_process(tmp_path, tokenizer, monkeypatch):
  path = write_jsonl(tmp_path / "p.jsonl", pairs(12) + [{"prompt": "p", "chosen": "x", "rejected": "x"}])
  serial = pipeline.load_split(cfg_for(tmp_path, path, cache_dir="", on_error="skip"), tokenizer)
  monkeypatch.setattr(pipeline, "PARALLEL_MIN_RECORDS", 4)
  monkeypatch.setattr(pipeline, "_CHUNK", 4)
  parallel = pipeline.load_split(cfg_for(tmp_path, path, cache_dir="", on_error="skip", num_workers=2), tokenizer)
  for name in ("input_ids", "loss_mask", "offsets", "keys", "parts", "labels", "locations"):
    np.testing.assert_array_equal(getattr(serial.examples[0], name), getattr(parallel.examples[0], name))
  assert dict(parallel.stats.skipped.counts) == {"identical pair": 1}


def test_summary_and_mixed_kinds(tmp_path, tokenizer):
  from test_pipeline_helpers import write_chats

  pair_path = write_jsonl(tmp_path / "p.jsonl", pairs(5))
  kto_path = write_jsonl(tmp_path / "k.jsonl", kto(6))
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
  data, cfg = _loaded(tmp_path, tokenizer, pairs(16) if kind == "pairs" else kto(16))
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
  _, cfg = _loaded(tmp_path, tokenizer, kto(10), validation_fraction=0.5, packing=False)
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


# ----------------------------------------------------------------------------------------------------------------
# The objective's check, and the CLI


def test_check_kind():
  for objective, kind in preference.OBJECTIVES.items():
    preference.check_kind(kind, objective)
  cases = {
    ("pairs", "sft"): "objective=sft: the data (a.jsonl) holds preference pairs (prompt/chosen/rejected); set "
    "objective=dpo (or orpo, simpo, reward), or convert the pairs to chat records",
    ("sft", "dpo"): "objective=dpo needs prompt/chosen/rejected records, but the data (a.jsonl) holds SFT records "
    "(conversations, completions or text); point data.train at them, or set objective=sft",
    ("kto", "orpo"): "objective=orpo needs prompt/chosen/rejected records, but the data (a.jsonl) holds KTO records "
    "(prompt/completion/label); set objective=kto",
    ("pairs", "kto"): "objective=kto needs prompt/completion/label records (label true or false), but the data "
    "(a.jsonl) holds preference pairs (prompt/chosen/rejected); set objective=dpo (or orpo, simpo, reward)",
    ("sft", "kto"): "objective=kto needs prompt/completion/label records (label true or false), but the data "
    "(a.jsonl) holds SFT records",
  }
  for (kind, objective), message in cases.items():
    with pytest.raises(ConfigError) as err:
      preference.check_kind(kind, objective, ("a.jsonl",))
    assert str(err.value).startswith(message)
  with pytest.raises(ConfigError, match="objective: 'ppo' is not one of sft, dpo, orpo, simpo, reward, kto"):
    preference.check_kind("pairs", "ppo")


def test_cli_shows_pair_statistics_and_both_sequences(tmp_path, tokenizer):
  from jaxtune.data import __main__ as cli
  from jaxtune.data.config import data_only_config

  tokenizer.save_pretrained(tmp_path / "tokenizer")
  config = data_only_config()
  config.tokenizer = str(tmp_path / "tokenizer")
  config.data.train = (write_jsonl(tmp_path / "p.jsonl", pairs(6)),)
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.batch_size = 2
  config.data.max_seq_len = 128
  out = io.StringIO()
  dump = tmp_path / "dump.jsonl"
  cli.describe(config, split="train", show=1, tokens=False, dump=str(dump), out=out)
  text = out.getvalue()
  assert "records 6  pairs 6" in text and "packing efficiency" in text
  assert "\nchosen: " in text and "\nrejected: " in text
  assert "[[sat on the mat 0<|im_end|>]]" in text and "[[ran 0<|im_end|>]]" in text
  rows = [json.loads(line) for line in dump.read_text().splitlines()]
  assert len(rows) == 6 and all(0 < r["parts"] < len(r["input_ids"]) for r in rows)
