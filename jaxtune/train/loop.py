"""The training loop: `train(config)` from a validated config to a checkpointed, evaluated run.

config -> model + tokenizer -> (LoRA) -> data -> restore -> [train_step, eval, save]* -> final
eval, checkpoint, generation scores. The step itself is pure and lives in step.py; this file
only feeds it, measures it and stops it.
"""

from __future__ import annotations

import math
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxtune import data as data_lib
from jaxtune import tasks
from jaxtune.hf import load as hf_load
from jaxtune.peft import apply_lora
from jaxtune.train import builtin_models
from jaxtune.train import checkpoint as ckpt_lib
from jaxtune.train import config as config_lib
from jaxtune.train import logging as log_lib
from jaxtune.train import optim
from jaxtune.train import step as step_lib


class NonFiniteLossError(RuntimeError):
  """Too many non-finite steps in a row; the last good parameters are checkpointed."""


class _Preemption:
  """Turns SIGTERM (how TPU VMs announce preemption) into a flag the loop checks after every step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "_Preemption":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _micro_batches(batch: dict[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
  """[B, T] -> [A, B / A, T]."""
  return {k: v.reshape((grad_accum, v.shape[0] // grad_accum) + v.shape[1:]) for k, v in batch.items()}


def _evaluate(eval_step, params, val_data, config, max_batches: int) -> dict[str, float]:
  """Loss, perplexity and token accuracy over the validation split (or its first `max_batches` batches)."""
  micro = config.data.batch_size // config.train.grad_accum
  loader = data_lib.loader_for(val_data, config.data, process_index=jax.process_index(),
                               process_count=jax.process_count(), batch_size=micro * jax.process_count())
  totals = np.zeros(3)
  for i, batch in enumerate(loader):
    if max_batches and i >= max_batches:
      break
    out = eval_step(params, batch)
    totals += [float(out["loss_sum"]), float(out["tokens"]), float(out["correct"])]
  loader.close()
  loss = totals[0] / max(totals[1], 1.0)
  return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 80.0)), "eval/accuracy": totals[2] / max(totals[1], 1.0),
          "eval/tokens": totals[1]}


def _score_task(model, tokenizer, config, examples, label: str, progress: log_lib.Progress) -> tasks.Result:
  task = config.task
  start = time.perf_counter()
  result = tasks.evaluate(model, tokenizer, examples, task.scorer, max_new_tokens=task.max_new_tokens,
                          batch_size=task.batch_size)
  hits = sum(result.correct)
  progress.write(f"exact match {label}: {hits}/{len(examples)} = {result.score:.0%} "
                 f"({time.perf_counter() - start:.0f} s to generate)")
  return result


def _side_by_side(examples, before: tasks.Result | None, after: tasks.Result, show: int) -> str:
  lines = []
  for i, ex in enumerate(examples[:show]):
    lines.append(f"--- {ex.prompt[-1]['content']}")
    lines.append(f"  reference: {ex.reference}")
    if before is not None:
      lines.append(f"  before:    {before.predictions[i]!r}  {'OK' if before.correct[i] else 'wrong'}")
    lines.append(f"  after:     {after.predictions[i]!r}  {'OK' if after.correct[i] else 'wrong'}")
  return "\n".join(lines)


def _load(config: ml_collections.ConfigDict):
  """Tokenizer and model (with LoRA adapters when peft.method is lora)."""
  path = builtin_models.resolve(config.model.path, config.model.cache_dir)
  tokenizer = hf_load.load_tokenizer(path)
  model = hf_load.load_model(path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                             attention_impl=config.model.attention_impl, remat=config.model.remat)
  return path, tokenizer, model


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, Any]:
  """Runs (or resumes) the training run of `config`; returns its final metrics.

  workdir, when given, replaces config.output_dir.
  """
  if workdir:
    config = ml_collections.ConfigDict(config.to_dict())
    config.output_dir = str(workdir)
  config_lib.validate(config, jax.process_count())
  config = config_lib.resolve(config, jax.default_backend())
  main = jax.process_index() == 0
  run_dir = pathlib.Path(config.output_dir).expanduser().absolute()
  config_dict = config.to_dict()
  ckpts = ckpt_lib.Checkpoints(run_dir / "checkpoints", keep=config.checkpoint.keep,
                               keep_best=config.checkpoint.keep_best, async_save=config.checkpoint.async_save)
  if config.resume == "never" and ckpts.latest_step() is not None:
    raise config_lib.ConfigError(f"resume: 'never', but {ckpts.directory} already holds checkpoints "
                                 f"(steps {ckpts.steps()}); set resume=auto or use a new output_dir.")
  if main:
    config_lib.write(config, run_dir)
  say = lambda msg: log_lib.info(msg, main)  # noqa: E731

  model_path, tokenizer, model = _load(config)
  pid, pcount = jax.process_index(), jax.process_count()
  train_iter = data_lib.make_loader(config.data, tokenizer, split="train", process_index=pid, process_count=pcount)
  val_data = None
  if config.train.eval and (config.data.validation or config.data.validation_fraction):
    val_data = data_lib.load_split(config.data, tokenizer, "validation")
  examples = tasks.load_examples(config.task.test_file, config.task.num_examples) if config.task.test_file else []

  method, seed, steps = config.peft.method, config.train.seed, config.train.steps
  if method == "lora":
    lora = config.peft.lora
    apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, use_rslora=lora.use_rslora,
               targets=lora.targets, rngs=nnx.Rngs(seed))
  optimizer = optim.make_optimizer(config.optim, steps)
  graphdef, frozen, state = step_lib.init_train_state(model, optimizer, method=method, seed=seed)
  del model  # its arrays now live in (frozen, state); the state is donated by every step

  restored = ckpts.restore(state, config_dict) if config.resume == "auto" else None
  start = 0
  if restored is not None:
    state, start = restored.state, restored.step
    if restored.data_state is not None:
      train_iter.set_state(restored.data_state)
    say(f"resumed from {restored.path} (step {start})")
  results: dict[str, Any] = {}
  before = None
  if examples and config.task.before and restored is None:  # LoRA B starts at zero: this is the base model
    before = _score_task(step_lib.model_from_state(graphdef, frozen, state.params), tokenizer, config, examples,
                         "before training", log_lib.Progress(0, bar=False, enabled=main))
    results["eval/exact_match_before"] = before.score

  train_step = step_lib.make_train_step(graphdef, frozen, optimizer,
                                        lr_schedule=optim.make_schedule(config.optim, steps))
  eval_step = step_lib.make_eval_step(graphdef, frozen) if val_data is not None else None
  logger = log_lib.MetricsLogger(run_dir, enabled=main, tensorboard=config.logging.tensorboard,
                                 wandb_project=config.logging.wandb_project, wandb_entity=config.logging.wandb_entity,
                                 wandb_run_name=config.logging.wandb_run_name, config=config_dict, start_step=start)
  if "eval/exact_match_before" in results:
    logger.log(0, {"eval/exact_match_before": results["eval/exact_match_before"]})
  progress = log_lib.Progress(steps, start, bar=config.logging.progress, enabled=main)
  say(f"training {method} on {train_iter.stats.examples if hasattr(train_iter.stats, 'examples') else '?'} "
      f"examples for steps {start + 1}..{steps}; run directory {run_dir}")

  def save(step: int, metrics: dict | None = None) -> None:
    ckpts.save(step, state, data_state=train_iter.get_state(), config=config_dict, metrics=metrics)

  stopped, step, last_eval, window = None, start, None, []
  with _Preemption() as preemption:
    for step in range(start + 1, steps + 1):
      try:
        batch = next(train_iter)
      except StopIteration:
        stopped = "data"
        step -= 1
        break
      tokens = float(np.count_nonzero(batch["segment_ids"]))
      state, metrics = train_step(state, _micro_batches(batch, config.train.grad_accum))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      window.append(metrics)
      tps = progress.tokens_per_second(tokens * pcount)
      progress.update(step, metrics["loss"], metrics["lr"], tps)
      if step % config.train.log_every == 0 or step == steps:
        logger.log(step, _train_metrics(window, tps, state))
        window = []
      eval_now = eval_step is not None and config.train.eval_every and step % config.train.eval_every == 0
      if eval_now and step != steps:
        last_eval = _evaluate(eval_step, state.params, val_data, config, config.train.eval_batches)
        logger.log(step, last_eval)
        progress.write(f"step {step}: eval loss {last_eval['eval/loss']:.4f}, accuracy {last_eval['eval/accuracy']:.3f}")
      if metrics["nonfinite_streak"] > config.train.max_nan_streak - 1:
        stopped = "nonfinite"
        break
      if preemption.requested or _preempted_elsewhere(ckpts, step):
        stopped = "sigterm"
        break
      if config.checkpoint.every and step % config.checkpoint.every == 0 and step != steps:
        save(step, last_eval if eval_now else None)
  progress.close()

  if stopped in ("sigterm", "nonfinite"):
    if ckpts.latest_step() != step:
      save(step)
    ckpts.close()
    logger.close()
    where = ckpts.path(step)
    if stopped == "nonfinite":
      raise NonFiniteLossError(
          f"{config.train.max_nan_streak} non-finite (NaN/inf) steps in a row at step {step}: stopped. Those "
          f"updates were skipped, so {where} holds the last good parameters. Lower optim.lr, check the data, "
          "or raise train.max_nan_streak.")
    say(f"SIGTERM: saved {where}; resume with --config.resume=auto")
    return {"step": step, "stopped": "sigterm", "checkpoint": str(where)}

  final = {}
  if eval_step is not None:
    final = _evaluate(eval_step, state.params, val_data, config, config.train.eval_batches)
    logger.log(step, final)
    say(f"eval at step {step}: loss {final['eval/loss']:.4f}, perplexity {final['eval/perplexity']:.2f}, "
        f"token accuracy {final['eval/accuracy']:.3f}")
  if ckpts.latest_step() != step:
    save(step, final or None)
  if examples:
    after = _score_task(step_lib.model_from_state(graphdef, frozen, state.params), tokenizer, config, examples,
                        "after training", log_lib.Progress(0, bar=False, enabled=main))
    results["eval/exact_match_after"] = after.score
    logger.log(step, {"eval/exact_match_after": after.score})
    say(_side_by_side(examples, before, after, config.task.show))
  ckpts.close()
  logger.close()
  train_iter.close()
  say(f"checkpoint: {ckpts.path(step)}  (metrics: {run_dir / log_lib.METRICS_FILE})")
  if stopped == "data":
    say(f"the training data ran out after {step} steps (data.num_epochs={config.data.num_epochs}).")
  return {"step": step, "model_path": model_path, "checkpoint": str(ckpts.path(step)), **final, **results,
          "train/skipped": int(state.skipped)}


def _preempted_elsewhere(ckpts: ckpt_lib.Checkpoints, step: int) -> bool:
  """Multi-host preemption notices (jax.distributed's preemption service); False on one process."""
  if jax.process_count() == 1:
    return False
  return ckpts.reached_preemption(step)


def _train_metrics(window: list[dict[str, float]], tokens_per_s: float | None, state) -> dict[str, float]:
  """Token-weighted loss/accuracy over the steps since the last log line, and the latest lr and grad norm."""
  tokens = sum(m["trained_tokens"] for m in window)
  finite = [m for m in window if m["skipped"] == 0]
  weight = sum(m["trained_tokens"] for m in finite) or 1.0
  out = {
      "train/loss": sum(m["loss"] * m["trained_tokens"] for m in finite) / weight if finite else float("nan"),
      "train/accuracy": sum(m["accuracy"] * m["trained_tokens"] for m in finite) / weight if finite else float("nan"),
      "train/lr": window[-1]["lr"],
      "train/grad_norm": window[-1]["grad_norm"],
      "train/trained_tokens": tokens,
      "train/skipped_total": int(state.skipped),
  }
  if tokens_per_s is not None:
    out["train/tokens_per_s"] = tokens_per_s
  return out
