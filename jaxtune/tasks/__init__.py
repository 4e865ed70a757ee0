"""Generation tasks scored by exact match: the quickstart's before/after measurement.

A task file is JSONL chat records; each record's last assistant turn is the reference and
everything before it the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence

from jaxtune.errors import UserError


def exact(prediction: str, reference: str) -> bool:
  """The same text, surrounding whitespace aside."""
  return prediction.strip() == reference.strip()


def json_equal(prediction: str, reference: str) -> bool:
  """Both parse as JSON to equal values (key order and spacing aside)."""
  try:
    return json.loads(prediction.strip()) == json.loads(reference)
  except (json.JSONDecodeError, TypeError):
    return False


SCORERS: dict[str, Callable[[str, str], bool]] = {"exact": exact, "json": json_equal}


@dataclasses.dataclass
class Example:
  prompt: list[dict]  # messages up to (not including) the reference answer
  reference: str


@dataclasses.dataclass
class Result:
  score: float  # fraction of exact matches
  predictions: list[str]
  correct: list[bool]


def load_examples(path: str | pathlib.Path, limit: int | None = None) -> list[Example]:
  """The first `limit` records of a JSONL file of {"messages": [...]} ending with an assistant turn."""
  examples = []
  for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), start=1):
    if not line.strip():
      continue
    messages = json.loads(line).get("messages") or []
    if not messages or messages[-1].get("role") != "assistant":
      raise UserError(f"{path}:{n}: a task record needs messages ending with an assistant turn (the reference).")
    examples.append(Example(messages[:-1], messages[-1]["content"]))
    if limit and len(examples) == limit:
      break
  return examples


def evaluate(
  model, tokenizer, examples: Sequence[Example], scorer: str = "json", *, max_new_tokens: int = 48, batch_size: int = 50
) -> Result:
  """Greedy answers to every prompt, scored against the references."""
  from jaxtune.generation import generate

  predictions = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start : start + batch_size]
    predictions += generate(model, tokenizer, [e.prompt for e in chunk], max_new_tokens=max_new_tokens, temperature=0.0)
  correct = [SCORERS[scorer](p, e.reference) for p, e in zip(predictions, examples)]
  return Result(sum(correct) / max(len(correct), 1), predictions, correct)
