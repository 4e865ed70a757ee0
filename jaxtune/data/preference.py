"""Preference and KTO data: records to two-sequence examples, the KL sequences of KTO, and what data fits an objective.

A preference pair becomes one example, prompt + chosen followed by prompt + rejected; a KTO record becomes
prompt + completion followed by its KL sequence, the same prompt + another record's completion. Each
sequence is the chat template's rendering of the whole conversation, and only its final assistant turn is
trained: the answer and the end-of-turn marker, located and checked exactly as SFT's assistant turns are
(`chat.encode_record` with train_on="last_assistant"). What the template writes before that turn,
including the assistant header that ``add_generation_prompt=True`` adds, is the prompt. TRL starts the
completion where the tokens of the prompt rendered for generation and of the full conversation diverge:
the same place, unless the tokenizer merges tokens across it, where TRL drops the prompt's diverging tail
and this keeps the full conversation's own tokens.

String prompts and answers are templated too (see `records._from_preference`), so no EOS is appended as
TRL does for plain text: the template's own end-of-turn marker closes every completion and is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.data import chat
from jaxtune.data.examples import KINDS, Examples
from jaxtune.data.records import DataError, Record
from jaxtune.errors import ConfigError

# What data each training objective reads (`check_kind`).
OBJECTIVES = {"sft": "sft", "dpo": "pairs", "orpo": "pairs", "simpo": "pairs", "reward": "pairs", "kto": "kto"}
_PAIR_OBJECTIVES = "dpo (or orpo, simpo, reward)"


def encode(
  record: Record,
  tokenizer: Any,
  *,
  chat_template: str | None = None,
  max_prompt_length: int = 0,
  max_completion_length: int = 0,
) -> tuple[np.ndarray, np.ndarray, int, int]:
  """(input_ids, loss_mask, parts, label) of a preference or KTO record.

  A pair: prompt + chosen, then prompt + rejected, parts = the first one's length, label -1. A KTO record:
  prompt + completion alone (its KL sequence needs the other records: `with_kl`), parts 0, label 1 or 0.
  The prompt keeps its last `max_prompt_length` tokens and each completion its first
  `max_completion_length` (0: no limit).
  """
  if record.kind == "kto":
    prompt, ids, mask = _completion(record.messages, "completion", tokenizer, chat_template, record.location)
    prompt, ids, mask = _truncate(prompt, ids, mask, max_prompt_length, max_completion_length)
    return np.concatenate([prompt, ids]), np.concatenate([np.zeros(len(prompt), np.int8), mask]), 0, int(record.label)
  if record.kind != "preference":
    raise DataError(
      record.location,
      "record",
      f"cannot encode a record of kind {record.kind!r} as a pair",
      reason="unknown record kind",
    )
  prompt, chosen, chosen_mask = _completion(record.chosen, "chosen", tokenizer, chat_template, record.location)
  other, rejected, rejected_mask = _completion(record.rejected, "rejected", tokenizer, chat_template, record.location)
  if not np.array_equal(prompt, other):
    raise DataError(
      record.location,
      "prompt",
      "the prompt's tokens differ before chosen and before rejected (the chat template renders it differently, "
      "or tokens merge across the start of an answer)",
      "pass a chat_template that renders each turn on its own, or start both answers alike (e.g. without spaces)",
      reason="template not maskable",
    )
  if np.array_equal(chosen, rejected):
    raise DataError(
      record.location,
      "rejected",
      "tokenises the same as chosen",
      "a pair needs two different answers; fix or remove the record",
      reason="identical pair",
    )
  _, chosen, chosen_mask = _truncate(prompt, chosen, chosen_mask, max_prompt_length, max_completion_length)
  prompt, rejected, rejected_mask = _truncate(prompt, rejected, rejected_mask, max_prompt_length, max_completion_length)
  if np.array_equal(chosen, rejected):
    raise DataError(
      record.location,
      "rejected",
      f"the same as chosen within their first max_completion_length ({max_completion_length}) tokens",
      "raise data.max_completion_length",
      reason="identical pair after truncation",
    )
  blank = np.zeros(len(prompt), np.int8)
  ids = np.concatenate([prompt, chosen, prompt, rejected])
  return ids, np.concatenate([blank, chosen_mask, blank, rejected_mask]), len(prompt) + len(chosen), -1


def _completion(
  messages: list[dict], field: str, tokenizer: Any, chat_template: str | None, location: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(prompt ids, completion ids, completion mask) of a conversation whose final assistant turn is the completion.

  The completion starts at the turn's first trained token: the template's text before it, the assistant
  header included, is the prompt rendered for generation. Errors name the conversation's messages as
  `field`[i], counting the prompt's messages too.
  """
  try:
    record = Record("chat", messages=messages, location=location)
    enc = chat.encode_record(record, tokenizer, train_on="last_assistant", chat_template=chat_template)
  except DataError as e:
    raise DataError(e.location, e.field.replace("messages", field, 1), e.problem, e.fix, reason=e.reason) from None
  start = int(np.argmax(enc.loss_mask))
  return enc.input_ids[:start], enc.input_ids[start:], enc.loss_mask[start:]


def _truncate(
  prompt: np.ndarray, ids: np.ndarray, mask: np.ndarray, max_prompt: int, max_completion: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The prompt's last `max_prompt` tokens and the completion's first `max_completion` (0: all): the end of a
  prompt holds the question being answered, and the start of a completion what the model says first."""
  if max_prompt:
    prompt = prompt[-max_prompt:]
  if max_completion:
    ids, mask = ids[:max_completion], mask[:max_completion]
  return prompt, ids, mask


def with_kl(examples: Examples, group: int) -> Examples:
  """KTO examples of one source (in record order) with their KL sequences: prompt i + completion j.

  As TRL builds them: records in consecutive groups of `group` (the batch size) are paired with the
  previous record's completion, the first with the group's last, (x1, yn), (x2, y1), ..., (xn, yn-1), so
  that the KL estimate sees the group's own completions under other prompts. A last group of one record
  joins the group before it, and groups hold at least two records: a record is never its own KL partner.
  A source with a single record has no other completion to offer, which is an error.
  """
  n = len(examples)
  if n == 0:
    return examples
  if n == 1:
    raise DataError(
      examples.locations[0],
      "completion",
      "the only KTO record of its source in this split, so no other completion can form its KL sequence",
      "KTO pairs each prompt with another record's completion: add records to the source, or give the split more",
      reason="lone KTO record",
    )
  group = max(group, 2)
  bounds = list(range(0, n, group)) + [n]
  if bounds[-1] - bounds[-2] == 1:
    del bounds[-2]
  partner = np.concatenate([np.roll(np.arange(a, b), 1) for a, b in zip(bounds[:-1], bounds[1:])])
  starts = [int(np.argmax(examples[i][1])) for i in range(n)]  # where each completion starts
  items = []
  for i, j in enumerate(partner.tolist()):
    ids, mask = examples[i]
    other_ids, other_mask = examples[j]
    kl_ids = np.concatenate([ids[: starts[i]], other_ids[starts[j] :]])
    kl_mask = np.concatenate([np.zeros(starts[i], np.int8), other_mask[starts[j] :]])
    key, location, label = examples.keys[i], examples.locations[i], examples.labels[i]
    items.append((np.concatenate([ids, kl_ids]), np.concatenate([mask, kl_mask]), key, location, len(ids), label))
  return Examples.from_items(items)


def overlong(examples: Examples, indices: np.ndarray, max_seq_len: int) -> list[tuple[np.ndarray, str, str, str]]:
  """(indices, field, problem, fix) for the two-sequence examples at `indices`, each longer than max_seq_len.

  Such an example is never cut (its sequences are compared, and a cut would leave a half): its prompt
  and completions were truncated by max_prompt_length and max_completion_length when encoded, and
  what still does not fit is dropped or refused. A prompt that, twice over, leaves no token for the two
  completions is told apart from a pair that is merely long.
  """
  no_room = []
  for i in indices:
    _, mask = examples[i]
    first = int(examples.parts[i])
    prompts = int(np.argmax(mask[:first])) + int(np.argmax(mask[first:]))
    no_room.append(prompts + 2 > max_seq_len)
  no_room = np.asarray(no_room, bool)
  return [
    (
      np.asarray(indices)[no_room],
      "prompt",
      f"the prompt leaves no room for a completion: its two sequences hold it twice within max_seq_len ({max_seq_len})",
      "set data.max_prompt_length below half of data.max_seq_len, or raise data.max_seq_len",
    ),
    (
      np.asarray(indices)[~no_room],
      "record",
      f"its two sequences together are longer than max_seq_len ({max_seq_len}) after truncation",
      "lower data.max_prompt_length or data.max_completion_length, or raise data.max_seq_len",
    ),
  ]


def split_kind(kinds: Sequence[str | None], sources: Sequence[str], key: str = "data.train") -> str:
  """The one kind of data ("sft", "pairs", "kto") the sources of a split (config `key`) hold; a mix is a ConfigError.

  `kinds` holds each source's `Examples.kind` (None for a source without examples, which does not count);
  a split whose sources are all empty counts as "sft".
  """
  found = {source: kind for source, kind in zip(sources, kinds) if kind is not None}
  distinct = sorted(set(found.values()), key=KINDS.index)
  if len(distinct) > 1:
    listed = ", ".join(f"{source} ({kind})" for source, kind in found.items())
    raise ConfigError(
      f"{key}: the sources of one split hold different kinds of data: {listed}; "
      "train on one kind at a time (SFT records, preference pairs, or KTO records)"
    )
  return distinct[0] if distinct else "sft"


def check_labels(parts: Sequence[Examples], sources: Sequence[str]) -> None:
  """KTO needs both desirable and undesirable examples in its training split."""
  counts = [(int(np.sum(p.labels == 1)), int(np.sum(p.labels == 0))) for p in parts]
  desirable, undesirable = (sum(c) for c in zip(*counts))
  if desirable and undesirable:
    return
  missing = "undesirable (label false)" if desirable else "desirable (label true)"
  per_source = "; ".join(f"{source}: {good} true, {bad} false" for source, (good, bad) in zip(sources, counts))
  raise DataError(
    ", ".join(sources),
    "label",
    f"the KTO training split has no {missing} examples ({per_source})",
    "KTO learns from both desirable and undesirable completions: add records with the missing label",
    reason="one KTO class",
  )


def check_kind(kind: str, objective: str, sources: Sequence[str] = ()) -> None:
  """Refuses data that `objective` cannot train on (`SplitData.kind` against the config's objective)."""
  if objective not in OBJECTIVES:
    raise ConfigError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if kind == OBJECTIVES[objective]:
    return
  data = f"the data ({', '.join(sources)})" if sources else "the data"
  holds = {
    "sft": "SFT records (conversations, completions or text)",
    "pairs": "preference pairs (prompt/chosen/rejected)",
    "kto": "KTO records (prompt/completion/label)",
  }[kind]
  if objective == "sft":
    fix = {
      "pairs": f"set objective={_PAIR_OBJECTIVES}, or convert the pairs to chat records",
      "kto": "SFT would train on the undesirable completions too; set objective=kto",
    }[kind]
    raise ConfigError(f"objective=sft: {data} holds {holds}; {fix}")
  needs = {"pairs": "prompt/chosen/rejected records", "kto": "prompt/completion/label records (label true or false)"}
  fix = {
    "sft": "point data.train at them, or set objective=sft",
    "pairs": f"set objective={_PAIR_OBJECTIVES}",
    "kto": "set objective=kto",
  }[kind]
  raise ConfigError(f"objective={objective} needs {needs[OBJECTIVES[objective]]}, but {data} holds {holds}; {fix}")
