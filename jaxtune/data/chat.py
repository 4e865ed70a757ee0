"""Chat templating and loss masks: a `Record` in, token ids plus a per-token "learn this" mask out.

The mask is worked out from the model's own chat template, without needing `{% generation %}` markers:
each assistant answer is replaced by a marker, the conversation is rendered again, and the text around
the marker locates the answer in the real rendering. The end-of-turn text (what the template writes right
after an answer when that answer closes the conversation, e.g. ``<|im_end|>``, ``<|eot_id|>``, ``</s>``) is
trained too, so the model learns to stop; the next turn's header is not. Every example is then checked:
the trained tokens must decode to exactly the assistant turns, or the record is rejected with a DataError.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from jaxtune.data.records import DataError, Record
from jaxtune.hf.tokens import END_OF_TURN_TOKENS

TRAIN_ON = ("assistant", "all", "last_assistant")
_MARK = "\ue000\ue001\ue002"  # private-use characters, no letters: no template trims, cases or rewrites them
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_THINK_END = "</think>"


@dataclasses.dataclass
class Encoded:
  """One tokenised example. ``loss_mask[t] == 1``: token t is a target, predicted from tokens < t."""

  input_ids: np.ndarray  # int32 [T]
  loss_mask: np.ndarray  # int8 [T]
  location: str


def encode_record(
  record: Record, tokenizer: Any, *, train_on: str = "assistant", chat_template: str | None = None
) -> Encoded:
  """Tokenise `record` with the tokenizer's chat template (or `chat_template`) and build its checked loss mask."""
  if train_on not in TRAIN_ON:
    raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
  if record.kind == "text":
    return _encode_text(record, tokenizer)
  if record.kind == "preference":
    raise DataError(
      record.location,
      "record",
      "a preference record is not SFT data",
      "use a preference-training recipe (objective=dpo, orpo, simpo or reward), or convert the pairs to chat records",
      reason="preference record in SFT",
    )
  if record.kind == "kto":
    raise DataError(
      record.location,
      "record",
      "a labelled KTO record is not SFT data: SFT would train on the undesirable completions too",
      "use objective=kto",
      reason="KTO record in SFT",
    )
  if record.kind != "chat" or not record.messages:
    raise DataError(
      record.location, "record", f"cannot encode a record of kind {record.kind!r}", reason="unknown record kind"
    )

  render = _Renderer(tokenizer, chat_template, record.location)
  messages = record.messages
  full = render(messages)
  _check_all_rendered(messages, full, record.location)
  enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  if train_on == "all":
    return Encoded(ids, np.ones(len(ids), np.int8), record.location)

  offsets = [tuple(o) for o in enc["offset_mapping"]]
  turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
  trained = turns[-1:] if train_on == "last_assistant" else turns
  mask = np.zeros(len(ids), np.int8)
  spans = {}
  markers = end_of_turn_ids(tokenizer)
  for k in turns:  # every turn is located and checked, even those not trained
    start, answer_start, answer_end, common_end = _assistant_span(messages, k, full, render, record.location)
    end, marker = _end_of_turn(full, ids, offsets, answer_end, common_end, markers, tokenizer, k, record.location)
    spans[k] = (start, answer_start, answer_end, end)
    expected = full[start:answer_start] + _split_reasoning(messages[k]["content"])[1].strip() + marker
    tokens = _check_turn(spans[k], k, full, ids, offsets, tokenizer, expected, record.location)
    if k in trained:
      mask[tokens] = 1
  if _GENERATION_TAG.search(render.template):
    _check_generation_markers(messages, tokenizer, render.template, ids, offsets, spans, record.location)
  if not mask.any() or mask.all():
    raise DataError(
      record.location,
      "loss_mask",
      f"{'no' if not mask.any() else 'every'} token would be trained",
      "check the chat template",
      reason="bad loss mask",
    )
  return Encoded(ids, mask, record.location)


def _encode_text(record: Record, tokenizer: Any) -> Encoded:
  """Plain text for continued pre-training: BOS as the tokenizer adds it, EOS appended, every token trained."""
  ids = list(tokenizer(record.text, add_special_tokens=True)["input_ids"])
  eos = tokenizer.eos_token_id
  if eos is not None and (not ids or ids[-1] != eos):
    ids.append(eos)
  if not ids:
    raise DataError(record.location, "text", "tokenises to nothing", reason="empty content")
  return Encoded(np.asarray(ids, np.int32), np.ones(len(ids), np.int8), record.location)


class _Renderer:
  """Renders message lists to text with one template, caching results and turning template errors into DataErrors."""

  def __init__(self, tokenizer: Any, chat_template: str | None, location: str):
    self.tokenizer, self.location, self.cache = tokenizer, location, {}
    try:
      self.template = tokenizer.get_chat_template(chat_template)
    except ValueError:
      self.template = None
    if not self.template:
      raise DataError(
        location,
        "chat_template",
        "the tokenizer has no chat template and none was given",
        "pass chat_template=... (the model's Jinja template)",
        reason="no chat template",
      )

  def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    key = (tuple((m["role"], m["content"]) for m in messages), add_generation_prompt)
    if key not in self.cache:
      try:
        self.cache[key] = self.tokenizer.apply_chat_template(
          messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template
        )
      except Exception as e:  # jinja's raise_exception() and template bugs alike
        raise DataError(
          self.location,
          "chat_template",
          f"the chat template rejected this conversation ({type(e).__name__}: {e})",
          "fix the record or pass a chat_template that accepts it",
          reason="template rejected conversation",
        ) from e
    return self.cache[key]


def _check_all_rendered(messages: list[dict], full: str, location: str) -> None:
  """Templates may silently drop turns (Mistral v3 renders the system prompt only before a final user turn)."""
  for i, message in enumerate(messages):
    if message["role"] != "assistant" and message["content"].strip() not in full:
      raise DataError(
        location,
        f"messages[{i}]",
        f"the chat template does not render this {message['role']} message, so the model would never see it",
        "merge it into the first user message, or pass a chat_template that keeps it",
        reason="template drops message",
      )


def _split_reasoning(content: str) -> tuple[str, str]:
  """("<think>...</think>", answer) when the answer carries a reasoning block, else ("", content)."""
  if _THINK_END not in content:
    return "", content
  cut = content.rindex(_THINK_END) + len(_THINK_END)
  return content[:cut], content[cut:]


def _assistant_span(
  messages: list[dict], k: int, full: str, render: _Renderer, location: str
) -> tuple[int, int, int, int]:
  """(start, answer_start, answer_end, common_end) of assistant turn k in `full`.

  [start, answer_end) is the turn up to its answer; the text up to common_end is what the template writes after
  the answer both here and when the answer closes the conversation, which holds the end-of-turn tokens.
  """
  field = f"messages[{k}]"
  head, answer = _split_reasoning(messages[k]["content"])
  marked = [dict(m) for m in messages]
  marked[k]["content"] = head + _MARK
  with_mark = render(marked)
  if with_mark.count(_MARK) != 1:
    raise DataError(
      location,
      field,
      "the chat template does not render this assistant turn exactly once",
      reason="template drops message",
    )
  before, after = with_mark.split(_MARK)
  if not (full.startswith(before) and full.endswith(after) and len(before) + len(after) <= len(full)):
    raise DataError(
      location,
      field,
      "the chat template renders the rest of the conversation differently "
      "depending on this answer, so its tokens cannot be located",
      "pass a chat_template that renders each turn on its own",
      reason="template not maskable",
    )
  answer_start, answer_end = len(before), len(full) - len(after)
  if full[answer_start:answer_end].strip() != answer.strip():
    raise DataError(
      location,
      field,
      "the chat template rewrites this answer's text",
      "pass a chat_template that renders answers verbatim",
      reason="template not maskable",
    )

  # End of turn: what follows the answer both here and when the answer closes the conversation.
  closing = render(marked[: k + 1])
  if closing.count(_MARK) != 1:
    raise DataError(
      location,
      field,
      "the chat template does not render this assistant turn when it closes the conversation",
      reason="template drops message",
    )
  common_end = answer_end + len(os.path.commonprefix([after, closing.split(_MARK)[1]]))

  # Start of turn: right after the generation prompt (the assistant header); anything the template writes
  # between header and answer (e.g. Qwen3's <think> block) is the model's to generate, so it is trained.
  prompt = render(messages[:k], add_generation_prompt=True)
  bare = render(messages[:k])
  header = prompt[len(bare) :] if prompt.startswith(bare) else ""
  lead = closing.split(_MARK)[0][len(prompt) :] if closing.startswith(prompt) else None
  if lead is not None and before.endswith(header + lead):
    start = answer_start - len(lead)
  elif before.endswith(header):
    start = answer_start
  else:
    raise DataError(
      location,
      field,
      f"the assistant header {header!r} does not precede this answer",
      "check the chat template",
      reason="template not maskable",
    )
  return start, answer_start, answer_end, common_end


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
  """Ids of the tokens that close an assistant turn: the known end-of-turn tokens in the vocabulary, and EOS."""
  vocab = tokenizer.get_vocab()
  ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return frozenset(ids)


def _special_ids(tokenizer: Any) -> set[int]:
  return {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} | set(tokenizer.all_special_ids)


def _end_of_turn(
  full: str,
  ids: np.ndarray,
  offsets: list[tuple[int, int]],
  answer_end: int,
  common_end: int,
  markers: frozenset[int],
  tokenizer: Any,
  k: int,
  location: str,
) -> tuple[int, str]:
  """(end of the turn's trained text, its end marker's text), within what follows the answer in both renders.

  The text after an answer that is the same whether or not the answer closes the conversation holds the
  end-of-turn marker, but can run past it: a template that always writes the assistant header after the last
  turn (Meta-Llama-3-8B-Instruct's first template) shares `<|start_header_id|>` with the next user turn. So the
  turn ends right after the first end-of-turn token (`end_of_turn_ids`) there. A template that closes turns
  with plain text (no special token) keeps that text; one whose closing text holds special tokens but none
  that ends a turn cannot be masked exactly and is refused.
  """
  field = f"messages[{k}]"
  after = [t for t, (a, b) in enumerate(offsets) if answer_end < b <= common_end and b > a]
  ends = [t for t in after if int(ids[t]) in markers]
  if ends:
    end = offsets[ends[0]][1]
    marker = tokenizer.decode([int(ids[ends[0]])], skip_special_tokens=False)
  else:
    specials = [t for t in after if int(ids[t]) in _special_ids(tokenizer)]
    if specials:
      shown = tokenizer.decode([int(ids[t]) for t in after], skip_special_tokens=False)
      raise DataError(
        location,
        field,
        f"the chat template closes this answer with {shown!r}, which holds special tokens but none that ends a "
        f"turn ({', '.join(t for t in END_OF_TURN_TOKENS if t in tokenizer.get_vocab()) or 'no EOS'})",
        "use a template that ends answers with an end-of-turn or EOS token",
        reason="template not maskable",
      )
    end = max([offsets[t][1] for t in after], default=answer_end)
    marker = full[answer_end:end].strip()
  end = answer_end + len(full[answer_end:end].rstrip())
  if end == answer_end:
    raise DataError(
      location,
      field,
      "the chat template writes no end-of-turn token after the answer, so the model would never learn to stop",
      "use a template that closes answers (e.g. with EOS)",
      reason="no end-of-turn token",
    )
  return end, marker


def _check_turn(
  span: tuple[int, int, int, int],
  k: int,
  full: str,
  ids: np.ndarray,
  offsets: list[tuple[int, int]],
  tokenizer: Any,
  expected: str,
  location: str,
) -> list[int]:
  """Token indices of turn k, checked to decode to exactly `expected`: what the template writes between the
  assistant header and the answer (a reasoning block), the message's own content, and its end marker.

  `expected` is built from the record and the end marker token, not from where the turn was found in the
  rendering, so a span that runs on into the next turn's header cannot pass.
  """
  start, _, _, end = span
  field = f"messages[{k}]"
  tokens = [t for t, (a, b) in enumerate(offsets) if _overlaps(a, b, start, end)]
  if not tokens:
    raise DataError(location, field, "no token covers this assistant turn", reason="bad loss mask")
  first, last = offsets[tokens[0]][0], offsets[tokens[-1]][1]
  if full[first:start].strip() or full[end:last].strip():
    raise DataError(
      location,
      field,
      f"a token straddles the edge of this assistant turn "
      f"({full[first:last]!r} vs {full[start:end]!r}), so the mask cannot be exact",
      "check the chat template",
      reason="bad loss mask",
    )
  decoded = tokenizer.decode(ids[tokens].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
  if _squash(decoded) != _squash(expected):
    raise DataError(
      location,
      field,
      f"the trained tokens decode to {decoded!r}, not to the answer and its end marker {expected!r}",
      "check the tokenizer and chat template",
      reason="bad loss mask",
    )
  return tokens


def _check_generation_markers(
  messages: list[dict],
  tokenizer: Any,
  template: str,
  ids: np.ndarray,
  offsets: list[tuple[int, int]],
  spans: dict,
  location: str,
) -> None:
  """When the template marks answers with {% generation %}, its marks must agree with the located turns."""
  marked = tokenizer.apply_chat_template(
    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
  )
  if list(marked["input_ids"]) != ids.tolist():
    raise DataError(
      location,
      "chat_template",
      "tokenising the rendered text disagrees with apply_chat_template",
      reason="bad loss mask",
    )
  inside = np.zeros(len(ids), bool)
  for start, answer_start, answer_end, end in spans.values():
    in_turn = [t for t, (a, b) in enumerate(offsets) if _overlaps(a, b, start, end)]
    inside[in_turn] = True
    answer = [t for t, (a, b) in enumerate(offsets) if a < answer_end and b > answer_start and b > a]
    if not all(marked["assistant_masks"][t] for t in answer):
      raise DataError(
        location,
        "chat_template",
        "the template's {% generation %} markers leave out part of an assistant answer",
        reason="bad loss mask",
      )
  if np.any(np.asarray(marked["assistant_masks"], bool) & ~inside):
    raise DataError(
      location,
      "chat_template",
      "the template's {% generation %} markers cover tokens outside the assistant turns",
      reason="bad loss mask",
    )


def _overlaps(a: int, b: int, start: int, end: int) -> bool:
  """Token [a, b) touches [start, end); a zero-width token counts only strictly inside."""
  return (a < end and b > start) if b > a else start < a < end


def _squash(text: str) -> str:
  return "".join(text.split())
