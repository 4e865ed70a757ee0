"""jaxtune's GRPO advantages and losses against TRL 1.16's own code (trl_grpo_reference.py) on fixed tensors.

The same rewards, completion masks, policy / sampler / reference log-probs on both sides: advantages, the loss,
its gradient with respect to the policy's log-probs and TRL's logged clip ratios and KL agree within 1e-5, for
every loss type, with and without the KL term, both importance-sampling levels and a DAPO high clip.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import trl_grpo_reference as trl

from jaxtune.train import grpo

G, PROMPTS, LENGTH = 4, 3, 7
TOL = 1e-5


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  n = G * PROMPTS
  rewards = rng.integers(0, 4, size=(n, 2)).astype(np.float32) / 3  # ties inside groups, as real rewards have
  rewards[:G, 0] = 1.0  # a group whose first reward is constant
  lengths = rng.integers(1, LENGTH + 1, size=n)
  mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.float32)
  old = -rng.uniform(0.05, 3.0, size=(n, LENGTH)).astype(np.float32)
  logps = old + rng.normal(0, 0.3, size=(n, LENGTH)).astype(np.float32)  # some ratios outside [0.8, 1.2]
  ref = old + rng.normal(0, 0.2, size=(n, LENGTH)).astype(np.float32)
  return rewards, mask, logps, old, ref


@pytest.mark.parametrize("scale_rewards", grpo.SCALE_REWARDS)
def test_advantages_equal_trl(scale_rewards):
  rewards, *_ = _inputs()
  weights = np.array([1.0, 0.5], np.float32)
  ours, _ = grpo.advantages(rewards @ weights, G, scale_rewards)
  np.testing.assert_allclose(ours, trl.trl_advantages(rewards, weights, G, scale_rewards), atol=TOL, rtol=0)


def test_rloo_advantages_equal_trl():
  rewards, *_ = _inputs(1)
  weights = np.array([1.0, 2.0], np.float32)
  ours, _ = grpo.advantages(rewards @ weights, G, advantage="rloo")
  np.testing.assert_allclose(ours, trl.trl_advantages(rewards, weights, G, rloo=True), atol=TOL, rtol=0)


CASES = [
  dict(loss_type="grpo"),
  dict(loss_type="bnpo"),
  dict(loss_type="dr_grpo"),
  dict(loss_type="dapo"),
  dict(loss_type="dapo", epsilon_high=0.28),
  dict(loss_type="grpo", beta=0.04),
  dict(loss_type="dapo", beta=0.1, epsilon_high=0.28),
  dict(loss_type="dr_grpo", beta=0.04),
  dict(loss_type="grpo", importance_sampling_level="sequence"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradient_equal_trl(case):
  rewards, mask, logps, old, ref = _inputs(2)
  adv, _ = grpo.advantages(rewards.sum(1), G)
  beta = case.get("beta", 0.0)
  max_len = LENGTH + 3  # dr_grpo divides by max_completion_length, not the longest completion
  want, want_grad, want_metrics = trl.trl_loss(
    logps, old, ref if beta else None, adv, mask, max_completion_length=max_len, **case
  )
  cfg = grpo.grpo_config()
  cfg.update({k: v for k, v in case.items()})
  cfg.max_completion_length = max_len
  cfg = ml_collections.FrozenConfigDict(cfg)
  totals = {"examples": jnp.float32(len(mask)), "tokens": jnp.float32(mask.sum())}

  def ours(lp):
    return grpo.policy_loss(cfg, lp, jnp.asarray(old), jnp.asarray(ref) if beta else None, adv, mask, totals)

  (value, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logps))
  np.testing.assert_allclose(float(value), want, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(grad), want_grad, atol=TOL, rtol=0)
  assert np.abs(want_grad).max() > 1e-3  # the gradient is not trivially zero
  compared = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else [])
  if case.get("importance_sampling_level") == "sequence":
    compared = compared[-1:] if beta else []  # TRL averages sequence-level clip flags per sequence
  for key in compared:
    np.testing.assert_allclose(float(metrics[key]), want_metrics[key], atol=TOL, rtol=0, err_msg=key)


def test_micro_batches_sum_to_the_batch_loss():
  """Split into 2 micro-batches, the summed shares equal the one-batch loss (bnpo: TRL's per-micro-batch mean)."""
  rewards, mask, logps, old, _ = _inputs(3)
  adv, _ = grpo.advantages(rewards.sum(1), G)
  half = len(mask) // 2
  totals = {"examples": jnp.float32(len(mask)), "tokens": jnp.float32(mask.sum())}
  for loss_type in grpo.LOSS_TYPES:
    cfg = grpo.grpo_config()
    cfg.loss_type, cfg.max_completion_length = loss_type, LENGTH
    cfg = ml_collections.FrozenConfigDict(cfg)
    part = lambda s, a=2: grpo.policy_loss(cfg, logps[s], old[s], None, adv[s], mask[s], totals, a)[0]
    split = float(part(slice(0, half)) + part(slice(half, None)))
    if loss_type == "bnpo":
      want = np.mean(
        [
          trl.trl_loss(logps[s], old[s], None, adv[s], mask[s], loss_type="bnpo")[0]
          for s in (slice(0, half), slice(half, None))
        ]
      )
    else:
      want = float(part(slice(None), 1))
    np.testing.assert_allclose(split, want, atol=TOL, rtol=0, err_msg=loss_type)
