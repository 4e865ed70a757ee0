"""The training loop: `train(config)` from a validated config to a checkpointed, evaluated run.

config -> model + tokenizer -> (LoRA) -> data -> restore -> [train_step, eval, save]* -> final
eval, checkpoint, generation scores. The step itself is pure and lives in step.py; this file
only feeds it, measures it and stops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxtune import configs, parallel, tasks
from jaxtune import data as data_lib
from jaxtune.data import templates
from jaxtune.errors import UserError
from jaxtune.eval import run as eval_run
from jaxtune.hf import load as hf_load
from jaxtune.hf import tokens as tokens_lib
from jaxtune.models import config as model_config_lib
from jaxtune.models import options as options_lib
from jaxtune.models import quantize as quantize_lib
from jaxtune.parallel import load as parallel_load
from jaxtune.peft import lora as lora_lib
from jaxtune.peft import methods as peft_methods
from jaxtune.peft.import_adapter import load_adapter
from jaxtune.train import builtin_models, faults, objectives, optim, preemption, run_lock
from jaxtune.train import checkpoint as ckpt_lib
from jaxtune.train import config as config_lib
from jaxtune.train import logging as log_lib
from jaxtune.train import memory as memory_lib
from jaxtune.train import reference as ref_lib
from jaxtune.train import rollout as rollout_lib
from jaxtune.train import step as step_lib
from jaxtune.train.loss_scale import LossScale


class NonFiniteLossError(UserError, RuntimeError):
  """Too many non-finite steps in a row; the last good parameters are checkpointed."""


@dataclasses.dataclass
class Run:
  """What a run is made of once set up: config, data, the split model and its TrainState, outputs."""

  config: ml_collections.ConfigDict
  run_dir: pathlib.Path
  main: bool  # process 0: the one that logs
  model_path: str
  tokenizer: Any
  train_iter: data_lib.BatchIterator | rollout_lib.Rollout  # GRPO: batches sampled from the model each step
  val_data: Any  # SplitData or None
  examples: list[tasks.Example]
  graphdef: Any
  frozen: step_lib.Frozen
  state: step_lib.TrainState
  optimizer: Any
  ckpts: ckpt_lib.Checkpoints
  shardings: parallel.TrainShardings  # where params, optimizer state and batches live on the mesh
  objective: step_lib.Objective = step_lib.SFT  # what the step minimises (train/objectives.py)
  start: int = 0  # the step restored from (0: a fresh run)
  lock: run_lock.RunLock | None = None  # process 0's lock on run_dir

  def model(self):
    return step_lib.model_from_state(self.graphdef, self.frozen, self.state.params)

  def say(self, message: str) -> None:
    log_lib.info(message, self.main)

  def close(self) -> None:
    """Waits for pending checkpoint writes, stops the data threads, unlocks run_dir (each even if one fails)."""
    with contextlib.ExitStack() as later:
      if self.lock is not None:
        later.callback(self.lock.release)
      later.callback(self.train_iter.close)
      self.ckpts.close()

  def save(self, step: int, metrics: dict | None = None) -> None:
    self.ckpts.save(
      step, self.state, data_state=self.train_iter.get_state(), config=self.config.to_dict(), metrics=metrics
    )


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A validated config with every "auto" resolved for this platform, and why each resolved as it did."""

  config: ml_collections.ConfigDict
  model_config: model_config_lib.ModelConfig
  notes: tuple[str, ...]  # e.g. "attention: chunked (auto: ...)"


def prepare(config: ml_collections.ConfigDict, workdir: str | None = None) -> Prepared:
  """Validates `config` and resolves it for this platform; loads no weights (`--print_config` shows this).

  workdir, when given, replaces config.output_dir. Raises ConfigError when the config cannot work.
  """
  if workdir:
    config = ml_collections.ConfigDict(config.to_dict())
    config.output_dir = str(workdir)
  config_lib.validate(config, jax.process_count())
  # The checkpoint's config.json (fetched first for a hub id) decides what attention "auto" can use.
  model_cfg = model_config_lib.load_config(
    hf_load.resolve(builtin_models.resolve(config.model.path, config.model.cache_dir))
  )
  platform = jax.default_backend()
  resolved = config_lib.resolve(config, platform, model_cfg)
  notes = []
  if config.model.attention_impl == "auto":
    _, why = config_lib.auto_attention(resolved, platform, model_cfg)
    notes.append(f"attention: {resolved.model.attention_impl} (auto: {why})")
  if config.model.kernels == "auto":
    notes.append(f"kernels: {resolved.model.kernels} (auto: {options_lib.auto_kernels(platform)[1]})")
  return Prepared(resolved, model_cfg, tuple(notes))


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, Any]:
  """Runs (or resumes) the training run of `config`; returns its final metrics.

  workdir, when given, replaces config.output_dir. Raises ConfigError before loading anything
  when the config cannot work, and NonFiniteLossError when the loss stays NaN/inf.
  """
  prepared = prepare(config, workdir)
  config = prepared.config
  if jax.process_index() == 0:
    log_lib.info("config (saved as config.json in the run directory):", True)
    configs.dump(config)
  run = setup(config)
  for note in prepared.notes:
    run.say(note)
  try:
    logger = log_lib.MetricsLogger(
      run.run_dir,
      enabled=run.main,
      tensorboard=config.logging.tensorboard,
      wandb_project=config.logging.wandb_project,
      wandb_entity=config.logging.wandb_entity,
      wandb_run_name=config.logging.wandb_run_name,
      config=run.config.to_dict(),
      start_step=run.start,
    )
  except BaseException:  # e.g. a full disk: the run directory is unlocked and its saves finished
    run.close()
    raise
  results: dict[str, Any] = {}
  try:
    before = None
    if run.examples and config.task.before and run.start == 0:  # the model training starts from
      before = _score_task(run, "before training")
      results.update(_task_metrics(before, "before"))
      logger.log(0, _task_metrics(before, "before"))
    step, stopped, final = _train_loop(run, logger)
    if stopped in ("sigterm", "nonfinite"):
      return _stop(run, step, stopped)
    if run.examples:
      after = _score_task(run, "after training")
      results.update(_task_metrics(after, "after"))
      logger.log(step, _task_metrics(after, "after"))
      run.say(_side_by_side(run.examples, before, after, config.task.show))
  finally:
    logger.close()
    run.close()
  run.say(f"checkpoint: {run.ckpts.path(step)}  (metrics: {run.run_dir / log_lib.METRICS_FILE})")
  if stopped == "data":
    run.say(f"the training data ran out after {step} steps (data.num_epochs={config.data.num_epochs}).")
  if stopped == "early":
    run.say(
      f"stopped early at step {step}: {config.train.early_stop_metric} did not improve for "
      f"{config.train.early_stop_patience} evaluations (train.early_stop_patience)."
    )
  return {
    "step": step,
    "stopped": stopped,
    "model_path": run.model_path,
    "checkpoint": str(run.ckpts.path(step)),
    "train/skipped": int(run.state.skipped),
    **final,
    **results,
  }


def setup(config: ml_collections.ConfigDict) -> Run:
  """Locks the run directory (one run per output_dir), then builds the run in it; `Run.close` unlocks."""
  run_dir = pathlib.Path(config.output_dir).expanduser().absolute()
  lock = run_lock.acquire_for_run(run_dir, jax.process_index(), jax.process_count())
  try:
    run = _open(config, run_dir)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  run.lock = lock
  return run


def _open(config: ml_collections.ConfigDict, run_dir: pathlib.Path) -> Run:
  """Checkpoints, run directory, tokenizer, data, model (+ LoRA), TrainState, restored when resuming."""
  main = jax.process_index() == 0
  ckpts = ckpt_lib.Checkpoints(
    run_dir / "checkpoints",
    keep=config.checkpoint.keep,
    keep_best=config.checkpoint.keep_best,
    async_save=config.checkpoint.async_save,
  )
  if config.resume == "never" and ckpts.latest_step() is not None:
    ckpts.close()
    raise config_lib.ConfigError(
      f"resume: 'never', but {ckpts.directory} already holds checkpoints "
      f"(steps {ckpts.steps()}); set resume=auto or use a new output_dir."
    )
  try:
    if main:
      with faults.writing(str(run_dir / "config.json"), None, ckpts.directory):
        config_lib.write(config, run_dir)
    run = _build(config, run_dir, main, ckpts)
  except BaseException:
    ckpts.close()
    raise
  if config.resume == "auto":
    try:
      restored = ckpts.restore(run.state, config.to_dict())
    except BaseException:
      run.close()
      raise
    if restored is not None:
      run.state, run.start = restored.state, restored.step
      if restored.data_state is not None:
        run.train_iter.set_state(restored.data_state)
      run.say(f"resumed from {restored.path} (step {restored.step})")
  return run


def _build(config: ml_collections.ConfigDict, run_dir: pathlib.Path, main: bool, ckpts: ckpt_lib.Checkpoints) -> Run:
  """Tokenizer, data iterators, task examples, model (+ LoRA) and a fresh TrainState."""
  model_path = builtin_models.resolve(config.model.path, config.model.cache_dir)
  tokenizer = hf_load.load_tokenizer(model_path)
  template = templates.resolve(config.data.chat_template)
  if template:  # the configured template formats the task's prompts too, as it does the training data
    tokenizer.chat_template = template
  pid, pcount = jax.process_index(), jax.process_count()
  rollout, train_data, val_data = None, None, None
  if config.objective == "grpo":  # prompts, not tokenised examples: the batches are sampled each step
    rollout = rollout_lib.Rollout(config, tokenizer, rollout_lib.load_prompts(config.data.train))
  else:
    train_data = data_lib.load_split(config.data, tokenizer, "train")
    data_lib.check_kind(train_data.kind, config.objective, train_data.sources)
    if config.train.eval and (config.data.validation or config.data.validation_fraction):
      val_data = data_lib.load_split(config.data, tokenizer, "validation")
  examples = []
  if config.task.test_file:
    examples = tasks.load_examples(config.task.test_file, config.task.num_examples)
  elif config.data.test_fraction:  # the held-out test split, scored with the task's metrics before and after
    examples = eval_run.split_examples(config.data, "test")[: config.task.num_examples or None]

  mesh = parallel.make_mesh(config.mesh)
  log_lib.info(_devices_line(mesh), main)
  rules = config.mesh.rules
  rows = parallel.batch_sharding(mesh, rules, accumulated=False)
  row_shards = mesh.size // rows.shard_shape((mesh.size, 1))[0]
  micro_rows = config.data.batch_size // config.train.grad_accum
  if micro_rows % row_shards:
    raise config_lib.ConfigError(
      f"data.batch_size / train.grad_accum = {micro_rows} rows per micro-batch do not split over the {row_shards} "
      f"devices that share the batch (mesh {dict(mesh.shape)}); make it a multiple of {row_shards}."
    )
  # Each layer's input stays split by batch rows, so under FSDP XLA gathers one layer's weights at a
  # time instead of the whole batch.
  options = config_lib.model_options(config, jax.default_backend(), parallel.ActivationSharding(mesh, rules))
  # Every process reads only the slices of each tensor that its own devices hold.
  model = parallel_load.load_model_sharded(model_path, mesh, rules, options)
  if config.peft.method == "lora" and config.model.adapter:  # continue from a trained adapter
    base = builtin_models.base_name(config.model.path, config.model.hub_id, model_path)
    model = load_adapter(model, config.model.adapter, base)
    config.peft.lora.update(lora_lib.adapter_settings(model))  # saved with each checkpoint: exports rebuild them
  else:
    peft_methods.apply(model, config.peft, rngs=nnx.Rngs(config.train.seed), tokenizer=tokenizer)
  if config.objective == "reward":
    model.add_score_head(seed=config.train.seed)
  reference = _reference_mode(config, train_data)
  if reference == "precomputed":  # the model as training starts (fresh adapters add nothing) is the reference
    say = lambda message: log_lib.info(message, main)
    fingerprint = ref_lib.model_fingerprint(
      model_path, options.dtype, options.kernels, config.model.attention_impl, config.model.adapter
    )
    train_data = _with_reference(train_data, model, config, fingerprint, say)
    val_data = val_data and _with_reference(val_data, model, config, fingerprint, say)
  live = reference == "live" or (config.objective == "grpo" and config.grpo.beta > 0)
  objective = step_lib.Objective(
    config.objective,
    objectives.settings(config),
    lora_lib.base_graphdef(model) if live else None,
    pad_id=tokens_lib.pad_id(tokenizer),
  )
  if rollout is not None:
    train_iter, per_epoch = rollout, rollout.batches_per_epoch * config.grpo.num_iterations
  else:
    train_iter = data_lib.loader_for(train_data, config.data, process_index=pid, process_count=pcount)
    per_epoch = train_iter.stats.batches_per_epoch
  if config.train.steps == 0:  # sized by epochs: the schedule decays over exactly the data's batches
    config.train.steps = config.data.num_epochs * per_epoch
    log_lib.info(
      f"train.steps=0: {config.data.num_epochs} epoch(s) x {per_epoch} batches = {config.train.steps} steps",
      main,
    )
    if main:
      config_lib.write(config, run_dir)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  scale = LossScale.create(config.train.loss_scale_growth_interval) if config.train.loss_scale == "dynamic" else None
  shardings = parallel.train_shardings(model, optimizer, mesh, rules, method=config.peft.method, loss_scale=scale)
  graphdef, frozen, state = step_lib.init_train_state(
    model, optimizer, method=config.peft.method, seed=config.train.seed, loss_scale=scale
  )
  frozen, state = parallel.place(frozen, shardings.frozen), parallel.place(state, shardings.state)
  return Run(
    config,
    run_dir,
    main,
    model_path,
    tokenizer,
    train_iter,
    val_data,
    examples,
    graphdef,
    frozen,
    state,
    optimizer,
    ckpts,
    shardings,
    objective,
  )


def _reference_mode(config: ml_collections.ConfigDict, train_data: Any) -> str | None:
  """live | precomputed for DPO and KTO (config key `reference`), None for the objectives without one.

  auto: precomputed under full fine-tuning (no reference weights are kept), when the adapters start
  from model.adapter (the adapters-off model is not the starting model then), and under LoRA
  when the run sees every training example at least once, so the pass costs at most the reference
  forwards it replaces; live otherwise.
  """
  if config.objective not in objectives.WITH_REFERENCE:
    return None
  if config.reference != "auto":
    return config.reference
  seen = config.train.steps * config.data.batch_size if config.train.steps else math.inf  # 0: whole epochs
  if config.peft.method != "lora" or config.model.adapter or seen >= train_data.stats.examples:
    return "precomputed"
  return "live"


def _with_reference(split: Any, model: Any, config: ml_collections.ConfigDict, fingerprint: str, say) -> Any:
  """`split` with each source's examples carrying the model's reference log-probs (cached in data.cache_dir)."""
  cache_dir = pathlib.Path(config.data.cache_dir).expanduser() if config.data.cache_dir else None
  buckets = data_lib.bucket_lengths(tuple(config.data.bucket_lengths), config.data.max_seq_len)
  examples = []
  for i, part in enumerate(split.examples):
    cache = cache_dir / f"ref-{split.fingerprint[:16]}-{i}-{fingerprint}.npy" if cache_dir else None
    examples.append(ref_lib.attach(part, model, cache=cache, buckets=buckets, say=say, label=f" ({split.split})"))
  return dataclasses.replace(split, examples=examples)


def preflight(run: Run) -> str:
  """What the run is about to do: the data, the steps and epochs it makes, the parameters it trains."""
  if isinstance(run.train_iter, rollout_lib.Rollout):
    return _rollout_preflight(run)
  config, stats = run.config, run.train_iter.stats
  steps, todo = config.train.steps, config.train.steps - run.start
  trained = sum(x.size for x in jax.tree.leaves(run.state.params))
  total = quantize_lib.weight_count(run.model())
  per_epoch = stats.batches_per_epoch
  lines = [
    f"pre-flight: {stats.examples:,} training examples, {stats.tokens:,} tokens, {stats.trainable_tokens:,} of them "
    f"trained ({stats.trainable_fraction:.1%})",
    f"  {per_epoch:,} batches of {config.data.batch_size} rows per epoch (packing {config.data.packing}, "
    f"efficiency {stats.packing_efficiency:.1%}); steps {run.start + 1}..{steps} = {todo / per_epoch:.2f} epochs",
    f"  training {trained:,} of {total:,} parameters ({config.peft.method}); run directory {run.run_dir}",
  ]
  epochs = config.data.num_epochs
  if epochs and steps > epochs * per_epoch:
    lines.append(
      f"  note: data.num_epochs={epochs} holds {epochs * per_epoch:,} batches, so the run stops there, before "
      f"train.steps={steps}; set data.num_epochs=0 to repeat the data"
    )
  return "\n".join(lines)


def _rollout_preflight(run: Run) -> str:
  config, rollout, g = run.config, run.train_iter, run.config.grpo
  trained = sum(x.size for x in jax.tree.leaves(run.state.params))
  return "\n".join(
    [
      f"pre-flight: GRPO ({g.loss_type}, advantage {g.advantage}) on {len(rollout.prompts):,} prompts, "
      f"{rollout.per_step} per step x {g.num_generations} completions of up to {g.max_completion_length} tokens "
      f"(rows of {rollout.longest_row}: prompts padded to {rollout.prompt_len})",
      f"  rewards {', '.join(f'{w:g} x {r.name}' for r, w in zip(rollout.rewards, rollout.weights))}; "
      f"{g.num_iterations} step(s) per sampled batch; steps {run.start + 1}..{config.train.steps}",
      f"  training {trained:,} parameters ({config.peft.method}); run directory {run.run_dir}",
    ]
  )


def _devices_line(mesh: jax.sharding.Mesh) -> str:
  """`devices: 8 x TPU v5 lite (tpu), 2 processes; mesh data=1 fsdp=8 tensor=1`."""
  device = mesh.devices.flat[0]
  processes = jax.process_count()
  return (
    f"devices: {mesh.size} x {device.device_kind} ({device.platform})"
    + (f", {processes} processes" if processes > 1 else "")
    + "; mesh "
    + " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
  )


def _train_loop(run: Run, logger: log_lib.MetricsLogger) -> tuple[int, str | None, dict[str, float]]:
  """Steps run.start+1 .. train.steps; returns (last step, why it stopped early or None, final eval)."""
  config = run.config
  cfg_train, steps = config.train, config.train.steps
  sh = run.shardings
  train_step = step_lib.make_train_step(
    run.graphdef,
    run.frozen,
    run.optimizer,
    lr_schedule=optim.make_schedule(config.optim, steps),
    shardings=sh.step_args,
    objective=run.objective,
  )
  evaluate = None
  rollout = run.train_iter if isinstance(run.train_iter, rollout_lib.Rollout) else None
  if rollout is not None:  # held-out generation metrics (train.eval_metrics) and a few sampled completions
    evaluate = lambda: (_show_completions(run, rollout, progress), _generation_metrics(run))[1]
  elif run.val_data is not None:
    eval_rows = parallel.batch_sharding(sh.batch.mesh, config.mesh.rules, accumulated=False)
    eval_step = step_lib.make_eval_step(
      run.graphdef, run.frozen, shardings=(sh.state.params, sh.frozen, eval_rows), objective=run.objective
    )
    evaluate = lambda: {
      **_evaluate(eval_step, run.state.params, run.val_data, config, eval_rows, run.objective.name),
      **_generation_metrics(run),
    }
  watch = _EarlyStop(config.train) if config.train.early_stop_patience else None
  _check_memory(run, train_step)
  run.say(preflight(run))
  progress = log_lib.Progress(steps, run.start, bar=config.logging.progress, enabled=run.main)
  record = _Recorder(logger, progress, cfg_train.log_every, steps)
  # Overlap: step s's metrics are read only once step s + 1 is on the device, so the host's work
  # (next batch, transfer, dispatch, logging) hides behind device compute. A step is read at once
  # when anything needs its state: a checkpoint, an eval, the last step, a stop signal, or a
  # non-finite streak that this step could bring to train.max_nan_streak. So every save, eval
  # and stop happens at exactly the step it would without overlap.
  step, stopped = run.start, None
  streak = int(run.state.nonfinite_streak)  # of the newest step whose metrics the host has read
  pending = None  # (step, metrics on the device, tokens): dispatched, not read yet
  with preemption.Notice() as notice:
    for step in range(run.start + 1, steps + 1):
      if rollout is not None:
        batch, rolled = rollout.batch(run.model(), step)
      else:
        batch = next(run.train_iter, None)
      if batch is None:
        step, stopped = step - 1, "data"
        break
      tokens = float(np.count_nonzero(batch["segment_ids"])) * jax.process_count()
      started = time.perf_counter()
      run.state, metrics = train_step(
        run.state, parallel.shard_batch(_micro_batches(batch, cfg_train.grad_accum), sh.batch)
      )
      if rollout is not None:  # the next batch is sampled from this step's weights: nothing to overlap
        metrics = _with_rollout(jax.block_until_ready(metrics), rolled, time.perf_counter() - started)
      if pending is not None:
        streak = record(*pending)["nonfinite_streak"]
        pending = None
      save = bool(config.checkpoint.every) and step % config.checkpoint.every == 0
      eval_now = evaluate is not None and bool(cfg_train.eval_every) and step % cfg_train.eval_every == 0
      signalled = notice.reached(step)  # every step, on every process (preemption.py)
      if (
        cfg_train.overlap
        and step < steps
        and not (save or eval_now or signalled)
        and streak + 1 < cfg_train.max_nan_streak
      ):
        pending = (step, metrics, tokens)
        continue
      streak = record(step, metrics, tokens)["nonfinite_streak"]
      if streak >= cfg_train.max_nan_streak:
        stopped = "nonfinite"
        break
      if signalled:
        stopped = "sigterm"
        break
      if step == steps:
        break
      eval_metrics = None
      if eval_now:
        eval_metrics = evaluate()
        logger.log(step, eval_metrics)
        if _eval_line(eval_metrics):
          progress.write(f"step {step}: {_eval_line(eval_metrics)}")
        if watch is not None and watch(eval_metrics):
          stopped = "early"
      if save or stopped == "early":
        run.save(step, eval_metrics)
      if stopped == "early":
        break
  if pending is not None:  # the data ran out right after a step left unread
    record(*pending)
  progress.close()
  if stopped not in (None, "data", "early"):
    return step, stopped, {}
  final = evaluate() if evaluate is not None and stopped != "early" else {}
  if final:
    logger.log(step, final)
    if _eval_line(final):
      run.say(f"eval at step {step}: {_eval_line(final)}")
  if run.ckpts.latest_step() != step:
    run.save(step, final or None)
  return step, stopped, final


class _EarlyStop:
  """Called with each evaluation's metrics: True once the watched metric has not improved for `patience` evals."""

  def __init__(self, cfg_train: ml_collections.ConfigDict):
    self.key, self.patience = cfg_train.early_stop_metric, cfg_train.early_stop_patience
    self.sign = 1.0 if cfg_train.early_stop_mode == "min" else -1.0
    self.delta, self.best, self.waited = cfg_train.early_stop_min_delta, math.inf, 0

  def __call__(self, metrics: dict[str, float]) -> bool:
    if self.key not in metrics:
      raise config_lib.ConfigError(
        f"train.early_stop_metric: {self.key!r} is not among the evaluation's metrics ({', '.join(sorted(metrics))})."
      )
    value = self.sign * metrics[self.key]
    if value < self.best - self.delta:
      self.best, self.waited = value, 0
    else:
      self.waited += 1
    return self.waited >= self.patience


def _generation_metrics(run: Run) -> dict[str, float]:
  """train.eval_metrics on the task's examples, as eval/<name> (empty when none are asked for)."""
  names = [n for n in run.config.train.eval_metrics.split(",") if n.strip()]
  if not names or not run.examples:
    return {}
  task = run.config.task
  result = tasks.evaluate(
    run.model(),
    run.tokenizer,
    run.examples,
    names[0],
    metrics=names[1:],
    max_new_tokens=task.max_new_tokens,
    batch_size=task.batch_size,
  )
  return {f"eval/{name}": value for name, value in result.scored.values.items()}


def _check_memory(run: Run, train_step: step_lib.TrainStep) -> None:
  """Compiles the step for the data's longest rows before the first batch; stops if it cannot fit (train/memory.py)."""
  config = run.config
  accum = config.train.grad_accum
  shape = (accum, config.data.batch_size // accum, run.train_iter.longest_row)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.shardings.batch) for k in step_lib.BATCH_KEYS}
  if config.objective == "kto":
    batch["labels"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.shardings.batch)
  if config.objective in objectives.WITH_REFERENCE and run.objective.reference is None:
    batch["ref_logps"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=run.shardings.batch)
  if config.objective == "grpo":
    for key in ("old_logps", "advantages"):
      batch[key] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=run.shardings.batch)
  run.say(f"compiling the train step for batches of shape {list(shape)} (micro-batches, rows, tokens)")
  memory = memory_lib.of_compiled(train_step.lower(run.state, batch).compile())
  if memory is None:
    return
  if isinstance(run.train_iter, rollout_lib.Rollout):  # the sampler runs between steps: the larger one must fit
    sampler = memory_lib.of_compiled(run.train_iter.lower(run.model()).compile())
    run.say(f"sampler (KV cache of {config.data.batch_size} x {run.train_iter.longest_row}): {sampler.describe()}")
    memory = max(memory, sampler, key=lambda m: m.extra)
  free = memory_lib.device_free(jax.local_devices()[0], jax.local_device_count())
  run.say(
    f"train step: {memory.describe()}"
    + (f"; {free.where} has {free.bytes / memory_lib.GIB:.2f} GiB free" if free else "")
  )
  if free is not None:
    memory_lib.check(memory, free, shape=shape, method=config.peft.method)


def _stop(run: Run, step: int, why: str) -> dict[str, Any]:
  """After a preemption notice or a NaN streak: checkpoint the current (last good) parameters, then return or raise."""
  if run.ckpts.latest_step() != step:
    run.save(step)
  run.ckpts.wait()
  where = run.ckpts.path(step)
  if why == "nonfinite":
    limit = run.config.train.max_nan_streak
    raise NonFiniteLossError(
      f"{limit} non-finite (NaN/inf) steps in a row at step {step}: stopped. Those updates were skipped, so "
      f"{where} holds the last good parameters. Lower optim.lr, check the data, or raise train.max_nan_streak."
    )
  run.say(f"SIGTERM: saved {where}; resume with --config.resume=auto")
  return {"step": step, "stopped": "sigterm", "checkpoint": str(where)}


def _with_rollout(metrics: dict, rolled: dict[str, float], train_s: float) -> dict:
  """A GRPO step's metrics with its rollout's, and the shares of the step's time in generation and training."""
  generation_s = rolled["time/generation_s"]
  return {
    **metrics,
    **rolled,
    "time/train_s": train_s,
    "time/generation_share": generation_s / (generation_s + train_s),
  }


def _show_completions(run: Run, rollout: rollout_lib.Rollout, progress: log_lib.Progress) -> None:
  for prompt, completion, reward in rollout.last[: run.config.grpo.show_completions]:
    progress.write(f"--- {prompt}\n  sampled (reward {reward:.3g}): {completion!r}")


def _micro_batches(batch: dict[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
  """[B, T] -> [A, B / A, T]."""
  return {k: v.reshape((grad_accum, v.shape[0] // grad_accum) + v.shape[1:]) for k, v in batch.items()}


def _evaluate(
  eval_step: Callable,
  params: Any,
  val_data: Any,
  config: ml_collections.ConfigDict,
  rows: jax.sharding.NamedSharding,
  objective: str = "sft",
) -> dict[str, float]:
  """The validation split's metrics (its first train.eval_batches batches): SFT loss, perplexity and
  token accuracy; a preference objective's loss and reward metrics under TRL's names."""
  micro = config.data.batch_size // config.train.grad_accum
  loader = data_lib.loader_for(
    val_data,
    config.data,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    batch_size=micro * jax.process_count(),
  )
  outs = []  # read once at the end, so batch i + 1 is dispatched while batch i runs
  for i, batch in enumerate(loader):
    if config.train.eval_batches and i >= config.train.eval_batches:
      break
    outs.append(eval_step(params, parallel.shard_batch(batch, rows)))
  loader.close()
  if objective != "sft":
    sums = jax.tree.map(lambda *xs: sum(float(x) for x in xs), *jax.device_get(outs))
    return {f"eval/{k}": v for k, v in objectives.eval_means(objective, sums).items()}
  totals = np.zeros(3)  # float64 sums on the host
  for out in jax.device_get(outs):
    totals += [float(out["loss_sum"]), float(out["tokens"]), float(out["correct"])]
  loss = totals[0] / max(totals[1], 1.0)
  return {
    "eval/loss": loss,
    "eval/perplexity": math.exp(min(loss, 80.0)),
    "eval/accuracy": totals[2] / max(totals[1], 1.0),
    "eval/tokens": totals[1],
  }


# A preference objective's metrics on the progress bar, under short names.
_SHOWN = {"rewards/accuracies": "acc", "rewards/margins": "margin", "margin": "margin", "kl": "kl"}


class _Recorder:
  """Reads a dispatched step's metrics, updates the progress bar, logs every log_every steps and the last."""

  ETA_AFTER = 3  # steps timed after the first (which compiles) before the ETA is announced

  def __init__(self, logger: log_lib.MetricsLogger, progress: log_lib.Progress, log_every: int, last: int):
    self._logger, self._progress, self._log_every, self._last = logger, progress, log_every, last
    self._window: list[dict[str, float]] = []  # the steps since the last log line
    self._first: tuple[int, float] | None = None  # (step, time) the first step finished: the clock starts there

  def __call__(self, step: int, metrics: dict[str, jax.Array], tokens: float) -> dict[str, float]:
    """Blocks until `step` has finished; returns its metrics as floats."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self._announce_eta(step)
    self._window.append(metrics)
    tokens_per_s = self._progress.tokens_per_second(tokens)
    shown = {name: metrics[key] for key, name in _SHOWN.items() if key in metrics}
    self._progress.update(step, metrics["loss"], metrics["lr"], tokens_per_s, shown)
    if step % self._log_every == 0 or step == self._last:
      self._logger.log(step, _train_metrics(self._window, tokens_per_s))
      self._window = []
    return metrics

  def _announce_eta(self, step: int) -> None:
    now = time.perf_counter()
    if self._first is None:
      self._first = (step, now)
    elif step - self._first[0] == self.ETA_AFTER and step < self._last:
      per_step = (now - self._first[1]) / self.ETA_AFTER
      left = per_step * (self._last - step)
      self._progress.write(
        f"ETA: {per_step:.3g} s/step, about {_duration(left)} for the {self._last - step:,} steps left "
        "(evaluations and saves come on top)"
      )


def _duration(seconds: float) -> str:
  minutes, s = divmod(int(round(seconds)), 60)
  hours, m = divmod(minutes, 60)
  return f"{hours} h {m:02d} min" if hours else (f"{m} min {s:02d} s" if m else f"{s} s")


def _train_metrics(window: list[dict[str, float]], tokens_per_s: float | None) -> dict[str, float]:
  """Token-weighted loss and accuracy over the steps since the last log line; the latest lr and grad norm."""
  finite = [m for m in window if m["skipped"] == 0]
  weight = sum(m["trained_tokens"] for m in finite)
  mean = lambda key: sum(m[key] * m["trained_tokens"] for m in finite) / weight if weight else float("nan")
  out = {
    "train/loss": mean("loss"),
    "train/lr": window[-1]["lr"],
    "train/grad_norm": window[-1]["grad_norm"],
    "train/trained_tokens": sum(m["trained_tokens"] for m in window),
    "train/skipped_total": int(window[-1]["skipped_total"]),
  }
  if "accuracy" in window[-1]:  # GRPO has none
    out["train/accuracy"] = mean("accuracy")
  if "loss_scale" in window[-1]:  # float16 runs
    out["train/loss_scale"] = window[-1]["loss_scale"]
  if tokens_per_s is not None:
    out["train/tokens_per_s"] = tokens_per_s
  # A preference objective's metrics (TRL's names: rewards/chosen, logps/rejected, kl, ...), averaged
  # over the window's good steps.
  for key in sorted(set(window[-1]) - _STEP_KEYS):
    values = [m[key] for m in finite]
    out[f"train/{key}"] = sum(values) / len(values) if values else float("nan")
  return out


# What every step reports; anything else is an objective's own metric (logged as train/<name>).
_STEP_KEYS = {
  "loss",
  "grad_norm",
  "lr",
  "trained_tokens",
  "accuracy",
  "skipped",
  "skipped_total",
  "nonfinite_streak",
  "loss_scale",
}


def _eval_line(metrics: dict[str, float]) -> str:
  """One line: SFT's loss, perplexity and token accuracy; or a preference objective's loss and rewards."""
  if "eval/perplexity" in metrics:
    return (
      f"eval loss {metrics['eval/loss']:.4f}, perplexity {metrics['eval/perplexity']:.2f}, "
      f"token accuracy {metrics['eval/accuracy']:.3f}"
    )
  shown = ["loss", "rewards/accuracies", "rewards/margins", "accuracy", "margin"]
  line = ", ".join(f"eval {k} {metrics['eval/' + k]:.4f}" for k in shown if f"eval/{k}" in metrics)
  return line or ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())  # GRPO: the generation metrics


def _score_task(run: Run, label: str) -> tasks.Result:
  """task.scorer (and task.metrics, with 95% intervals) of greedy generations on the task's held-out examples."""
  task = run.config.task
  start = time.perf_counter()
  result = tasks.evaluate(
    run.model(),
    run.tokenizer,
    run.examples,
    task.scorer,
    metrics=[n for n in task.metrics.split(",") if n.strip()],
    max_new_tokens=task.max_new_tokens,
    batch_size=task.batch_size,
  )
  scored = result.scored
  others = [
    f"{name} {value:.1%} [{scored.intervals[name][0]:.1%}, {scored.intervals[name][1]:.1%}]"
    for name, value in scored.values.items()
    if name != result.scorer
  ]
  run.say(
    f"{task.scorer} {label}: {sum(c == 1.0 for c in result.correct)}/{len(run.examples)} = {result.score:.0%} "
    + (f"({'; '.join(others)}) " if others else "")
    + f"({time.perf_counter() - start:.0f} s to generate)"
  )
  return result


def _task_metrics(result: tasks.Result, when: str) -> dict[str, float]:
  """eval/exact_match_<when> (the primary scorer) and eval/<metric>_<when> with its interval bounds."""
  out = {f"eval/exact_match_{when}": result.score}
  for name, value in result.scored.values.items():
    lo, hi = result.scored.intervals[name]
    out.update({f"eval/{name}_{when}": value, f"eval/{name}_{when}_ci_low": lo, f"eval/{name}_{when}_ci_high": hi})
  return out


def _side_by_side(examples: list[tasks.Example], before: tasks.Result | None, after: tasks.Result, show: int) -> str:
  lines = []
  for i, ex in enumerate(examples[:show]):
    lines += [f"--- {ex.prompt[-1]['content']}", f"  reference: {ex.reference}"]
    if before is not None:
      lines.append(f"  before:    {before.predictions[i]!r}  {'OK' if before.correct[i] == 1.0 else 'wrong'}")
    lines.append(f"  after:     {after.predictions[i]!r}  {'OK' if after.correct[i] == 1.0 else 'wrong'}")
  return "\n".join(lines)
