"""The one registry of generation scorers: `python -m jaxtune.eval --metrics`, the training loop's task
score (`task.scorer`, `task.metrics`) and RL rewards all look names up here.

A metric scores a prediction against one or more references. Every value is a fraction in [0, 1]
(BLEU and chrF too: sacrebleu's 0-100 divided by 100), so a table, a log line and a reward read alike.
Per-example metrics average over the examples; corpus metrics (BLEU, chrF) are computed over the
whole set, as sacrebleu defines them, and their per-example column holds the sentence-level value.

    squad_em / squad_f1   SQuAD v1.1: lowercase, strip punctuation and articles, collapse spaces;
                          token-multiset F1; best over the references
    rouge1/rouge2/rougeL  `rouge-score` F-measure, stemmed, best over the references
    bleu / chrf           `sacrebleu` corpus BLEU and chrF
    json                  the prediction parses to the reference's JSON value
    json_fields           the fraction of the reference object's fields the prediction's object matches
    exact                 the same text, surrounding whitespace aside
    module:function       a user scorer `function(prediction, reference) -> float | bool`
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import importlib
import json
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from jaxtune.errors import UserError

PerExample = Callable[[str, Sequence[str]], float]


class MetricError(UserError, ValueError):
  """A metric name that does not exist, a user scorer that cannot be imported or raises."""


@dataclasses.dataclass(frozen=True)
class Metric:
  name: str
  score: PerExample  # (prediction, references) -> [0, 1]
  corpus: Callable[[Sequence[str], Sequence[Sequence[str]]], float] | None = None  # None: the mean of `score`
  about: str = ""

  def aggregate(self, predictions: Sequence[str], references: Sequence[Sequence[str]], scores: np.ndarray) -> float:
    """The metric over a set of examples whose per-example scores are `scores`."""
    if self.corpus is not None:
      return float(self.corpus(predictions, references))
    return float(np.mean(scores)) if len(scores) else float("nan")


# SQuAD v1.1 (the official evaluation script's normalisation and F1).


def squad_normalize(text: str) -> str:
  """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def _squad_f1_one(prediction: str, reference: str) -> float:
  pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
  common = collections.Counter(pred) & collections.Counter(ref)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, references: Sequence[str]) -> float:
  return float(max(squad_normalize(prediction) == squad_normalize(r) for r in references))


def squad_f1(prediction: str, references: Sequence[str]) -> float:
  return max(_squad_f1_one(prediction, r) for r in references)


def exact(prediction: str, references: Sequence[str]) -> float:
  return float(any(prediction.strip() == r.strip() for r in references))


def _json(text: str):
  try:
    return json.loads(text.strip()), True
  except (json.JSONDecodeError, TypeError):
    return None, False


def json_equal(prediction: str, references: Sequence[str]) -> float:
  value, ok = _json(prediction)
  return float(ok and any(value == _json(r)[0] for r in references))


def json_fields(prediction: str, references: Sequence[str]) -> float:
  """Of the reference object's fields, the fraction the prediction's object holds with equal values."""
  value, ok = _json(prediction)
  best = 0.0
  for reference in references:
    ref, _ = _json(reference)
    if not isinstance(ref, dict) or not ref:
      best = max(best, float(ok and value == ref))
      continue
    if ok and isinstance(value, dict):
      best = max(best, sum(k in value and value[k] == v for k, v in ref.items()) / len(ref))
  return best


@functools.cache
def _rouge_scorer():
  from rouge_score import rouge_scorer

  return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _rouge(kind: str) -> PerExample:
  def score(prediction: str, references: Sequence[str]) -> float:
    return max(_rouge_scorer().score(r, prediction)[kind].fmeasure for r in references)

  return score


def _references_by_position(references: Sequence[Sequence[str]]) -> list[list[str]]:
  """sacrebleu's layout: one list per reference position; examples with fewer references repeat their first."""
  most = max((len(r) for r in references), default=1)
  return [[r[i] if i < len(r) else r[0] for r in references] for i in range(most)]


def _bleu_corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  import sacrebleu

  return sacrebleu.corpus_bleu(list(predictions), _references_by_position(references)).score / 100


def _chrf_corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  import sacrebleu

  return sacrebleu.corpus_chrf(list(predictions), _references_by_position(references)).score / 100


def _bleu_sentence(prediction: str, references: Sequence[str]) -> float:
  import sacrebleu

  return sacrebleu.sentence_bleu(prediction, list(references)).score / 100


def _chrf_sentence(prediction: str, references: Sequence[str]) -> float:
  import sacrebleu

  return sacrebleu.sentence_chrf(prediction, list(references)).score / 100


REGISTRY: dict[str, Metric] = {
  m.name: m
  for m in (
    Metric("exact", exact, about="the same text, surrounding whitespace aside"),
    Metric("squad_em", squad_em, about="SQuAD exact match of the normalised text"),
    Metric("squad_f1", squad_f1, about="SQuAD token F1 of the normalised text"),
    Metric("rouge1", _rouge("rouge1"), about="ROUGE-1 F-measure (rouge-score, stemmed)"),
    Metric("rouge2", _rouge("rouge2"), about="ROUGE-2 F-measure (rouge-score, stemmed)"),
    Metric("rougeL", _rouge("rougeL"), about="ROUGE-L F-measure (rouge-score, stemmed)"),
    Metric("bleu", _bleu_sentence, corpus=_bleu_corpus, about="sacrebleu corpus BLEU / 100"),
    Metric("chrf", _chrf_sentence, corpus=_chrf_corpus, about="sacrebleu corpus chrF / 100"),
    Metric("json", json_equal, about="the prediction parses to the reference's JSON value"),
    Metric("json_fields", json_fields, about="fraction of the reference object's fields matched"),
  )
}
# Short names people type.
ALIASES = {"em": "squad_em", "f1": "squad_f1", "rouge": "rougeL", "rouge_l": "rougeL", "exact_match": "exact"}
DEFAULT = ("exact", "squad_em", "squad_f1", "rouge1", "rouge2", "rougeL", "bleu", "chrf")
JSON_DEFAULT = ("json", "json_fields")  # added to the defaults when every reference is JSON


def names() -> list[str]:
  return list(REGISTRY) + ["module:function"]


def get(name: str) -> Metric:
  """The metric called `name` (a registered name, an alias, or `module:function`); MetricError otherwise."""
  name = name.strip()
  name = ALIASES.get(name, name)
  if name in REGISTRY:
    return REGISTRY[name]
  if ":" in name:
    return _user_metric(name)
  near = difflib.get_close_matches(name, list(REGISTRY) + list(ALIASES), n=1)
  hint = f"did you mean '{near[0]}'? " if near else ""
  raise MetricError(f"unknown metric '{name}'; {hint}valid: {', '.join(names())}")


def parse(spec: str | Sequence[str]) -> list[Metric]:
  """Metrics of a comma-separated list ("f1,rougeL,my.module:score"), each checked."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  metrics = [get(n) for n in items if n.strip()]
  if not metrics:
    raise MetricError(f"no metric named in {spec!r}; valid: {', '.join(names())}")
  return list({m.name: m for m in metrics}.values())


def _user_metric(spec: str) -> Metric:
  module_name, _, attr = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise MetricError(
      f"scorer '{spec}': {e}; give an importable module:function taking (prediction, reference)"
    ) from None

  def score(prediction: str, references: Sequence[str]) -> float:
    return max(float(fn(prediction, r)) for r in references)

  return Metric(spec, score, about=f"user scorer {spec}")


def default_metrics(references: Sequence[Sequence[str]]) -> list[Metric]:
  """All metrics that apply: the text metrics, and the JSON ones when every reference parses as JSON."""
  chosen = list(DEFAULT)
  if references and all(_json(r[0])[1] for r in references):
    chosen += list(JSON_DEFAULT)
  return [REGISTRY[n] for n in chosen]


def score_all(
  metrics: Sequence[Metric], predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, np.ndarray]:
  """Per-example scores of every metric; a scorer that raises is named with the example it failed on."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  out = {}
  for metric in metrics:
    values = np.zeros(len(predictions))
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
      try:
        values[i] = metric.score(prediction, refs)
      except Exception as e:
        raise MetricError(
          f"scorer '{metric.name}' raised {type(e).__name__}: {e} on example {i} "
          f"(prediction {prediction[:60]!r}, reference {refs[0][:60]!r}); fix the scorer or the data"
        ) from e
    out[metric.name] = values
  return out


def bootstrap_ci(
  metric: Metric,
  predictions: Sequence[str],
  references: Sequence[Sequence[str]],
  scores: np.ndarray,
  *,
  samples: int = 1000,
  corpus_samples: int = 200,
  seed: int = 0,
  level: float = 0.95,
) -> tuple[float, float]:
  """A percentile bootstrap interval: the examples resampled with replacement `samples` times
  (`corpus_samples` times for a corpus metric, which recomputes BLEU/chrF on each resample)."""
  n = len(scores)
  if n == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, n, size=(samples, n))
  if metric.corpus is None:
    values = scores[draws].mean(axis=1)
  else:
    values = np.array(
      [metric.corpus([predictions[i] for i in d], [references[i] for i in d]) for d in draws[:corpus_samples]]
    )
  tail = (1 - level) / 2 * 100
  return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


@dataclasses.dataclass
class Scored:
  """Per-example scores, the aggregate and its 95% interval of each metric."""

  per_example: dict[str, np.ndarray]
  values: dict[str, float]
  intervals: dict[str, tuple[float, float]]


def evaluate(
  metrics: Sequence[Metric], predictions: Sequence[str], references: Sequence[Sequence[str]], *, seed: int = 0
) -> Scored:
  per_example = score_all(metrics, predictions, references)
  values, intervals = {}, {}
  for m in metrics:
    values[m.name] = m.aggregate(predictions, references, per_example[m.name])
    intervals[m.name] = bootstrap_ci(m, predictions, references, per_example[m.name], seed=seed)
  return Scored(per_example, values, intervals)
