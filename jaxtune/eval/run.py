"""Evaluate a run's checkpoint or an HF model (+ PEFT adapter) on chat examples: `evaluate(...)`.

model + tokenizer -> examples (a file, or a split of a data config) -> perplexity and token accuracy of
the references -> batched greedy answers -> every metric with its bootstrap 95% interval ->
eval.json, predictions.jsonl and a table. Nothing is written until every score exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

from jaxtune import tasks
from jaxtune.errors import UserError
from jaxtune.eval import metrics as metrics_lib
from jaxtune.eval import scoring

EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "predictions.jsonl"


@dataclasses.dataclass
class Loaded:
  """A model ready to evaluate and what it is."""

  model: Any
  tokenizer: Any
  source: dict  # {"run": ..., "step": ...} or {"model": ..., "adapter": ...}
  config: dict | None = None  # a run's saved config


def load_run_model(run_dir: str | os.PathLike, step: int | None = None) -> Loaded:
  """A run's model at `step` (default: the latest checkpoint), with the tokenizer and template it trained with."""
  from jaxtune.data import templates
  from jaxtune.export.run import load_run
  from jaxtune.hf import load as hf_load

  run = load_run(run_dir, step)
  tokenizer = hf_load.load_tokenizer(run.source_dir)
  template = templates.resolve(run.config.get("data", {}).get("chat_template", ""))
  if template:
    tokenizer.chat_template = template
  source = {"run": str(pathlib.Path(run_dir).absolute()), "step": run.step, "checkpoint": str(run.source_dir)}
  return Loaded(run.model, tokenizer, source, run.config)


def load_hf_model(path: str, adapter: str = "") -> Loaded:
  """An HF checkpoint directory (or hub id, or a built-in name), with a PEFT LoRA adapter applied when given."""
  from jaxtune.hf import load as hf_load
  from jaxtune.train import builtin_models

  resolved = builtin_models.resolve(path, builtin_models.DEFAULT_CACHE)
  model = hf_load.load_model(hf_load.resolve(resolved))
  if adapter:
    from jaxtune.peft.import_adapter import load_adapter

    model = load_adapter(model, adapter, builtin_models.base_name(path, "", resolved))
  return Loaded(model, hf_load.load_tokenizer(resolved), {"model": path, "adapter": adapter or None})


def examples_from_records(records: Sequence[Any], where: str) -> list[tasks.Example]:
  """Chat records (jaxtune.data.records) as examples: the last assistant turn is the reference."""
  out = []
  for record in records:
    messages = record.messages or []
    if record.kind != "chat" or not messages or messages[-1]["role"] != "assistant":
      raise UserError(
        f"{record.location or where}: no reference: an evaluation record needs messages ending with an "
        "assistant turn (the expected answer)"
      )
    out.append(tasks.Example(messages[:-1], messages[-1]["content"]))
  return out


def split_examples(data_config: Any, split: str) -> list[tasks.Example]:
  """The examples of `split` ("train", "validation", "test") of a config's data section."""
  import ml_collections

  from jaxtune.data import pipeline

  cfg = data_config if isinstance(data_config, ml_collections.ConfigDict) else ml_collections.ConfigDict(data_config)
  if split == "test" and not cfg.test_fraction:
    raise UserError("--split test: the run's data config holds no test split (data.test_fraction is 0); use --data")
  try:
    records = pipeline.split_records(cfg, split)
  except ValueError as e:
    raise UserError(str(e)) from None
  if not records:
    raise UserError(f"--split {split}: the split is empty; use --data FILE")
  return examples_from_records(records, f"split {split}")


def token_metrics(loaded: Loaded, examples: Sequence[tasks.Example], batch_size: int) -> dict[str, float]:
  """Perplexity and token accuracy of the references' tokens (the assistant answer), teacher-forced."""
  from jaxtune.data import chat
  from jaxtune.data.records import Record

  ids, masks = [], []
  for i, ex in enumerate(examples):
    record = Record("chat", messages=[*ex.prompt, {"role": "assistant", "content": ex.reference}], location=f"#{i}")
    encoded = chat.encode_record(record, loaded.tokenizer, train_on="last_assistant")
    ids.append(encoded.input_ids.tolist())
    masks.append(encoded.loss_mask.tolist())
  scores = scoring.score_targets(loaded.model, ids, masks, batch_size=batch_size)
  tokens = int(scores.targets.sum())
  nll = -float(scores.logprob.sum()) / max(tokens, 1)
  return {
    "loss": nll,
    "perplexity": math.exp(min(nll, 80.0)),
    "token_accuracy": float(scores.correct.sum()) / max(tokens, 1),
    "tokens": tokens,
  }


def evaluate(
  loaded: Loaded,
  examples: Sequence[tasks.Example],
  metric_names: str | Sequence[str] = "",
  *,
  out_dir: str | os.PathLike,
  max_new_tokens: int = 64,
  batch_size: int = 16,
  settings: dict | None = None,
  say=print,
) -> dict[str, Any]:
  """Scores `examples`, writes OUT_DIR/eval.json and predictions.jsonl; returns eval.json's content."""
  if not examples:
    raise UserError("no examples to evaluate")
  references = [e.references for e in examples]
  chosen = metrics_lib.parse(metric_names) if metric_names else metrics_lib.default_metrics(references)
  start = time.perf_counter()
  tokens = token_metrics(loaded, examples, batch_size)
  predictions = tasks.predict(
    loaded.model, loaded.tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size
  )
  seconds = time.perf_counter() - start
  scored = metrics_lib.evaluate(chosen, predictions, references)
  result = {
    "source": loaded.source,
    "examples": len(examples),
    "metrics": {m.name: {"value": scored.values[m.name], "ci95": list(scored.intervals[m.name])} for m in chosen},
    "token_metrics": tokens,
    "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "greedy": True, **(settings or {})},
    "seconds": round(seconds, 1),
  }
  _write(pathlib.Path(out_dir), result, examples, predictions, scored)
  say(table(result))
  say(f"wrote {pathlib.Path(out_dir) / EVAL_FILE} and {PREDICTIONS_FILE}")
  return result


def _write(out: pathlib.Path, result: dict, examples, predictions, scored: metrics_lib.Scored) -> None:
  """Both files appear whole or not at all (written aside, then renamed)."""
  out.mkdir(parents=True, exist_ok=True)
  lines = []
  for i, (ex, prediction) in enumerate(zip(examples, predictions)):
    row = {"prompt": ex.prompt, "reference": ex.reference, "prediction": prediction}
    if ex.others:
      row["references"] = ex.references
    row["scores"] = {name: float(values[i]) for name, values in scored.per_example.items()}
    lines.append(json.dumps(row, ensure_ascii=False))
  for name, text in ((PREDICTIONS_FILE, "\n".join(lines) + "\n"), (EVAL_FILE, json.dumps(result, indent=2) + "\n")):
    partial = out / (name + ".partial")
    partial.write_text(text)
    os.replace(partial, out / name)


def table(result: dict) -> str:
  """The metrics as a table: value and 95% interval in percent; then perplexity and token accuracy."""
  n = result["examples"]
  lines = [f"{'metric':<14} {'value':>7}  95% interval ({n} examples)"]
  for name, m in result["metrics"].items():
    lo, hi = m["ci95"]
    lines.append(f"{name:<14} {100 * m['value']:>6.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]")
  t = result["token_metrics"]
  lines.append(f"{'perplexity':<14} {t['perplexity']:>7.3f}  (reference tokens: {t['tokens']:,})")
  lines.append(f"{'token_acc':<14} {100 * t['token_accuracy']:>6.1f}%")
  return "\n".join(lines)
