"""Records in: read dataset files, detect their format, validate, and convert to canonical `Record`s.

Every problem is reported as ``path:line: field: what is wrong; what to do``. With ``on_error="skip"``
bad records are counted by reason in a `SkipReport`; nothing is dropped silently.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from jaxtune.errors import ConfigError, UserError

FORMATS = ("messages", "sharegpt", "alpaca", "completion", "text", "preference", "kto", "template")
# Canonical field names that `field_map` may point at source columns.
CANONICAL_FIELDS = (
  "messages",
  "conversations",
  "instruction",
  "input",
  "output",
  "prompt",
  "completion",
  "text",
  "chosen",
  "rejected",
  "system",
  "response",
  "label",
)
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "model": "assistant"}
_SHAREGPT_ROLES = {
  "system": "system",
  "human": "user",
  "user": "user",
  "gpt": "assistant",
  "assistant": "assistant",
  "model": "assistant",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.\[\]%:-]+)?$")


class DataError(UserError, ValueError):
  """A bad record or source: ``location: field: problem; fix``. `reason` is the short key skips are counted by."""

  def __init__(self, location: str, field: str, problem: str, fix: str = "", *, reason: str | None = None):
    self.location, self.field, self.problem, self.fix = location, field, problem, fix
    self.reason = reason or problem
    super().__init__(f"{location}: {field}: {problem}" + (f"; {fix}" if fix else ""))

  def __reduce__(self):  # survive pickling (worker processes): rebuild from the parts, not from str(self)
    return type(self), (self.location, self.field, self.problem, self.fix), {"reason": self.reason}


@dataclasses.dataclass
class Record:
  """One training example in canonical form."""

  kind: str  # "chat" | "text" | "preference" | "kto"
  # chat: the conversation; kto: the prompt's turns then the completion, the final assistant message.
  messages: list[dict] | None = None  # [{"role": "system"|"user"|"assistant", "content": str}]
  text: str | None = None
  # preference: two whole conversations that share every message but the final assistant answer.
  chosen: list[dict] | None = None
  rejected: list[dict] | None = None
  label: bool | None = None  # kto: True for a desirable completion, False for an undesirable one
  location: str = ""  # "path:line" (JSONL/CSV, 1-based) or "path:row N" (JSON list, Parquet, datasets; 0-based)


@dataclasses.dataclass
class SkipReport:
  """Records skipped under ``on_error="skip"``, counted by reason, with the first location of each."""

  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=dict)

  def add(self, error: DataError) -> None:
    """Count one skipped record."""
    self.counts[error.reason] += 1
    self.examples.setdefault(error.reason, str(error))

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    """One line per reason, most frequent first."""
    if not self.counts:
      return "skipped 0 records"
    lines = [f"skipped {self.total} record(s):"]
    for reason, n in self.counts.most_common():
      lines.append(f"  {n} x {reason} (first: {self.examples[reason]})")
    return "\n".join(lines)


def read_records(
  source: str,
  *,
  format: str = "auto",
  field_map: dict | None = None,
  prompt_template: str | None = None,
  on_error: str = "raise",
  report: SkipReport | None = None,
) -> Iterator[Record]:
  """Yield validated `Record`s from a file, a saved `datasets` directory, or a hub dataset id (``id[:split]``)."""
  if on_error not in ("raise", "skip"):
    raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  if on_error == "skip" and report is None:
    raise ValueError("on_error='skip' needs a SkipReport (report=...) so that skipped records are counted")
  if format != "auto" and format not in FORMATS:
    raise ConfigError(f"format must be 'auto' or one of {', '.join(FORMATS)}; got {format!r}")
  if format == "template" and not prompt_template:
    raise ConfigError("format='template' needs prompt_template, e.g. 'Context: {context}\\nQuestion: {question}'")
  for key in field_map or {}:
    if key not in CANONICAL_FIELDS:
      raise ConfigError(f"field_map key {key!r} is not a field jaxtune reads; use one of {CANONICAL_FIELDS}")

  fmt = format
  for location, raw in _iter_raw(source):
    try:
      if isinstance(raw, DataError):
        raise raw
      if not isinstance(raw, dict):
        raise DataError(
          location,
          "record",
          f"expected a JSON object, got {_type(raw)}",
          "write one object per record",
          reason="not an object",
        )
      raw = _apply_field_map(raw, field_map)
      if fmt == "auto":
        fmt = _detect(raw, prompt_template, location)
      record = _CONVERTERS[fmt](raw, location, prompt_template)
      if "label" in raw and record.kind == "chat":
        raise DataError(
          location,
          "label",
          "a labelled record read as SFT data: SFT trains on every completion, the undesirable ones too",
          "train on labelled prompt/completion records with objective=kto (data.format 'kto' or 'auto')",
          reason="labelled record in SFT",
        )
    except DataError as err:
      if on_error == "raise":
        raise
      report.add(err)
      continue
    yield record


# ----------------------------------------------------------------------------------------------------------------
# Sources


def _iter_raw(source: str) -> Iterator[tuple[str, Any]]:
  """(location, raw object or DataError) for every record of `source`."""
  path = os.fspath(source)
  if os.path.isdir(path) or _is_saved_dataset(path.rsplit(":", 1)[0]):
    yield from _iter_saved_dataset(path)
  elif os.path.isfile(path):
    lower = path.lower()
    if lower.endswith(".parquet"):
      yield from _iter_parquet(path)
    elif lower.endswith(".csv"):
      yield from _iter_csv(path)
    elif lower.endswith(".json") and _first_char(path) == "[":
      yield from _iter_json_list(path)
    else:
      yield from _iter_jsonl(path)
  elif _HUB_ID.match(path) and os.path.splitext(path.split(":")[0])[1].lower() not in (
    ".json",
    ".jsonl",
    ".csv",
    ".parquet",
  ):
    yield from _iter_hub(path)
  else:
    raise DataError(path, "source", "no such file or directory", "check the path", reason="missing source")


def _first_char(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    while chunk := f.read(4096):
      if stripped := chunk.lstrip():
        return stripped[0]
  return ""


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      location = f"{path}:{lineno}"
      try:
        yield location, json.loads(line.rstrip("\r\n"))
      except json.JSONDecodeError as e:
        yield (
          location,
          DataError(
            location,
            "line",
            f"invalid JSON ({e.msg} at column {e.colno})",
            "fix the line or skip bad records (on_error='skip')",
            reason="invalid JSON",
          ),
        )


def _iter_json_list(path: str) -> Iterator[tuple[str, Any]]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(
      f"{path}:{e.lineno}",
      "file",
      f"invalid JSON ({e.msg} at column {e.colno})",
      "fix the file; a .json file must hold one list of objects (or use JSON Lines)",
      reason="invalid JSON",
    ) from None
  for i, item in enumerate(data):
    yield f"{path}:row {i}", item


def _iter_csv(path: str) -> Iterator[tuple[str, Any]]:
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    start = 2  # line 1 is the header
    for row in reader:
      location = f"{path}:{start}"
      start = reader.line_num + 1
      extra = row.pop(None, None)
      if extra:
        yield (
          location,
          DataError(
            location,
            "row",
            f"{len(extra)} more value(s) than header columns",
            "quote values that contain commas",
            reason="bad CSV row",
          ),
        )
        continue
      yield location, {k: _maybe_json_list(v) for k, v in row.items()}


def _maybe_json_list(value: Any) -> Any:
  """CSV cells are strings; a cell holding a JSON list of messages is decoded."""
  if isinstance(value, str) and value.lstrip().startswith("[{"):
    try:
      decoded = json.loads(value)
    except json.JSONDecodeError:
      return value
    if isinstance(decoded, list) and all(isinstance(m, dict) for m in decoded):
      return decoded
  return value


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
  import pyarrow.parquet as pq

  i = 0
  for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
    for row in batch.to_pylist():
      yield f"{path}:row {i}", row
      i += 1


def _is_saved_dataset(path: str) -> bool:
  return os.path.isdir(path) and any(
    os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "state.json", "dataset_dict.json")
  )


def _iter_saved_dataset(source: str) -> Iterator[tuple[str, Any]]:
  import datasets

  path, split = source, None
  if not _is_saved_dataset(path) and ":" in source:
    path, split = source.rsplit(":", 1)
  if not _is_saved_dataset(path):
    raise DataError(
      source,
      "source",
      "directory is not a saved `datasets` dataset (no dataset_info.json, state.json or dataset_dict.json)",
      "point at a data file or a save_to_disk directory",
      reason="missing source",
    )
  ds = datasets.load_from_disk(path)
  yield from _iter_dataset(_pick_split(ds, split, source), path if split is None else f"{path}:{split}")


def _iter_hub(source: str) -> Iterator[tuple[str, Any]]:
  import datasets

  name, _, split = source.partition(":")
  try:
    ds = datasets.load_dataset(name, split=split or "train")
  except Exception as e:  # any failure here means the source is unusable
    raise DataError(
      source,
      "source",
      f"not a local file or directory, and loading it as a hub dataset failed ({type(e).__name__}: {e})",
      "check the path, or the dataset id and that it is cached for offline use",
      reason="missing source",
    ) from e
  yield from _iter_dataset(ds, source)


def _pick_split(ds: Any, split: str | None, source: str) -> Any:
  if not hasattr(ds, "keys"):  # a Dataset, not a DatasetDict
    return ds
  names = list(ds.keys())
  if split is None:
    if len(names) == 1:
      return ds[names[0]]
    split = "train"
  if split not in ds:
    raise DataError(
      source,
      "split",
      f"no split {split!r}; the dataset has {names}",
      f"append ':SPLIT' to the source, e.g. {source}:{names[0]}",
      reason="missing split",
    )
  return ds[split]


def _iter_dataset(ds: Any, label: str) -> Iterator[tuple[str, Any]]:
  for i, row in enumerate(ds):
    yield f"{label}:row {i}", row


# ----------------------------------------------------------------------------------------------------------------
# Format detection and conversion


def _apply_field_map(raw: dict, field_map: dict | None) -> dict:
  if not field_map:
    return raw
  out = dict(raw)
  for canonical, source_field in field_map.items():
    if source_field in raw:
      out[canonical] = raw[source_field]
  return out


def _detect(raw: dict, prompt_template: str | None, location: str) -> str:
  """The format of a source, from its first record's fields.

  A ``label`` field marks KTO data (``prompt``/``completion``/``label``), checked first so that labelled
  completions are never read as SFT data that would train on the undesirable ones; a plain-text corpus with
  a ``label`` column (``text``/``label``) stays text.
  """
  keys = set(raw)
  if prompt_template:
    return "template"
  if "label" in keys and "text" not in keys:
    return "kto"
  for key in ("messages", "conversations"):
    if key in keys:
      turns = raw[key]
      first = turns[0] if isinstance(turns, list) and turns else None
      sharegpt = isinstance(first, dict) and "from" in first and "role" not in first
      return "sharegpt" if sharegpt else "messages"
  if "chosen" in keys or "rejected" in keys:
    return "preference"
  if "instruction" in keys:
    return "alpaca"
  if "prompt" in keys or "completion" in keys or ("input" in keys and "output" in keys):
    return "completion"
  if "text" in keys:
    return "text"
  raise DataError(
    location,
    "record",
    f"cannot tell the dataset format from the fields {sorted(keys)}",
    "pass format=... or map your fields with field_map (and prompt_template)",
    reason="unknown format",
  )


def _conversation(turns: Any, location: str, field: str, roles: dict, role_key: str, content_key: str) -> list[dict]:
  """Validate a list of turns and return it as canonical messages."""
  messages = [m for m, _ in _turns(turns, location, field, roles, role_key, content_key)]
  _check_order(messages, location, field)
  return messages


def _turns(
  turns: Any, location: str, field: str, roles: dict = _ROLES, role_key: str = "role", content_key: str = "content"
) -> list[tuple[dict, str]]:
  """(canonical message, its field name) of each turn in a list, each checked alone (not their order)."""
  if turns is None:
    raise DataError(location, field, "missing field", f"every record needs {field!r}", reason="missing field")
  if not isinstance(turns, list):
    raise DataError(location, field, f"expected a list of messages, got {_type(turns)}", reason="bad field type")
  out = []
  for i, turn in enumerate(turns):
    where = f"{field}[{i}]"
    if not isinstance(turn, dict):
      raise DataError(
        location,
        where,
        f"expected an object with {role_key!r} and {content_key!r}, got {_type(turn)}",
        reason="bad field type",
      )
    if turn.get(role_key) is None:
      raise DataError(location, f"{where}.{role_key}", "missing field", reason="missing field")
    role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
    if role is None:
      raise DataError(
        location,
        f"{where}.{role_key}",
        f"unknown role {turn[role_key]!r}",
        f"use one of {', '.join(sorted(set(roles)))}",
        reason="unknown role",
      )
    content = _string(turn.get(content_key), location, f"{where}.{content_key}")
    out.append(({"role": role, "content": content}, where))
  return out


def _check_order(messages: list[dict], location: str, field: str, names: list[str] | None = None) -> None:
  """Roles in a trainable order; `names` are the messages' field names (default ``field[i]``)."""
  if not messages:
    raise DataError(location, field, "empty conversation", reason="no assistant turn")
  names = names or [f"{field}[{i}]" for i in range(len(messages))]
  expected, first_turn = "user", int(messages[0]["role"] == "system")
  for i, message in enumerate(messages):
    role = message["role"]
    if role == "system":
      if i == 0:
        continue
      raise DataError(
        location,
        f"{names[i]}.role",
        "'system' is only allowed as the first message",
        "merge it into the first system message",
        reason="roles out of order",
      )
    if role != expected:
      if i == first_turn:
        problem = f"the conversation must start with a user turn (after an optional system prompt), got {role!r}"
      else:
        problem = f"two {role!r} turns in a row; user and assistant turns must alternate"
      raise DataError(location, f"{names[i]}.role", problem, reason="roles out of order")
    expected = "assistant" if role == "user" else "user"
  if messages[-1]["role"] == "user":
    raise DataError(
      location,
      field,
      "the conversation ends on a user turn",
      "the last message must be an assistant answer to learn from",
      reason="ends on user turn",
    )
  if messages[-1]["role"] == "system":
    raise DataError(location, field, "no assistant turn to learn from", reason="no assistant turn")


def _string(value: Any, location: str, field: str, *, required: bool = True) -> str | None:
  if value is None:
    if not required:
      return None
    raise DataError(location, field, "missing field", reason="missing field")
  if not isinstance(value, str):
    raise DataError(location, field, f"expected a string, got {_type(value)}", reason="non-string content")
  if not value.strip():
    if not required:
      return None
    raise DataError(location, field, "empty content", "remove the record or fill in the text", reason="empty content")
  return value


def _with_system(raw: dict, location: str, turns: list[dict]) -> list[dict]:
  system = _string(raw.get("system"), location, "system", required=False)
  return ([{"role": "system", "content": system}] if system else []) + turns


def _from_messages(raw: dict, location: str, _: Any) -> Record:
  field = "messages" if "messages" in raw else "conversations"
  return Record(
    "chat", messages=_conversation(raw.get(field), location, field, _ROLES, "role", "content"), location=location
  )


def _from_sharegpt(raw: dict, location: str, _: Any) -> Record:
  field = "conversations" if "conversations" in raw or "messages" not in raw else "messages"
  return Record(
    "chat", messages=_conversation(raw.get(field), location, field, _SHAREGPT_ROLES, "from", "value"), location=location
  )


def _chat_pair(raw: dict, location: str, prompt: str, answer: str) -> Record:
  messages = _with_system(
    raw, location, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
  )
  return Record("chat", messages=messages, location=location)


def _from_alpaca(raw: dict, location: str, _: Any) -> Record:
  instruction = _string(raw.get("instruction"), location, "instruction")
  extra = _string(raw.get("input"), location, "input", required=False)
  output = _string(raw.get("output"), location, "output")
  return _chat_pair(raw, location, f"{instruction}\n\n{extra}" if extra else instruction, output)


def _from_completion(raw: dict, location: str, _: Any) -> Record:
  prompt_key, answer_key = ("prompt", "completion") if "prompt" in raw or "completion" in raw else ("input", "output")
  prompt, answer = raw.get(prompt_key), raw.get(answer_key)
  if isinstance(prompt, list) or isinstance(answer, list):  # conversational prompt/completion
    turns = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + (
      answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
    )
    return Record(
      "chat",
      messages=_conversation(turns, location, f"{prompt_key}+{answer_key}", _ROLES, "role", "content"),
      location=location,
    )
  return _chat_pair(raw, location, _string(prompt, location, prompt_key), _string(answer, location, answer_key))


def _from_text(raw: dict, location: str, _: Any) -> Record:
  return Record("text", text=_string(raw.get("text"), location, "text"), location=location)


def _from_template(raw: dict, location: str, prompt_template: str | None) -> Record:
  try:
    prompt = prompt_template.format_map(_TemplateFields(raw, location))
  except DataError:
    raise
  except (IndexError, ValueError) as e:
    raise DataError(
      location,
      "prompt_template",
      f"cannot format the template: {e}",
      "use named fields such as {question}",
      reason="bad prompt template",
    ) from None
  if not prompt.strip():
    raise DataError(location, "prompt_template", "the template produced an empty prompt", reason="empty content")
  answer = _string(raw.get("response"), location, "response")
  return _chat_pair(raw, location, prompt, answer)


class _TemplateFields(dict):
  """`str.format_map` source that reports missing or empty fields as DataErrors."""

  def __init__(self, raw: dict, location: str):
    super().__init__(raw)
    self.location = location

  def __getitem__(self, key: str) -> Any:
    if key not in self.keys() or dict.__getitem__(self, key) is None:
      raise DataError(self.location, key, "missing field (used by prompt_template)", reason="missing field")
    value = dict.__getitem__(self, key)
    if isinstance(value, (dict, list)):
      raise DataError(
        self.location, key, f"expected a string or number, got {_type(value)}", reason="non-string content"
      )
    return value

  def __missing__(self, key: str) -> Any:
    return self[key]


def _from_preference(raw: dict, location: str, _: Any) -> Record:
  """A pair in TRL's forms: ``prompt`` (a string, or messages) with ``chosen``/``rejected`` answers (strings, or
  assistant messages), or whole ``chosen``/``rejected`` conversations whose shared messages are the prompt.

  String prompts and answers become a user turn and an assistant turn (after ``system``, when given), the
  chat template is applied to them as to SFT's completion and alpaca formats: an instruct model is tuned
  on the format it is prompted with. The two conversations must differ only in their final assistant answer.
  """
  prompt = _prompt_turns(raw, location)
  chosen = _joined(prompt, _answer_turns(raw, location, "chosen", bool(prompt)), location, "chosen")
  rejected = _joined(prompt, _answer_turns(raw, location, "rejected", bool(prompt)), location, "rejected")
  a, b = [m for m, _ in chosen], [m for m, _ in rejected]
  if a == b:
    raise DataError(
      location,
      "rejected",
      "identical to chosen",
      "a pair needs two different answers; fix or remove the record",
      reason="identical pair",
    )
  shared = next(i for i in range(len(a) + 1) if i == len(a) or i == len(b) or a[i] != b[i])
  if not shared == len(a) - 1 == len(b) - 1:
    where = rejected[shared][1] if shared < len(b) else "rejected"
    raise DataError(
      location,
      where,
      f"chosen and rejected differ before their final answer ({len(a)} and {len(b)} messages, "
      f"the first {shared} shared)",
      "keep the shared turns in 'prompt' (or the same in both conversations) and one final assistant answer "
      "in each of chosen and rejected",
      reason="pair differs before final answer",
    )
  return Record("preference", chosen=a, rejected=b, location=location)


def _from_kto(raw: dict, location: str, _: Any) -> Record:
  """A KTO record: ``prompt`` and ``completion`` in the forms a pair's prompt and answers take, and ``label``."""
  label = raw.get("label")
  if label is None:
    raise DataError(
      location,
      "label",
      "missing field",
      "KTO records need a label: true (a desirable completion) or false (an undesirable one)",
      reason="missing field",
    )
  if not isinstance(label, bool):
    raise DataError(
      location,
      "label",
      f"expected true or false, got {_type(label)}",
      "write the label as a JSON boolean: true for a desirable completion, false for an undesirable one",
      reason="bad label",
    )
  prompt = _prompt_turns(raw, location)
  turns = _joined(prompt, _answer_turns(raw, location, "completion", bool(prompt)), location, "completion")
  return Record("kto", messages=[m for m, _ in turns], label=label, location=location)


def _prompt_turns(raw: dict, location: str) -> list[tuple[dict, str]]:
  """The ``prompt`` field's turns with their field names: messages as given, a string as a user turn."""
  prompt = raw.get("prompt")
  if prompt is None:
    return []
  if isinstance(prompt, list):
    return _turns(prompt, location, "prompt")
  user = [{"role": "user", "content": _string(prompt, location, "prompt")}]
  return [(m, m["role"] if m["role"] == "system" else "prompt") for m in _with_system(raw, location, user)]


def _answer_turns(raw: dict, location: str, field: str, has_prompt: bool) -> list[tuple[dict, str]]:
  """An answer field's turns: messages as given, one message object (Axolotl's chat_template pairs write
  ``{"role": "assistant", "content": ...}``) as that turn, a string as one assistant turn (which needs a prompt)."""
  value = raw.get(field)
  if value is None:
    raise DataError(location, field, "missing field", reason="missing field")
  if isinstance(value, list):
    return _turns(value, location, field)
  if isinstance(value, dict):
    return [(message, field) for message, _ in _turns([value], location, field)]
  if not has_prompt:
    raise DataError(
      location, "prompt", "missing field", f"a text {field!r} answer needs a prompt", reason="missing field"
    )
  return [({"role": "assistant", "content": _string(value, location, field)}, field)]


def _joined(prompt: list[tuple[dict, str]], answer: list[tuple[dict, str]], location: str, field: str) -> list:
  """Prompt and answer turns as one conversation, its role order checked; errors name each turn's own field."""
  turns = prompt + answer
  _check_order([m for m, _ in turns], location, field, [name for _, name in turns])
  return turns


_CONVERTERS = {
  "messages": _from_messages,
  "sharegpt": _from_sharegpt,
  "alpaca": _from_alpaca,
  "completion": _from_completion,
  "text": _from_text,
  "preference": _from_preference,
  "kto": _from_kto,
  "template": _from_template,
}


def _type(value: Any) -> str:
  return {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
  }.get(type(value), type(value).__name__)
