"""Reading records: every source type and format, and the exact error or skip count for each malformed variant."""

from __future__ import annotations

import csv
import json

import pytest

from jaxtune.data.records import DataError, Record, SkipReport, read_records

from malformed import MALFORMED, MALFORMED_BY_FORMAT, msgs

HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path, rows) -> str:
  """Rows are dicts (written as JSON) or raw strings (written verbatim, e.g. broken JSON)."""
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def read(path, **kw) -> list[Record]:
  return list(read_records(str(path), **kw))


def error_of(rows, tmp_path, **kw) -> str:
  path = write_jsonl(tmp_path / "data.jsonl", rows)
  with pytest.raises(DataError) as err:
    read(path, **kw)
  return str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Formats


def test_messages_openai_style_with_model_role(tmp_path):
  path = write_jsonl(
    tmp_path / "chat.jsonl",
    [
      {"messages": [{"role": "system", "content": "Be brief."}] + HI, "id": 7},
      {"messages": [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Yo", "name": "bot"}]},
    ],
  )
  records = read(path)
  assert records[0] == Record("chat", messages=[{"role": "system", "content": "Be brief."}] + HI, location=f"{path}:1")
  assert records[1].messages[1] == {"role": "assistant", "content": "Yo"} and records[1].location == f"{path}:2"


def test_sharegpt(tmp_path):
  path = write_jsonl(
    tmp_path / "sg.jsonl",
    [
      {
        "conversations": [
          {"from": "system", "value": "Be brief."},
          {"from": "human", "value": "Hi"},
          {"from": "gpt", "value": "Hello!"},
        ]
      }
    ],
  )
  assert read(path)[0].messages == [{"role": "system", "content": "Be brief."}] + HI


def test_conversations_key_in_openai_style(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": HI}])
  assert read(path)[0].messages == HI


def test_alpaca_with_and_without_input(tmp_path):
  path = write_jsonl(
    tmp_path / "alpaca.jsonl",
    [
      {"instruction": "Translate to French.", "input": "Thank you", "output": "Merci"},
      {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ],
  )
  first, second = read(path)
  assert first.messages == [
    {"role": "user", "content": "Translate to French.\n\nThank you"},
    {"role": "assistant", "content": "Merci"},
  ]
  assert second.messages[0] == {"role": "user", "content": "Say hi."}


@pytest.mark.parametrize("keys", [("prompt", "completion"), ("input", "output")])
def test_completion_pairs(tmp_path, keys):
  path = write_jsonl(tmp_path / "c.jsonl", [{keys[0]: "2+2?", keys[1]: "4"}])
  assert read(path)[0].messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_conversational_prompt_completion(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": HI[:1], "completion": HI[1:]}])
  assert read(path)[0].messages == HI


def test_plain_text(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])
  assert read(path) == [Record("text", text="Once upon a time.", location=f"{path}:1")]


def test_preference_text_and_message_forms(tmp_path):
  path = write_jsonl(
    tmp_path / "p.jsonl",
    [
      {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
      {"chosen": HI, "rejected": [HI[0], {"role": "assistant", "content": "No."}]},
    ],
  )
  text, msgs = read(path)
  assert text.kind == "preference" and text.messages is None
  assert text.chosen == HI and text.rejected == [HI[0], {"role": "assistant", "content": "Go away."}]
  assert msgs.chosen == HI and msgs.rejected[1]["content"] == "No."


def test_field_map_and_prompt_template(tmp_path):
  path = write_jsonl(
    tmp_path / "qa.jsonl",
    [
      {
        "context": "Paris is in France.",
        "question": "Where is Paris?",
        "answer": "In France.",
        "sys": "Answer from the context.",
      }
    ],
  )
  (record,) = read(
    path, field_map={"response": "answer", "system": "sys"}, prompt_template="Context: {context}\nQuestion: {question}"
  )
  assert record.messages == [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "Context: Paris is in France.\nQuestion: Where is Paris?"},
    {"role": "assistant", "content": "In France."},
  ]


def test_field_map_renames_for_known_formats(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [{"dialog": HI}])
  assert read(path, field_map={"messages": "dialog"})[0].messages == HI
  with pytest.raises(ValueError, match="field_map key 'answer'"):
    read(path, field_map={"answer": "dialog"})


def test_explicit_format_overrides_detection(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [{"text": "raw text", "prompt": "p", "completion": "c"}])
  assert read(path)[0].kind == "chat"
  assert read(path, format="text")[0] == Record("text", text="raw text", location=f"{path}:1")


def test_unknown_layout_needs_format_or_field_map(tmp_path):
  msg = error_of([{"question": "q", "answer": "a"}], tmp_path)
  assert msg == (
    f"{tmp_path}/data.jsonl:1: record: cannot tell the dataset format from the fields "
    "['answer', 'question']; pass format=... or map your fields with field_map (and prompt_template)"
  )


# ----------------------------------------------------------------------------------------------------------------
# Sources


def test_json_list_csv_parquet_and_datasets_dir(tmp_path):
  rows = [
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Count.", "input": "1, 2", "output": "3"},
  ]
  expected = [r.messages for r in read(write_jsonl(tmp_path / "a.jsonl", rows))]

  (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
  json_records = read(tmp_path / "a.json")
  assert [r.messages for r in json_records] == expected
  assert json_records[1].location == f"{tmp_path}/a.json:row 1"

  with open(tmp_path / "a.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
    writer.writeheader()
    writer.writerows([rows[0], {**rows[1], "instruction": "Count\non."}])
  csv_records = read(tmp_path / "a.csv")
  assert csv_records[0].messages == expected[0] and csv_records[1].messages[0]["content"] == "Count\non.\n\n1, 2"
  assert [r.location for r in csv_records] == [f"{tmp_path}/a.csv:2", f"{tmp_path}/a.csv:3"]

  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
  parquet_records = read(tmp_path / "a.parquet")
  assert [r.messages for r in parquet_records] == expected and parquet_records[0].location.endswith(":row 0")

  import datasets

  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
  assert [r.messages for r in read(tmp_path / "saved")] == expected
  datasets.DatasetDict(
    {"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows[1:])}
  ).save_to_disk(str(tmp_path / "dd"))
  assert [r.messages for r in read(tmp_path / "dd")] == expected[:1]  # "train" by default
  test_split = read(f"{tmp_path}/dd:test")
  assert [r.messages for r in test_split] == expected[1:] and test_split[0].location == f"{tmp_path}/dd:test:row 0"


def test_messages_in_csv_and_parquet_cells(tmp_path):
  with open(tmp_path / "m.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["messages"])
    writer.writerow([json.dumps(HI)])
  assert read(tmp_path / "m.csv")[0].messages == HI
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.Table.from_pylist([{"messages": HI}]), tmp_path / "m.parquet")
  assert read(tmp_path / "m.parquet")[0].messages == HI


def test_hub_ids_go_through_datasets_load_dataset(monkeypatch):
  import datasets

  calls = []

  def fake_load_dataset(name, split):
    calls.append((name, split))
    return datasets.Dataset.from_list([{"messages": HI}])

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  records = read("someorg/chat-data:validation")
  assert calls == [("someorg/chat-data", "validation")]
  assert records[0].location == "someorg/chat-data:validation:row 0"
  read("someorg/chat-data")
  assert calls[-1] == ("someorg/chat-data", "train")


def test_missing_files_and_failed_hub_loads_are_clear(tmp_path, monkeypatch):
  with pytest.raises(DataError, match="no such file or directory"):
    read(tmp_path / "nope.jsonl")
  import datasets

  def offline(name, split):
    raise ConnectionError("offline")

  monkeypatch.setattr(datasets, "load_dataset", offline)
  with pytest.raises(DataError, match="loading it as a hub dataset failed \\(ConnectionError: offline\\)"):
    read("someorg/not-cached")


# ----------------------------------------------------------------------------------------------------------------
# Malformed records: exact errors


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_chat_records_raise_exact_errors(case, tmp_path):
  bad, expected = MALFORMED[case]
  # A good record first, so the format is detected before the bad one (line 2).
  assert error_of([msgs(("user", "a"), ("assistant", "b")), bad], tmp_path) == f"{tmp_path}/data.jsonl:2: {expected}"


@pytest.mark.parametrize("fmt, good, bad, expected", MALFORMED_BY_FORMAT)
def test_malformed_records_of_each_format(fmt, good, bad, expected, tmp_path):
  assert error_of([good, bad], tmp_path) == f"{tmp_path}/data.jsonl:2: {expected}"
  assert error_of([bad], tmp_path, format=fmt) == f"{tmp_path}/data.jsonl:1: {expected}"


def test_prompt_template_missing_field(tmp_path):
  msg = error_of([{"question": "q", "response": "a"}], tmp_path, prompt_template="{context}: {question}")
  assert msg == f"{tmp_path}/data.jsonl:1: context: missing field (used by prompt_template)"


# ----------------------------------------------------------------------------------------------------------------
# Skipping


def test_skip_counts_every_bad_record_by_reason(tmp_path):
  good = msgs(("user", "a"), ("assistant", "b"))
  rows = [
    good,
    '{"messages": [',
    MALFORMED["wrong role order"][0],
    good,
    '{"broken"',
    MALFORMED["empty content"][0],
    MALFORMED["ends on user"][0],
    MALFORMED["unknown role"][0],
    "",
    good,
  ]
  path = write_jsonl(tmp_path / "mixed.jsonl", rows)
  report = SkipReport()
  records = list(read_records(path, on_error="skip", report=report))
  assert [r.location for r in records] == [f"{path}:1", f"{path}:4", f"{path}:10"]  # line 9 is blank
  assert dict(report.counts) == {
    "invalid JSON": 2,
    "roles out of order": 1,
    "empty content": 1,
    "ends on user turn": 1,
    "unknown role": 1,
  }
  assert report.total == 6
  assert report.examples["invalid JSON"].startswith(f"{path}:2: line: invalid JSON")
  summary = report.summary()
  assert summary.splitlines()[0] == "skipped 6 record(s):" and "2 x invalid JSON" in summary


def test_skip_requires_a_report_and_raise_stops_at_first_bad_record(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [msgs(("user", "a"), ("assistant", "b")), "{", "{"])
  with pytest.raises(ValueError, match="needs a SkipReport"):
    read(path, on_error="skip")
  seen = []
  with pytest.raises(DataError, match=":2: line: invalid JSON"):
    for record in read_records(path):
      seen.append(record)
  assert len(seen) == 1
