"""Generation tasks scored by the metric registry (jaxtune/eval/metrics.py): the quickstart's before/after
measurement and `python -m jaxtune.eval`.

A task file is JSONL chat records; each record's last assistant turn is the reference and
everything before it the prompt. An optional "references" list holds further accepted answers.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

from jaxtune.errors import UserError
from jaxtune.eval import metrics as metrics_lib


@dataclasses.dataclass
class Example:
  prompt: list[dict]  # messages up to (not including) the reference answer
  reference: str
  others: tuple[str, ...] = ()  # further accepted answers (a record's "references")

  @property
  def references(self) -> list[str]:
    return [self.reference, *self.others]


@dataclasses.dataclass
class Result:
  score: float  # the primary metric (`scorer`) over the examples, in [0, 1]
  predictions: list[str]
  correct: list[float]  # the primary metric per example
  scored: metrics_lib.Scored  # every metric asked for: per example, aggregate, 95% interval
  scorer: str = ""  # the primary metric's registry name


def load_examples(path: str | pathlib.Path, limit: int | None = None) -> list[Example]:
  """The first `limit` records of a JSONL file of {"messages": [...]} ending with an assistant turn."""
  examples = []
  for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), start=1):
    if not line.strip():
      continue
    record = json.loads(line)
    messages = record.get("messages") or []
    if not messages or messages[-1].get("role") != "assistant":
      raise UserError(
        f"{path}:{n}: a task record needs messages ending with an assistant turn (the reference); "
        "add the expected answer as the last message"
      )
    others = record.get("references") or ()
    if isinstance(others, str) or not all(isinstance(r, str) for r in others):
      raise UserError(f"{path}:{n}: references: expected a list of strings, got {others!r}")
    examples.append(Example(messages[:-1], messages[-1]["content"], tuple(others)))
    if limit and len(examples) == limit:
      break
  return examples


def predict(
  model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 48, batch_size: int = 50
) -> list[str]:
  """Greedy answers to every prompt, `batch_size` prompts per batched generation."""
  from jaxtune.generation import generate

  predictions = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start : start + batch_size]
    predictions += generate(model, tokenizer, [e.prompt for e in chunk], max_new_tokens=max_new_tokens, temperature=0.0)
  return predictions


def evaluate(
  model,
  tokenizer,
  examples: Sequence[Example],
  scorer: str = "json",
  *,
  metrics: Sequence[str] = (),
  max_new_tokens: int = 48,
  batch_size: int = 50,
) -> Result:
  """Greedy answers to every prompt, scored by `scorer` and `metrics` (registry names) against the references."""
  predictions = predict(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
  return score(predictions, examples, scorer, metrics)


def score(predictions: Sequence[str], examples: Sequence[Example], scorer: str, metrics: Sequence[str] = ()) -> Result:
  """`predictions` scored by `scorer` (the primary metric) and `metrics`, with bootstrap intervals."""
  chosen = metrics_lib.parse([scorer, *metrics])
  scored = metrics_lib.evaluate(chosen, predictions, [e.references for e in examples])
  primary = chosen[0].name
  return Result(scored.values[primary], list(predictions), scored.per_example[primary].tolist(), scored, primary)
