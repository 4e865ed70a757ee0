"""The pure train step: token-normalised loss, micro-batch accumulation, non-finite skipping.

A batch is a dict of int32 arrays [A, b, T] (A gradient-accumulation micro-batches):
input_ids; loss_mask (1 where input_ids[:, t] is a target, predicted from position t - 1);
segment_ids (0 = padding); positions (restarting at every segment).

The model is split once into a graphdef, the trainable leaves (`TrainState.params`:
LoRA factors, or every Param for full fine-tuning) and the frozen rest (`Frozen`). All
are pure nested dicts of arrays, so a checkpoint of `TrainState` is small under LoRA
and restores without the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtune.data.packing import BATCH_KEYS
from jaxtune.peft.lora import refresh_dropout_keys, split_trainable
from jaxtune.train import grpo, objectives
from jaxtune.train.cross_entropy import fused_cross_entropy
from jaxtune.train.loss_scale import MIN_SCALE, LossScale


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; with the data iterator state it resumes a run exactly."""

  params: Any  # trainable leaves, a pure nested dict (float32 master weights)
  opt_state: Any  # optax state over `params` only
  step: jax.Array  # int32: train_step calls so far, skipped ones included
  rng: jax.Array  # uint32 raw key data; the dropout key of step s, micro-batch i is f(rng, s, i)
  nonfinite_streak: jax.Array  # int32: consecutive skipped steps (0 after a good one)
  skipped: jax.Array  # int32: skipped steps in total
  loss_scale: LossScale | None = None  # float16 runs: the dynamic loss scale (train/loss_scale.py)


class Frozen(NamedTuple):
  """What the step reads but never updates: the frozen weights and the dropout-key slots (pure dicts)."""

  weights: Any
  dropout_keys: Any


def init_train_state(
  model: nnx.Module,
  optimizer: optax.GradientTransformation,
  *,
  method: str = "lora",
  seed: int = 0,
  loss_scale: LossScale | None = None,
) -> tuple[nnx.GraphDef, Frozen, TrainState]:
  """Splits the model into (graphdef, frozen, state); the state's arrays are the model's (not copied).

  The step donates the state, so after the first step rebuild the model with `model_from_state`.
  loss_scale: a `LossScale` to train with dynamic loss scaling (float16), else None.
  """
  graphdef, params, keys, rest = split_trainable(model, method)
  params = nnx.to_pure_dict(params)
  if not jax.tree.leaves(params):
    raise ValueError(
      "peft.method='lora' but the model has no LoRA adapters; call jaxtune.peft.apply_lora first."
      if method == "lora"
      else "the model has no parameters to train."
    )
  zero = lambda: jnp.zeros((), jnp.int32)
  state = _unaliased(
    TrainState(
      params=params,
      opt_state=optimizer.init(params),
      step=zero(),
      rng=jax.random.key_data(jax.random.key(seed)),
      nonfinite_streak=zero(),
      skipped=zero(),
      loss_scale=loss_scale,
    )
  )
  return graphdef, Frozen(nnx.to_pure_dict(rest), nnx.to_pure_dict(keys)), state


def _unaliased(tree: Any) -> Any:
  """Copies leaves that share a buffer with an earlier leaf: a donated state may not hold one buffer twice."""
  seen: set[int] = set()

  def fresh(x):
    if isinstance(x, jax.Array) and id(x) in seen:
      return jnp.copy(x)
    seen.add(id(x))
    return x

  return jax.tree.map(fresh, tree)


def model_from_state(graphdef: nnx.GraphDef, frozen: Frozen, params: Any) -> nnx.Module:
  """The model with the given trainable params (for evaluation, generation, export)."""
  return nnx.merge(graphdef, params, frozen.weights, frozen.dropout_keys)


def loss_weights(batch: dict[str, jax.Array]) -> jax.Array:
  """Which targets the loss counts, float32 [..., T - 1]: the token's loss_mask, within its segment.

  Works on [b, T] and on [A, b, T] (all micro-batches) alike.
  """
  weights = batch["loss_mask"][..., 1:].astype(jnp.float32)
  segments = batch.get("segment_ids")
  if segments is not None:  # a target must be in the same (non-padding) segment as the token before it
    weights *= ((segments[..., 1:] == segments[..., :-1]) & (segments[..., 1:] != 0)).astype(jnp.float32)
  return weights


def loss_fn(
  model: nnx.Module, batch: dict[str, jax.Array], *, chunk: int = 512, scale: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed cross-entropy, trained tokens, correct top-1 predictions) over one [b, T] batch, float32.

  Logits are computed `chunk` positions at a time, so the full [b, T, V] float32 logits never
  exist at once. A plain head goes through `fused_cross_entropy` (gradients formed in the same
  pass); a head with an adapter through `_checkpointed_loss` (chunks recomputed in the backward).
  scale: when given, multiplies every token's weight in the two sums (not in the token count).
  The train step passes 1 / (trained tokens of the whole batch), so the loss comes out as the
  mean and its gradient needs no separate divide: one pass less over every gradient.
  """
  ids = batch["input_ids"]
  hidden, _ = model.hidden_states(ids, segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))
  weights = loss_weights(batch)
  scaled = weights if scale is None else weights * scale
  h, targets = hidden[:, :-1], jnp.maximum(ids[:, 1:], 0)  # virtual slots (ids < 0) are never targets
  head = model.head_weight()
  if head is not None:  # the usual case: logits and their gradient in one pass (train/cross_entropy.py)
    w, layout = head
    loss_sum, correct = fused_cross_entropy(
      h, w.astype(h.dtype), targets, scaled, layout=layout, softcap=model.config.final_softcap, chunk=chunk
    )
  else:
    loss_sum, correct = _checkpointed_loss(model, h, targets, scaled, chunk)
  return loss_sum, jnp.sum(weights), correct


def _checkpointed_loss(model, h, targets, weights, chunk):
  """Loss and correct sums through `model.logits` (any head, adapters included), chunk positions at a time."""
  b, n = targets.shape
  size = max(min(chunk, n), 1)
  num = -(-n // size)
  pad = num * size - n

  def chunks(x):  # [b, n, ...] -> [num, b, size, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, num, size) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def body(carry, xs):
    h_c, t_c, w_c = xs
    logits = model.logits(h_c).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return (carry[0] + jnp.sum(nll * w_c), carry[1] + jnp.sum(correct * w_c)), None

  zero = jnp.zeros((), jnp.float32)
  (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (chunks(h), chunks(targets), chunks(weights)))
  return loss_sum, correct


# Keys a preference batch adds (jaxtune/data/packing.py): KTO labels per token; precomputed reference
# log-probs and reward margins per token. A GRPO batch (train/rollout.py): the sampler's log-probs and
# each completion's advantage, per token.
INT_KEYS = BATCH_KEYS + ("labels",)
FLOAT_KEYS = ("ref_logps", "margins", "old_logps", "advantages")


def _micro_batches(batch: dict[str, Any]) -> dict[str, jax.Array]:
  missing = [k for k in ("input_ids", "loss_mask") if k not in batch]
  if missing:
    raise ValueError(f"batch is missing {missing}; a batch holds {', '.join(BATCH_KEYS)}.")
  out = {k: jnp.asarray(batch[k], jnp.int32) for k in INT_KEYS if k in batch}
  return out | {k: jnp.asarray(batch[k], jnp.float32) for k in FLOAT_KEYS if k in batch}


def _jit(fn: Callable, shardings: tuple[Any, Any, Any] | None, donate: bool) -> Callable:
  kwargs = {"donate_argnums": (0,)} if donate else {}
  if shardings is not None:  # (state or params, frozen, batch)
    kwargs["in_shardings"] = shardings
    kwargs["out_shardings"] = (shardings[0], None) if donate else None
  return jax.jit(fn, **kwargs)


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the step minimises: `name` (objectives.OBJECTIVES), its settings, and for DPO / KTO the graph
  of the reference model (`reference`: the base graph with the adapters off, merged with the frozen
  weights; None when the batches carry precomputed `ref_logps`). pad_id: a reward model pools
  at each sequence's last token that is not the pad token, as transformers does."""

  name: str = "sft"
  settings: Any = None
  reference: nnx.GraphDef | None = None
  pad_id: int = 0


SFT = Objective()


def make_train_step(
  graphdef: nnx.GraphDef,
  frozen: Frozen,
  optimizer: optax.GradientTransformation,
  *,
  lr_schedule: optax.Schedule | None = None,
  loss_chunk: int = 128,
  shardings: tuple[Any, Any, Any] | None = None,
  objective: Objective = SFT,
) -> TrainStep:
  """A jitted `train_step(state, batch) -> (state, metrics)` (a TrainStep); the state is donated.

  SFT weights each token's loss by 1 / (trained tokens of all A micro-batches), counted from the
  batch before any forward pass, so the summed gradients are already the mean's and A
  micro-batches update exactly like one batch A times the size; the sequence objectives divide
  by the batch's example count the same way (objectives.batch_totals). A
  non-finite loss or gradient norm leaves params and optimizer state unchanged. A state with a
  LossScale (float16) scales the loss up and the summed gradients back down (train/loss_scale.py).
  shardings: optional (state, frozen, batch) shardings for jit.
  """

  def step(state: TrainState, frozen: Frozen, batch: dict[str, jax.Array]):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    tokens = jnp.sum(loss_weights(batch))
    scale = 1.0 / jnp.maximum(tokens, 1.0)
    micro_batches = batch["input_ids"].shape[0]
    if objective.name == "grpo":
      totals = grpo.totals(batch)
    else:
      totals = None if objective.name == "sft" else objectives.batch_totals(objective.name, batch)
    reference = None if objective.reference is None else nnx.merge(objective.reference, frozen.weights)
    loss_scale = None if state.loss_scale is None else state.loss_scale.scale
    if loss_scale is not None:  # float16: the scaled loss keeps small gradients representable
      scale = scale * loss_scale

    def grad_of(i, mb):
      """((loss, metric sums), gradients) of micro-batch i."""
      keys = refresh_dropout_keys(frozen.dropout_keys, jax.random.fold_in(step_key, i))

      def loss_of(params):
        model = nnx.merge(graphdef, params, frozen.weights, keys)
        model.set_attributes(deterministic=False, raise_if_not_found=False)  # adapter dropout on
        if totals is None:
          loss, _, correct = loss_fn(model, mb, chunk=loss_chunk, scale=scale)
          return loss, {"accuracy": correct}
        if objective.name == "grpo":
          loss, sums = grpo.loss(objective.settings, model, reference, mb, totals, micro_batches)
          return (loss if loss_scale is None else loss * loss_scale), sums
        loss, sums = objectives.sequence_loss(
          objective.name,
          objective.settings,
          model,
          reference,
          mb,
          totals,
          chunk=loss_chunk,
          pad_id=objective.pad_id,
        )
        return (loss if loss_scale is None else loss * loss_scale), sums

      return jax.value_and_grad(loss_of, has_aux=True)(state.params)

    def micro(carry, xs):
      (loss, sums), grads = grad_of(*xs)
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry[0], grads)
      return (acc, carry[1] + loss, objectives.combine(carry[2], sums)), None

    first = jax.tree.map(lambda x: x[0], batch)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zero = jnp.zeros((), jnp.float32)
    no_sums = objectives.no_sums(jax.eval_shape(grad_of, 0, first)[0][1])
    init = (zeros, zero, no_sums)
    if micro_batches == 1:  # no loop: a smaller program that compiles faster
      (grads, loss, sums), _ = micro(init, (0, first))
    else:
      (grads, loss, sums), _ = jax.lax.scan(micro, init, (jnp.arange(micro_batches), batch))
    if state.loss_scale is not None:
      grads, loss = state.loss_scale.unscale((grads, loss))
      if totals is None:  # SFT's accuracy sum carries the scaled token weights; sequence metrics do not
        sums = state.loss_scale.unscale(sums)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    bad = (~ok).astype(jnp.int32)
    streak = (state.nonfinite_streak + 1) * bad
    if state.loss_scale is not None:  # gradients that overflow a scale still able to shrink: not a streak
      overflow = jnp.isfinite(loss) & (state.loss_scale.scale > MIN_SCALE) & ~ok
      streak = jnp.where(overflow, state.nonfinite_streak, streak)
    new_state = TrainState(
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      step=state.step + 1,
      rng=state.rng,
      nonfinite_streak=streak,
      skipped=state.skipped + bad,
      loss_scale=None if state.loss_scale is None else state.loss_scale.adjust(ok),
    )
    # The optimizer has applied step - skipped updates; that count indexes its schedule.
    lr = lr_schedule(state.step - state.skipped) if lr_schedule is not None else jnp.nan
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": jnp.asarray(lr, jnp.float32),
      "trained_tokens": tokens,
      "skipped": bad,
      "skipped_total": new_state.skipped,
      "nonfinite_streak": new_state.nonfinite_streak,
    }
    for key, value in sums.items():
      per_micro_batch = key in objectives.PER_MICRO_BATCH and objective.name != "grpo"  # GRPO's kl is a token mean
      metrics[key] = value / micro_batches if per_micro_batch else value
    if "rewards/chosen" in sums:
      metrics["rewards/margins"] = metrics.get("rewards/margins", sums["rewards/chosen"] - sums["rewards/rejected"])
    if totals is not None:
      metrics["examples"] = totals["examples"]
    if state.loss_scale is not None:
      metrics["loss_scale"] = state.loss_scale.scale  # the scale this step ran with
    return new_state, metrics

  return TrainStep(_jit(step, shardings, donate=True), frozen)


class TrainStep:
  """`train_step(state, batch) -> (state, metrics)`, jitted, the state donated.

  `lower(state, batch)` lowers it ahead of time (state and batch may be ShapeDtypeStructs; batch
  int32 [A, b, T]); compiling that fills the same cache the calls use.
  """

  def __init__(self, jitted: Callable, frozen: Frozen):
    self._jitted, self._frozen = jitted, frozen

  def __call__(self, state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
    return self._jitted(state, self._frozen, _micro_batches(batch))

  def lower(self, state: Any, batch: dict[str, Any]) -> jax.stages.Lowered:
    return self._jitted.lower(state, self._frozen, {k: batch[k] for k in INT_KEYS + FLOAT_KEYS if k in batch})


def make_eval_step(
  graphdef: nnx.GraphDef,
  frozen: Frozen,
  *,
  loss_chunk: int = 128,
  shardings: tuple[Any, Any, Any] | None = None,
  objective: Objective = SFT,
) -> Callable:
  """A jitted `eval_step(params, batch) -> sums` for [b, T] or [A, b, T] batches.

  SFT: {loss_sum, tokens, correct}: loss = sum(loss_sum) / sum(tokens); perplexity = exp(loss);
  token accuracy = sum(correct) / sum(tokens). Sequence objectives: each metric times what its mean
  divides by, and those divisors (objectives.eval_sums), so a split's metrics are exact means however
  it is batched (`objectives.eval_means` divides).
  """

  def evaluate(params: Any, frozen: Frozen, batch: dict[str, jax.Array]):
    model = nnx.merge(graphdef, params, frozen.weights, frozen.dropout_keys)
    model.set_attributes(deterministic=True, raise_if_not_found=False)
    reference = None if objective.reference is None else nnx.merge(objective.reference, frozen.weights)

    def sums_of(mb):
      if objective.name == "sft":
        loss_sum, tokens, correct = loss_fn(model, mb, chunk=loss_chunk)
        return {"loss_sum": loss_sum, "tokens": tokens, "correct": correct}
      totals = objectives.batch_totals(objective.name, mb)
      loss, means = objectives.sequence_loss(
        objective.name, objective.settings, model, reference, mb, totals, chunk=loss_chunk, pad_id=objective.pad_id
      )
      return objectives.eval_sums(objective.name, loss, means, totals)

    if batch["input_ids"].ndim == 2:
      batch = jax.tree.map(lambda x: x[None], batch)
    first = jax.tree.map(lambda x: x[0], batch)
    zeros = objectives.no_sums(jax.eval_shape(sums_of, first))
    sums, _ = jax.lax.scan(lambda carry, mb: (objectives.combine(carry, sums_of(mb)), None), zeros, batch)
    return sums

  jitted = _jit(evaluate, shardings, donate=False)

  def eval_step(params: Any, batch: dict[str, Any]) -> dict[str, jax.Array]:
    return jitted(params, frozen, _micro_batches(batch))

  return eval_step
