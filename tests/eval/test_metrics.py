"""The metric registry: SQuAD EM/F1 against the official v1.1 evaluation logic, the library metrics' inputs,
JSON accuracy, user scorers, bootstrap intervals and the errors a user sees."""

import collections
import re
import string

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from jaxtune.eval import metrics


# The official SQuAD v1.1 evaluation (evaluate-v1.1.py, as the `evaluate` package's metrics/squad ships it),
# written out here as the reference.
def official_normalize_answer(s):
  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  def lower(text):
    return text.lower()

  return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
  prediction_tokens = official_normalize_answer(prediction).split()
  ground_truth_tokens = official_normalize_answer(ground_truth).split()
  common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(prediction_tokens)
  recall = 1.0 * num_same / len(ground_truth_tokens)
  return (2 * precision * recall) / (precision + recall)


def official_exact_match_score(prediction, ground_truth):
  return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
  return max(metric_fn(prediction, gt) for gt in ground_truths)


# Tricky normalisation: case, punctuation inside words, articles as words and inside words, whitespace,
# repeated tokens, an empty normalised answer, unicode punctuation (not in string.punctuation).
FIXTURE = [
  ("The Eiffel Tower", ["Eiffel tower", "the tower"]),
  ("  an   apple, a day!  ", ["apple day"]),
  ("Theatre of the Absurd", ["theatre absurd", "Theater of Absurd"]),
  ("U.S.A.", ["USA", "United States"]),
  ("the the the", ["a"]),
  ("1,000 dollars", ["1000 dollars", "$1,000"]),
  ("Paris Paris", ["Paris"]),
  ("“quoted” answer", ['"quoted" answer']),
  ("anthem of an ant", ["the anthem", "ant"]),
  ("", ["something"]),
  ("Rock-n-roll", ["rock n roll", "rocknroll"]),
  ("The Beatles' album", ["beatles album"]),
]


def test_squad_em_f1_equal_official_evaluation():
  for prediction, references in FIXTURE:
    em = official_metric_max_over_ground_truths(official_exact_match_score, prediction, references)
    f1 = official_metric_max_over_ground_truths(official_f1_score, prediction, references)
    assert metrics.get("em").score(prediction, references) == float(em), (prediction, references)
    assert metrics.get("f1").score(prediction, references) == pytest.approx(f1, abs=1e-12), (prediction, references)
  # Some cases of the fixture score between 0 and 1, so F1 is exercised beyond match / no match.
  f1s = [metrics.squad_f1(p, r) for p, r in FIXTURE]
  assert any(0 < v < 1 for v in f1s) and 0.0 in f1s and 1.0 in f1s


def test_rouge_and_bleu_come_from_the_libraries():
  predictions = ["the cat sat on the mat", "a quick brown fox", "hello there"]
  references = [["the cat is on the mat"], ["the quick brown fox jumps", "a fast brown fox"], ["hello"]]
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  for p, refs in zip(predictions, references):
    expected = max(scorer.score(r, p)["rougeL"].fmeasure for r in refs)
    assert metrics.get("rougeL").score(p, refs) == pytest.approx(expected)
  # Corpus BLEU / chrF: sacrebleu's own, with the second reference stream filled by each example's first.
  streams = [[r[0] for r in references], [r[1] if len(r) > 1 else r[0] for r in references]]
  scored = metrics.evaluate(metrics.parse("bleu,chrf"), predictions, references)
  assert scored.values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score / 100)
  assert scored.values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, streams).score / 100)


def test_json_accuracy_and_fields():
  ref = ['{"person": "Ana", "day": "Monday", "time": "09:00"}']
  assert metrics.json_equal('{"time": "09:00", "day": "Monday", "person": "Ana"}', ref) == 1.0
  assert metrics.json_equal('{"person": "Ana"}', ref) == 0.0
  assert metrics.json_fields('{"person": "Ana", "day": "Friday", "time": "09:00"}', ref) == pytest.approx(2 / 3)
  assert metrics.json_fields("not json", ref) == 0.0
  assert [m.name for m in metrics.default_metrics([ref])][-2:] == ["json", "json_fields"]
  assert "json" not in [m.name for m in metrics.default_metrics([["plain text"]])]


def length_ratio(prediction, reference):  # a user scorer, imported as tests.eval.test_metrics:length_ratio
  return min(len(prediction), len(reference)) / max(len(prediction), len(reference), 1)


def broken(prediction, reference):
  raise KeyError("answer")


def test_user_scorer_and_its_errors():
  metric = metrics.get(f"{__name__}:length_ratio")
  assert metric.score("abcd", ["ab", "abcd"]) == 1.0
  with pytest.raises(metrics.MetricError, match=r"scorer '.*:broken' raised KeyError.* on example 1"):
    metrics.score_all([_fails_on_second()], ["a", "x"], [["a"], ["b"]])
  with pytest.raises(metrics.MetricError, match="no_such_module"):
    metrics.get("no_such_module:f")


def _fails_on_second():
  def score(prediction, references):
    if prediction == "x":
      return broken(prediction, references[0])
    return 1.0

  return metrics.Metric(f"{__name__}:broken", score)


def test_unknown_metric_lists_the_valid_ones():
  with pytest.raises(metrics.MetricError, match=r"unknown metric 'rogueL'; did you mean 'rougeL'\?.*squad_f1"):
    metrics.parse("f1,rogueL")


def test_bootstrap_interval_width_at_50_examples():
  # 50 examples, 25 right: the 95% interval of the mean is about +-14 points (sqrt(.25/50) * 1.96).
  predictions = ["a"] * 25 + ["b"] * 25
  scored = metrics.evaluate([metrics.get("exact")], predictions, [["a"]] * 50)
  lo, hi = scored.intervals["exact"]
  assert scored.values["exact"] == 0.5
  assert lo < 0.5 < hi and 0.22 < hi - lo < 0.34
  assert np.array_equal(scored.per_example["exact"], [1.0] * 25 + [0.0] * 25)
