"""GRPO and its variants (bnpo, dr_grpo, dapo), with a group or leave-one-out (RLOO) baseline.

A GRPO batch is made each step by sampling (train/rollout.py): one row per completion, the prompt
left-padded to a fixed length P and the completion after it (`max_completion_length` N tokens,
padding after the stop token). Rows carry the sampler's per-token log-probs (`old_logps`) and the
completion's advantage on every position (`advantages`), so every batch array is [A, b, T] and
shards by rows like any other batch.

The definitions follow TRL 1.16 (`trl/trainer/grpo_trainer.py`: `_generate_and_score_completions`
for the advantages, `_compute_loss` for the loss; `rloo_trainer.py` for the leave-one-out
baseline). Log-probs are those of logits / temperature, as TRL's. TRL normalises per micro-batch;
here the divisors are counted over the whole batch before the forward pass (as every objective's
are), which is TRL's value for a batch of one micro-batch; bnpo keeps TRL's per-micro-batch token mean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtune.errors import ConfigError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGES = ("group", "rloo")
IMPORTANCE_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


def grpo_config() -> ml_collections.ConfigDict:
  """The `grpo` section: TRL 1.16's GRPOConfig names and defaults, plus the rollout's data and rewards."""
  return ml_collections.ConfigDict(
    dict(
      num_generations=8,  # G completions per prompt; data.batch_size counts completions (a multiple of G)
      loss_type="dapo",  # grpo | bnpo | dr_grpo | dapo
      beta=0.0,  # KL (k3) to the reference; 0 loads nothing (LoRA: the reference is the base, adapters off)
      epsilon=0.2,  # clip range below 1 (and above, unless epsilon_high is set)
      epsilon_high=0.0,  # 0: epsilon (TRL's None). DAPO's paper uses 0.28
      scale_rewards="group",  # group | batch | none: what the advantage is divided by (std + 1e-4)
      advantage="group",  # group: r - mean of the group; rloo: r - mean of the group's other completions
      importance_sampling_level="token",  # token | sequence (GSPO)
      num_iterations=1,  # optimisation steps on each sampled batch (TRL's mu)
      mask_truncated_completions=False,  # completions that hit max_completion_length count for nothing
      temperature=1.0,  # sampling temperature of the rollouts
      top_k=0,  # 0: off
      top_p=1.0,  # nucleus sampling of the rollouts; 1: off
      max_completion_length=512,  # the longest sampled completion in tokens
      # Rewards, summed with reward_weights (empty: all 1): built-ins (rollout.BUILTIN_REWARDS: json_valid,
      # json_fields, json, exact, numeric, format:REGEX, or any metric of jaxtune/eval/metrics.py, scored against
      # the record's reference answer) or module:function called as fn(prompts=, completions=, **record fields).
      reward_funcs=("json_fields",),
      reward_weights=(),  # one weight per reward_funcs entry; empty: all 1
      show_completions=2,  # sampled completions printed at each eval step (train.eval_every)
    )
  )


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the grpo section (only when objective=grpo); ConfigError naming the key."""
  g = config.grpo
  choices = {
    "loss_type": LOSS_TYPES,
    "scale_rewards": SCALE_REWARDS,
    "advantage": ADVANTAGES,
    "importance_sampling_level": IMPORTANCE_LEVELS,
  }
  for key, allowed in choices.items():
    if g[key] not in allowed:
      raise ConfigError(f"grpo.{key}: {g[key]!r} is not one of {', '.join(allowed)}.")
  if g.num_generations < 2:
    raise ConfigError(
      f"grpo.num_generations: {g.num_generations}; advantages compare completions of a prompt: set 2 or more."
    )
  if config.data.batch_size % g.num_generations:
    raise ConfigError(
      f"data.batch_size: {config.data.batch_size} completions per step do not split into groups of "
      f"grpo.num_generations={g.num_generations}; make it a multiple of {g.num_generations}."
    )
  if g.num_iterations < 1:
    raise ConfigError(f"grpo.num_iterations: {g.num_iterations} must be at least 1.")
  if g.max_completion_length < 1:
    raise ConfigError(f"grpo.max_completion_length: {g.max_completion_length} must be at least 1.")
  if not g.temperature > 0:
    raise ConfigError(f"grpo.temperature: {g.temperature} must be positive (GRPO learns from sampled completions).")
  if g.epsilon <= 0 or g.epsilon_high < 0:
    raise ConfigError("grpo.epsilon must be positive and grpo.epsilon_high 0 (= epsilon) or positive.")
  if g.beta < 0:
    raise ConfigError(f"grpo.beta: {g.beta} must be 0 or positive.")
  if g.beta > 0 and (config.peft.method != "lora" or config.model.adapter):
    raise ConfigError(
      "grpo.beta: a KL term needs the reference as the base with the adapters off (peft.method=lora, no "
      "model.adapter); set grpo.beta=0 or train LoRA adapters."
    )
  if not g.reward_funcs:
    raise ConfigError("grpo.reward_funcs: empty; name at least one reward (e.g. json_fields or module:function).")
  if g.reward_weights and len(g.reward_weights) != len(g.reward_funcs):
    raise ConfigError(
      f"grpo.reward_weights: {len(g.reward_weights)} weights for {len(g.reward_funcs)} reward_funcs; give one "
      "per function or none."
    )


# ------------------------------------------------------------------------------------------------
# Advantages (host side, float32 as TRL's)


def _std(x: np.ndarray, axis=None) -> np.ndarray:
  """Sample standard deviation (torch's default, Bessel-corrected) of float32 values."""
  return np.std(x, axis=axis, ddof=1).astype(np.float32)


def advantages(rewards: np.ndarray, num_generations: int, scale_rewards: str = "group", advantage: str = "group"):
  """(advantages [N], std of each completion's group [N]) from summed rewards [N], completions grouped by prompt
  (G consecutive rows each). group: (r - group mean) / (std + 1e-4) with std the group's (`scale_rewards=group`),
  the batch's (`batch`) or none (`none`, Dr. GRPO). rloo: r - the mean of the group's other completions, never
  scaled (TRL's RLOOTrainer with normalize_advantages=False)."""
  r = np.asarray(rewards, np.float32)
  grouped = r.reshape(-1, num_generations)
  group_std = np.repeat(_std(grouped, axis=1), num_generations)
  if advantage == "rloo":
    others = (grouped.sum(1, keepdims=True) - grouped) / np.float32(num_generations - 1)
    return (grouped - others).reshape(-1).astype(np.float32), group_std
  mean = np.repeat(grouped.mean(1, dtype=np.float32), num_generations)
  adv = r - mean
  if scale_rewards == "group":
    adv = adv / (group_std + np.float32(STD_EPS))
  elif scale_rewards == "batch":
    adv = adv / (_std(r) + np.float32(STD_EPS))
  return adv.astype(np.float32), group_std


# ------------------------------------------------------------------------------------------------
# The loss on per-token log-probs


def totals(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """What the loss divides by, over the whole batch [A, b, T]: completions (rows) and completion tokens."""
  mask = batch["loss_mask"].astype(jnp.float32)
  return {"examples": jnp.float32(mask.shape[0] * mask.shape[1]), "tokens": jnp.sum(mask)}


def policy_loss(
  cfg: Any,
  logp: jax.Array,
  old_logp: jax.Array,
  ref_logp: jax.Array | None,
  adv: jax.Array,
  mask: jax.Array,
  totals: dict[str, jax.Array],
  micro_batches: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metric sums) of one micro-batch of b completions: per-token log-probs [b, N] of the policy, of the
  sampler (`old_logp`) and of the reference (None when beta is 0), advantages [b], completion mask [b, N].

  The loss and metrics are shares of the whole batch's (`totals`, `micro_batches`), so summing the micro-batches
  gives the batch's value. Metrics (TRL's names): kl, clip_ratio/low_mean, high_mean, region_mean (token means).
  """
  mask = mask.astype(jnp.float32)
  adv = adv[:, None]
  log_ratio = logp - old_logp
  if cfg.importance_sampling_level == "sequence":
    log_ratio = (jnp.sum(log_ratio * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))[:, None]
  coef_1 = jnp.exp(log_ratio)
  low, high = cfg.epsilon, cfg.epsilon_high or cfg.epsilon
  coef_2 = jnp.clip(coef_1, 1.0 - low, 1.0 + high)
  per_token = -jnp.minimum(coef_1 * adv, coef_2 * adv)
  per_token = jnp.broadcast_to(per_token, mask.shape)
  kl = None
  if cfg.beta != 0.0:
    diff = ref_logp - logp
    kl = jnp.exp(diff) - diff - 1.0  # k3
    per_token = per_token + cfg.beta * kl

  tokens = jnp.maximum(totals["tokens"], 1.0)
  summed = jnp.sum(per_token * mask)
  if cfg.loss_type == "grpo":  # the mean over completions of each one's token mean
    loss = jnp.sum(jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)) / totals["examples"]
  elif cfg.loss_type == "bnpo":  # the token mean of each micro-batch, averaged over them
    loss = summed / jnp.maximum(jnp.sum(mask), 1.0) / micro_batches
  elif cfg.loss_type == "dr_grpo":  # a constant divisor: completions x max_completion_length
    loss = summed / (totals["examples"] * cfg.max_completion_length)
  elif cfg.loss_type == "dapo":  # the token mean over the whole batch
    loss = summed / tokens
  else:
    raise ConfigError(f"grpo.loss_type: unknown {cfg.loss_type!r}.")

  mean = lambda x: jnp.sum(jnp.broadcast_to(x, mask.shape) * mask) / tokens
  is_low = ((coef_1 < 1.0 - low) & (adv < 0)).astype(jnp.float32)
  is_high = ((coef_1 > 1.0 + high) & (adv > 0)).astype(jnp.float32)
  metrics = {
    "clip_ratio/low_mean": mean(is_low),
    "clip_ratio/high_mean": mean(is_high),
    "clip_ratio/region_mean": mean(jnp.maximum(is_low, is_high)),
  }
  if kl is not None:
    metrics["kl"] = mean(kl)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def completion_log_probs(
  model: Any, batch: dict[str, jax.Array], completion_length: int, temperature: float, chunk: int = 64
) -> tuple[jax.Array, jax.Array]:
  """(log-prob, entropy) [b, N] of each completion token under logits / temperature; the completion is the
  last N positions of each row. Logits exist `chunk` positions at a time and are recomputed in the backward."""
  ids = batch["input_ids"]
  hidden, _ = model.hidden_states(ids, segment_ids=batch["segment_ids"], positions=batch["positions"])
  n = completion_length
  h = hidden[:, -n - 1 : -1]  # position t predicts token t + 1
  targets = ids[:, -n:]
  b = ids.shape[0]
  size = max(min(chunk, n), 1)
  num = -(-n // size)
  pad = num * size - n

  def chunks(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, num, size) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def body(_, xs):
    h_c, t_c = xs
    z = model.logits(h_c).astype(jnp.float32) / temperature
    logz = jax.nn.logsumexp(z, axis=-1)
    target = jnp.take_along_axis(z, t_c[..., None], axis=-1)[..., 0]
    p = jax.nn.softmax(z, axis=-1)
    entropy = logz - jnp.sum(p * z, axis=-1)
    return None, (target - logz, jax.lax.stop_gradient(entropy))

  _, (logp, entropy) = jax.lax.scan(body, None, (chunks(h), chunks(targets)))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, num * size)[:, :n]
  return unchunk(logp), unchunk(entropy)


def loss(
  cfg: Any, model: Any, reference: Any, mb: dict[str, jax.Array], totals: dict[str, jax.Array], micro_batches: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metric sums) of one GRPO micro-batch [b, T] under `model` (reference: the adapters-off model or None)."""
  n = cfg.max_completion_length
  logp, entropy = completion_log_probs(model, mb, n, cfg.temperature)
  ref_logp = None
  if cfg.beta != 0.0:
    ref_logp = jax.lax.stop_gradient(completion_log_probs(reference, mb, n, cfg.temperature)[0])
  mask = mb["loss_mask"][:, -n:]
  old = mb["old_logps"][:, -n:]
  adv = mb["advantages"][:, -1]
  total, metrics = policy_loss(cfg, logp, old, ref_logp, adv, mask, totals, micro_batches)
  metrics["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(totals["tokens"], 1.0)
  return total, metrics
