"""Optimizers, schedules and the weight-decay mask (no model needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.train import optim

# The leaf names of a jaxtune parameter tree (pure dict, as in TrainState.params).
PARAMS = {
  "embed": jnp.ones((8, 4)),
  "final_norm": {"scale": jnp.ones((4,))},
  "lm_head": {"kernel": jnp.ones((4, 8))},
  "layers": {
    "pre_attn_norm": {"scale": jnp.ones((2, 4))},
    "attn": {
      "q": {
        "kernel": jnp.ones((2, 4, 2, 2)),
        "bias": jnp.ones((2, 2, 2)),
        "adapter": {"lora_a": jnp.ones((2, 4, 3)), "lora_b": jnp.ones((2, 3, 2, 2))},
      },
      "q_norm": {"scale": jnp.ones((2, 2))},
    },
    "mlp": {"down": {"kernel": jnp.ones((2, 6, 4))}},
  },
}


def _cfg(**overrides):
  cfg = optim.optim_config()
  cfg.update(overrides)
  return cfg


def test_decay_mask_skips_norms_biases_and_embeddings():
  mask = optim.decay_mask(PARAMS)
  assert mask["embed"] is False and mask["final_norm"]["scale"] is False
  layers = mask["layers"]
  assert layers["pre_attn_norm"]["scale"] is False and layers["attn"]["q_norm"]["scale"] is False
  assert layers["attn"]["q"]["bias"] is False
  assert layers["attn"]["q"]["kernel"] and layers["mlp"]["down"]["kernel"] and mask["lm_head"]["kernel"]
  assert layers["attn"]["q"]["adapter"]["lora_a"] and layers["attn"]["q"]["adapter"]["lora_b"]
  assert optim.decay_mask(PARAMS, decay_embeddings=True)["embed"] is True


def test_weight_decay_reaches_only_masked_in_leaves():
  """With zero gradients, AdamW's update is the decay alone: zero exactly where the mask is off."""
  opt = optim.make_optimizer(_cfg(weight_decay=0.1, lr=1.0, schedule="constant"), total_steps=10)
  grads = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = jax.jit(opt.update)(grads, opt.init(PARAMS), PARAMS)
  mask = optim.decay_mask(PARAMS)
  for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mask)):
    np.testing.assert_allclose(np.asarray(u), -0.1 if m else 0.0, rtol=1e-6)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_descends(name):
  target = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones((4,))}
  params = jax.tree.map(jnp.zeros_like, target)
  loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
  opt = optim.make_optimizer(
    _cfg(name=name, lr=0.05, schedule="constant", b1=0.9 if name != "sgd" else 0.0), total_steps=30
  )
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  start = loss(params)
  for _ in range(30):
    params, state = step(params, state)
  assert loss(params) < 0.5 * start


def test_schedules_and_warmup():
  cos = optim.make_schedule(_cfg(lr=1.0, schedule="cosine", warmup_steps=10), total_steps=110)
  assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5)
  assert float(cos(10)) == pytest.approx(1.0) and float(cos(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(cos(110)) == pytest.approx(0.0, abs=1e-6)
  lin = optim.make_schedule(_cfg(lr=2.0, schedule="linear", warmup_ratio=0.1), total_steps=100)
  assert float(lin(5)) == pytest.approx(1.0) and float(lin(10)) == pytest.approx(2.0)
  assert float(lin(55)) == pytest.approx(1.0) and float(lin(100)) == pytest.approx(0.0, abs=1e-6)
  const = optim.make_schedule(_cfg(lr=3.0, schedule="constant"), total_steps=5)
  assert float(const(0)) == 3.0 and float(const(1000)) == 3.0


def test_clipping_bounds_the_update():
  opt = optim.make_optimizer(_cfg(name="sgd", b1=0.0, lr=1.0, schedule="constant", clip_norm=1.0), total_steps=1)
  params = {"w": jnp.zeros((4,))}
  updates, _ = opt.update({"w": jnp.full((4,), 100.0)}, opt.init(params), params)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(name="adam"), "optim.name"),
    (dict(schedule="exp"), "optim.schedule"),
    (dict(warmup_steps=5, warmup_ratio=0.1), "set one of them"),
    (dict(warmup_steps=50), "between 0 and"),
  ],
)
def test_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(_cfg(**overrides), total_steps=10)


def test_config_is_lockable():
  cfg = optim.optim_config()
  cfg.lock()
  with pytest.raises(AttributeError):
    cfg.learning_rate = 1.0  # a misspelt key fails loudly
