"""Preference pairs and KTO records read and templated: formats, masks against real templates, truncation, bad input,
and what data an objective accepts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from jaxtune.data import chat, pipeline, preference
from jaxtune.data.examples import Examples
from jaxtune.data.records import DataError, Record, SkipReport, read_records
from jaxtune.errors import ConfigError

from test_pipeline_helpers import cfg_for, decoded, kto_rows, pair_rows, sequences, tiny_tokenizer, write_jsonl

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
  good = kto_rows(1)[0] if "label" in bad else pair_rows(1)[0]
  path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
  with pytest.raises(DataError) as err:
    list(read_records(path))
  assert str(err.value).startswith(f"{path}:2: {expected}")


@pytest.mark.parametrize("kind", ["pairs", "kto"])
def test_bad_records_are_counted_under_skip(kind, tmp_path):
  bad = [b for b, _ in BAD_RECORDS if ("label" in b) == (kind == "kto")]
  good = kto_rows(3) if kind == "kto" else pair_rows(3)
  report = SkipReport()
  records = list(read_records(write_jsonl(tmp_path / "d.jsonl", good + bad), on_error="skip", report=report))
  assert len(records) == 3 and report.total == len(bad)
  assert all(example.startswith(f"{tmp_path}/d.jsonl:") for example in report.examples.values())


def test_sft_refuses_labelled_records(tmp_path, tokenizer):
  path = write_jsonl(tmp_path / "k.jsonl", kto_rows(2))
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
  rows = pair_rows(4) + [
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
  rows = [r | {"label": True} for r in kto_rows(4)]
  path = write_jsonl(tmp_path / "all_good.jsonl", rows)
  other = write_jsonl(tmp_path / "more_good.jsonl", [r | {"prompt": r["prompt"] + "!"} for r in rows[:2]])
  with pytest.raises(DataError) as err:
    pipeline.load_split(cfg_for(tmp_path, path, other), tokenizer)
  assert str(err.value) == (
    f"{path}, {other}: label: the KTO training split has no undesirable (label false) examples "
    f"({path}: 4 true, 0 false; {other}: 2 true, 0 false); KTO learns from both desirable and undesirable "
    "completions: add records with the missing label"
  )
  lone = write_jsonl(tmp_path / "lone.jsonl", kto_rows(1))
  with pytest.raises(DataError, match=f"^{lone}:1: completion: the only KTO record of its source in this split"):
    pipeline.load_split(cfg_for(tmp_path, lone), tokenizer)


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
  config.data.train = (write_jsonl(tmp_path / "p.jsonl", pair_rows(6)),)
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
