"""Evaluation: task metrics on a run or a model (`python -m jaxtune.eval`), the scorer registry, lm-eval.

metrics.py is the scorer registry (imported by training too); run.py loads a model and data and
writes eval.json and predictions.jsonl; lm_eval.py adapts a model to lm-evaluation-harness.
"""
