"""Optimizers and learning-rate schedules from the `optim` config section.

Every optimizer is the same chain: clip by global norm -> the method's scaling ->
decoupled weight decay (masked) -> learning rate (schedule). For AdamW and Lion this
is exactly optax.adamw / optax.lion.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from jaxtune.errors import ConfigError

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


def optim_config() -> ml_collections.ConfigDict:
  """Defaults for `config.optim`."""
  return ml_collections.ConfigDict(
    dict(
      name="adamw",  # adamw | adafactor | lion | sgd
      lr=2e-4,  # peak learning rate
      schedule="cosine",  # constant | linear | cosine (linear and cosine decay to 0 at the last step)
      warmup_steps=0,  # linear warmup from 0; when 0, warmup_ratio * total steps is used
      warmup_ratio=0.0,  # warmup as a share of the total steps (set warmup_steps or this, not both)
      weight_decay=0.0,  # decoupled (AdamW-style: multiplied by the learning rate)
      b1=0.9,  # Adam/Lion beta1; SGD momentum (0 for plain SGD)
      b2=0.999,  # Adam/Lion beta2 (Lion's paper uses 0.99)
      eps=1e-8,  # Adam epsilon
      clip_norm=1.0,  # global gradient-norm clipping; 0 turns it off
      decay_embeddings=False,  # weight decay on the embedding table too
    )
  )


def _warmup(cfg: Any, total_steps: int) -> int:
  if cfg.warmup_steps and cfg.warmup_ratio:
    raise ConfigError("optim.warmup_steps and optim.warmup_ratio are both set; set one of them.")
  if not 0.0 <= cfg.warmup_ratio < 1.0:
    raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}.")
  warmup = int(cfg.warmup_steps) or int(round(cfg.warmup_ratio * total_steps))
  if warmup < 0 or warmup > total_steps:
    raise ConfigError(f"optim.warmup_steps={warmup} must be between 0 and the {total_steps} training steps.")
  return warmup


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """Learning rate at each optimizer update: linear warmup from 0, then constant, linear or cosine to 0."""
  if cfg.schedule not in SCHEDULES:
    raise ConfigError(f"optim.schedule: unknown {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
  if total_steps < 1:
    raise ConfigError(f"the schedule needs at least one training step, got {total_steps}.")
  warmup = _warmup(cfg, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
  else:
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def _key_name(k: Any) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """True where weight decay applies: not on norms, biases, or (by default) embeddings; from the param paths."""

  def decays(path, _):
    names = [_key_name(k) for k in path]
    if any("norm" in n for n in names) or "bias" in names:
      return False
    return decay_embeddings or "embed" not in names

  return jax.tree_util.tree_map_with_path(decays, params)


def _method(cfg: Any) -> optax.GradientTransformation:
  if cfg.name == "adamw":
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.name == "lion":
    return optax.scale_by_lion(b1=cfg.b1, b2=cfg.b2)
  if cfg.name == "adafactor":  # factored second moments, update clipping at RMS 1; no parameter scaling
    return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0))
  if cfg.name == "sgd":
    return optax.trace(decay=cfg.b1) if cfg.b1 else optax.identity()
  raise ConfigError(f"optim.name: unknown {cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}.")


def make_optimizer(cfg: Any, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of `config.optim` for a run of `total_steps` updates."""
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(_method(cfg))
  if cfg.weight_decay:
    mask = lambda params: decay_mask(params, cfg.decay_embeddings)
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
  parts.append(optax.scale_by_learning_rate(make_schedule(cfg, total_steps)))
  return optax.chain(*parts)
