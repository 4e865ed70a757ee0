"""Preference objectives in the train step: first-step invariants, packing and accumulation, the adapters-off
reference, and ORPO's low-precision stability. Equality with TRL, step by step: tests/preference/test_trl_parity.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune.hf.load import init_model
from jaxtune.models.config import from_hf_dict
from jaxtune.peft import lora
from jaxtune.train import objectives
from jaxtune.train import step as step_lib

import tiny_configs

TINY = tiny_configs.LLAMA
RNG = np.random.default_rng(0)
# (prompt, chosen, rejected) token ids of different lengths
PAIRS = [
  (RNG.integers(3, 128, n).tolist(), RNG.integers(3, 128, c).tolist(), RNG.integers(3, 128, r).tolist())
  for n, c, r in [(5, 3, 4), (3, 5, 2), (6, 2, 2), (4, 4, 6)]
]


def pair_rows(pairs, per_row: int, length: int = 48) -> dict[str, np.ndarray]:
  """Rows of `per_row` pairs each: chosen then rejected as consecutive segments (packing.collate's layout)."""
  rows = -(-len(pairs) // per_row)
  batch = {k: np.zeros((rows, length), np.int32) for k in ("input_ids", "loss_mask", "segment_ids", "positions")}
  for i, (prompt, chosen, rejected) in enumerate(pairs):
    r, start = i // per_row, int(np.count_nonzero(batch["segment_ids"][i // per_row]))
    segment = 2 * (i % per_row) + 1
    for completion in (chosen, rejected):
      ids = prompt + completion
      end = start + len(ids)
      batch["input_ids"][r, start:end] = ids
      batch["loss_mask"][r, start + len(prompt) : end] = 1
      batch["segment_ids"][r, start:end] = segment
      batch["positions"][r, start:end] = np.arange(len(ids))
      start, segment = end, segment + 1
  return batch


def settings(name, **overrides):
  cfg = objectives.objective_config()
  cfg.objective = name
  if name in cfg:
    cfg[name].update(overrides)
  return objectives.settings(cfg)


def make_step(model, name, method="lora", optimizer=None, **overrides):
  """The train step of `name`; the reference is the adapters-off base under LoRA (else precomputed: `with_ref`)."""
  optimizer = optimizer or optax.sgd(1e-2)
  ref = lora.base_graphdef(model) if method == "lora" and name in objectives.WITH_REFERENCE else None
  graphdef, frozen, state = step_lib.init_train_state(model, optimizer, method=method)
  objective = step_lib.Objective(name, settings(name, **overrides), ref, pad_id=0)
  return step_lib.make_train_step(graphdef, frozen, optimizer, objective=objective), state


def lora_model(seed=0):
  model = init_model(from_hf_dict(TINY), seed=seed)
  lora.apply_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(seed))
  return model


def with_ref(model, batch):
  """The batch with the reference log-probs of `model` (its initial weights), as a precomputed reference gives."""
  return batch | {"ref_logps": np.asarray(objectives.reference_log_probs(model, jax.tree.map(jnp.asarray, batch)))}


def one(batch, micro=1):
  return {k: v.reshape((micro, -1) + v.shape[1:]) for k, v in batch.items()}


@pytest.mark.parametrize(
  "loss_type, expected", [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 25.0), ("robust", math.log(2))]
)
def test_dpo_losses_when_policy_equals_reference(loss_type, expected):
  """At step 1 the policy is the reference: every reward is 0 and each loss has its known value (IPO: 1/(2 beta)^2)."""
  logps = (jnp.asarray([-3.0, -7.5]), jnp.asarray([-4.0, -2.0]))
  seq = objectives.Sequences(jnp.ones(2), logps, (jnp.asarray([3.0, 5.0]), jnp.asarray([4.0, 2.0])))
  loss, metrics = objectives.dpo_loss(settings("dpo", loss_type=loss_type, label_smoothing=0.1), seq, seq)
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-6)
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    np.testing.assert_array_equal(np.asarray(metrics[key]), 0.0)


def test_dpo_step_under_lora_starts_at_ln2():
  """The train step with the adapters-off reference: policy == reference at step 1 (B = 0), loss ln 2, and it learns."""
  train_step, state = make_step(lora_model(), "dpo", optimizer=optax.sgd(0.5))
  losses = []
  for _ in range(3):
    state, m = train_step(state, one(pair_rows(PAIRS, 1)))
    losses.append(float(m["loss"]))
  assert losses[0] == pytest.approx(math.log(2), rel=1e-6)
  # Zero up to rounding: with B = 0 the adapted products add exact zeros, but in another order of operations.
  assert float(m["examples"]) == len(PAIRS)
  assert losses[2] < losses[0] and float(m["rewards/margins"]) > 0


def test_packed_with_accumulation_equals_unpacked():
  """Two pairs per row in two micro-batches, against one pair per row in one: the same metrics and update."""
  results = []
  for batch, micro in ((pair_rows(PAIRS, 1), 1), (pair_rows(PAIRS, 2), 2)):
    model = init_model(from_hf_dict(TINY), seed=2)
    batch = with_ref(model, batch)
    train_step, state = make_step(model, "dpo", method="full", optimizer=optax.sgd(1.0))
    for _ in range(2):  # the second step sees a policy that differs from the reference
      state, m = train_step(state, one(batch, micro))
    results.append((jax.device_get(m), jax.device_get(state.params)))
  (m0, p0), (m1, p1) = results
  assert float(m0["rewards/margins"]) != 0
  for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "accuracy"):
    assert float(m1[key]) == pytest.approx(float(m0[key]), rel=2e-5, abs=1e-6), key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), p1, p0)


def test_adapters_off_reference_is_the_base_model():
  """The reference (base graph + frozen weights) gives the base model's logits, however trained the adapters are."""
  model = lora_model(seed=3)
  ids = jnp.asarray([PAIRS[0][0] + PAIRS[0][1]])
  base = init_model(from_hf_dict(TINY), seed=3)  # the same seed: the same base weights
  expected = np.asarray(base(ids))
  for _, module in nnx.iter_modules(model):  # train the adapters: non-zero B everywhere
    if isinstance(module, lora.LoRA):
      module.lora_b[...] = jnp.ones_like(module.lora_b[...]) * 0.05
  ref_graph = lora.base_graphdef(model)
  _, _, keys, rest = lora.split_trainable(model, "lora")
  reference = nnx.merge(ref_graph, nnx.to_pure_dict(rest))
  np.testing.assert_array_equal(np.asarray(reference(ids)), expected)
  assert not np.allclose(np.asarray(model(ids)), expected)  # the policy does differ


def test_orpo_is_finite_in_bfloat16_near_log_prob_zero():
  """Sequences the model is (almost) certain of: log(1 - p) would be -inf; loss and gradient stay finite."""
  cfg = settings("orpo")
  for value in (0.0, -1e-9, -1e-4, -0.7, -30.0):

    def loss(c, r):
      seq = objectives.Sequences(
        jnp.ones(2), (c.astype(jnp.float32) * 3, r.astype(jnp.float32) * 3), (jnp.full(2, 3.0), jnp.full(2, 3.0))
      )
      return jnp.sum(objectives.orpo_loss(cfg, seq)[0])

    c = jnp.asarray([value, value], jnp.bfloat16)
    r = jnp.asarray([value, -0.01], jnp.bfloat16)
    out, grads = jax.value_and_grad(loss, argnums=(0, 1))(c, r)
    assert np.isfinite(float(out)), value
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads), value


def test_reference_cache_key_follows_the_model_files(tmp_path):
  """A changed weight file (size or time) or another setting gives another key: the cache is recomputed."""
  from jaxtune.train import reference

  (tmp_path / "model.safetensors").write_bytes(b"1234")
  key = reference.model_fingerprint(str(tmp_path), "float32")
  assert reference.model_fingerprint(str(tmp_path), "float32") == key
  assert reference.model_fingerprint(str(tmp_path), "bfloat16") != key
  (tmp_path / "model.safetensors").write_bytes(b"12345")
  assert reference.model_fingerprint(str(tmp_path), "float32") != key
