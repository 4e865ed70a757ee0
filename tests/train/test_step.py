"""The train step: chunked loss, LoRA and full training, accumulation equivalence, NaN skipping, recompiles, eval."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune.hf.load import init_model
from jaxtune.models.config import from_hf_dict
from jaxtune.peft import lora
from jaxtune.train import optim
from jaxtune.train import step as step_lib

import tiny_configs

TINY = tiny_configs.LLAMA  # as in test_lora: shared compiles
T = 16


def make_batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Packed rows of two examples each (prompt untrained, answer trained), then padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 128, size=(rows, T)).astype(np.int32)
  seg, pos, mask = (np.zeros((rows, T), np.int32) for _ in range(3))
  for r in range(rows):
    start = 0
    for s, length in enumerate(rng.integers(4, 8, size=2), start=1):
      seg[r, start : start + length], pos[r, start : start + length] = s, np.arange(length)
      mask[r, start + rng.integers(1, length - 1) : start + length] = 1
      start += length
    ids[r, start:] = 0
  return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def accumulate(batch, micro_batches):
  return {k: v.reshape((micro_batches, -1) + v.shape[1:]) for k, v in batch.items()}


def copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def fresh(model):
  """A clone with its own buffers: full fine-tuning donates the model's arrays to the step."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def base():
  return init_model(from_hf_dict(TINY), seed=0)


def test_chunked_loss_matches_full_logits(base):
  batch = {k: jnp.asarray(v) for k, v in make_batch(3).items()}
  loss_sum, tokens, correct = nnx.jit(lambda m, b: step_lib.loss_fn(m, b, chunk=4))(base, batch)
  logits = nnx.jit(lambda m, b: m(b["input_ids"], segment_ids=b["segment_ids"], positions=b["positions"]))(base, batch)
  logits, targets = np.asarray(logits, np.float64)[:, :-1], np.asarray(batch["input_ids"])[:, 1:]
  seg = np.asarray(batch["segment_ids"])
  weights = np.asarray(batch["loss_mask"])[:, 1:] * (seg[:, 1:] == seg[:, :-1]) * (seg[:, 1:] != 0)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  assert float(tokens) == weights.sum() > 0
  np.testing.assert_allclose(float(loss_sum), (nll * weights).sum(), rtol=1e-5)
  assert float(correct) == ((logits.argmax(-1) == targets) * weights).sum()


@pytest.mark.parametrize("tied", [True, False])
def test_fused_and_checkpointed_losses_agree(monkeypatch, tied):
  """The fused head loss (plain heads) and the checkpointed one (heads with adapters): same values, same grads.

  Each also scales by `scale` exactly as the train step uses it: loss and gradient are scale times the sums'.
  """
  model = init_model(from_hf_dict(dict(TINY, tie_word_embeddings=tied)), seed=1)
  batch = {k: jnp.asarray(v) for k, v in make_batch(3).items()}
  graphdef, params = nnx.split(model)

  def value_and_grads():  # one compile each, at scale 1 and 1/8
    f = lambda p, s: step_lib.loss_fn(nnx.merge(graphdef, p), batch, chunk=4, scale=s)[0]
    f = jax.jit(jax.value_and_grad(f))
    return f(params, jnp.float32(1.0)), f(params, jnp.float32(0.125))

  def assert_close(x, y):
    np.testing.assert_allclose(x[0], y[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(x[1]), jax.tree.leaves(y[1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))

  def times(s, x):
    return jax.tree.map(lambda a: a * s, x)

  fused, fused_scaled = value_and_grads()
  monkeypatch.setattr(type(model), "head_weight", lambda self: None)  # as if the head had an adapter
  checkpointed, checkpointed_scaled = value_and_grads()
  assert_close(fused, checkpointed)
  assert_close(fused_scaled, times(0.125, fused))
  assert_close(checkpointed_scaled, times(0.125, checkpointed))


@pytest.fixture(scope="module")
def lora_run(base):
  """A LoRA model with dropout, its split, and a compiled AdamW train step."""
  model = lora.apply_lora(nnx.clone(base), rank=4, alpha=8.0, dropout=0.1, rngs=nnx.Rngs(1))
  cfg = optim.optim_config()
  cfg.update(lr=2e-2, schedule="constant", weight_decay=0.01)
  opt = optim.make_optimizer(cfg, total_steps=20)
  graphdef, frozen, state = step_lib.init_train_state(model, opt, method="lora", seed=0)
  base_weights = copy(nnx.to_pure_dict(nnx.state(base)))
  train_step = step_lib.make_train_step(graphdef, frozen, opt, lr_schedule=optim.make_schedule(cfg, 20), loss_chunk=8)
  return graphdef, frozen, copy(state), train_step, base_weights


def test_lora_learns_and_only_adapters_change(lora_run):
  graphdef, frozen, state0, train_step, base_weights = lora_run
  assert {p[-1] for p, _ in jax.tree_util.tree_leaves_with_path(state0.params)} == {
    jax.tree_util.DictKey("lora_a"),
    jax.tree_util.DictKey("lora_b"),
  }
  batch = accumulate(make_batch(4), 2)
  state, losses = jax.tree.map(jnp.asarray, state0), []
  for _ in range(20):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.5, losses
  assert float(metrics["lr"]) == pytest.approx(2e-2) and int(metrics["skipped"]) == 0
  assert float(metrics["trained_tokens"]) == (batch["loss_mask"][..., 1:] > 0).sum()
  assert int(state.step) == 20
  model = step_lib.model_from_state(graphdef, frozen, state.params)
  trained = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora.LoRAParam))))
  assert_trees_equal(trained, base_weights)  # the base is bit-identical
  assert np.abs(np.asarray(state.params["layers"]["attn"]["q"]["adapter"]["lora_b"])).max() > 0


def test_steps_are_deterministic_given_seed(lora_run):
  _, _, state0, train_step, _ = lora_run
  batch = accumulate(make_batch(4, seed=1), 2)
  runs = []
  for _ in range(2):
    state = jax.tree.map(jnp.asarray, state0)
    for _ in range(3):
      state, _ = train_step(state, batch)
    runs.append(copy(state))
  assert_trees_equal(runs[0], runs[1])


def test_nonfinite_step_is_skipped_and_counted(lora_run):
  _, _, state0, train_step, _ = lora_run
  batch = accumulate(make_batch(4), 2)
  state, _ = train_step(jax.tree.map(jnp.asarray, state0), batch)
  good_b = np.array(state.params["layers"]["attn"]["q"]["adapter"]["lora_b"])
  poisoned = good_b.copy()
  poisoned[0, 0, 0, 0] = np.nan
  params = copy(state.params)
  params["layers"]["attn"]["q"]["adapter"]["lora_b"] = poisoned
  state = state.replace(params=jax.tree.map(jnp.asarray, params))
  for streak in (1, 2):
    before = copy(state)
    state, metrics = train_step(state, batch)
    assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
    assert int(state.nonfinite_streak) == streak and int(state.skipped) == streak
    jax.tree.map(np.testing.assert_array_equal, copy(state.params), before.params)  # NaN == NaN here
    jax.tree.map(np.testing.assert_array_equal, copy(state.opt_state), before.opt_state)
  params = copy(state.params)
  params["layers"]["attn"]["q"]["adapter"]["lora_b"] = good_b
  state, metrics = train_step(state.replace(params=jax.tree.map(jnp.asarray, params)), batch)
  assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
  assert int(state.nonfinite_streak) == 0 and int(state.skipped) == 2 and int(state.step) == 4


def test_each_batch_shape_compiles_once(lora_run, caplog):
  """Two bucket lengths, and the donated state fed back (step counter, rng, learning rate): no recompiles."""
  _, _, state0, train_step, _ = lora_run
  long = accumulate(make_batch(4, seed=2), 2)
  short = {k: v[..., :12] for k, v in long.items()}  # a shorter bucket of the same rows; no other test uses it
  compiles = lambda: [m for m in caplog.messages if m.startswith("Compiling jit(step)")]
  with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
    state = jax.tree.map(jnp.asarray, state0)
    for batch in (long, short, short, long, long, short):
      state, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 6
    assert 1 <= len(compiles()) <= 2, compiles()  # the short shape is new here (the log does show compiles) ...
    caplog.clear()
    for batch in (short, long, short):
      state, metrics = train_step(state, batch)
    float(metrics["loss"])
    assert not compiles(), compiles()  # ... and nothing compiles again


@pytest.fixture(scope="module")
def sgd_full(base):
  """Full fine-tuning with plain SGD (lr 1): steps compiled for 1 and for 4 micro-batches, one state each."""
  cfg = optim.optim_config()
  cfg.update(name="sgd", b1=0.0, lr=1.0, schedule="constant", clip_norm=0.0)
  opt = optim.make_optimizer(cfg, total_steps=1)
  runs = {}
  for micro in (1, 4):
    graphdef, frozen, state = step_lib.init_train_state(fresh(base), opt, method="full", seed=0)
    assert not jax.tree.leaves(frozen.weights)  # everything trains
    runs[micro] = (
      state,
      step_lib.make_train_step(graphdef, frozen, opt, loss_chunk=8),
      step_lib.make_eval_step(graphdef, frozen, loss_chunk=8) if micro == 4 else None,
    )
  return runs


def test_accumulation_equals_one_big_batch(sgd_full):
  """A micro-batches with different token counts update exactly like one batch A times the size."""
  batch = make_batch(4, seed=2)
  assert len({int(m.sum()) for m in batch["loss_mask"]}) > 1  # a mean of means would differ
  results = []
  for micro in (1, 4):
    state, train_step, _ = sgd_full[micro]
    before = copy(state.params)
    state, metrics = train_step(jax.tree.map(lambda x: jnp.array(x, copy=True), state), accumulate(batch, micro))
    results.append((jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, before), metrics))
  (delta1, m1), (delta4, m4) = results
  assert float(m1["trained_tokens"]) == float(m4["trained_tokens"])
  assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)
  assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
  for d1, d4 in zip(jax.tree.leaves(delta1), jax.tree.leaves(delta4)):
    np.testing.assert_allclose(d4, d1, rtol=1e-4, atol=1e-4 * np.abs(d1).max())


def test_full_finetune_learns_and_eval_agrees(sgd_full):
  state, train_step, eval_step = sgd_full[4]
  flat = make_batch(4)
  batch = accumulate(flat, 4)
  state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
  ev = eval_step(state.params, flat)  # a [b, T] batch: the same rows
  losses = []
  for _ in range(20):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(float(ev["loss_sum"] / ev["tokens"]), rel=1e-5)  # no dropout: same loss
  assert losses[-1] < losses[0] - 1.0, losses
  ev = eval_step(state.params, flat)
  assert float(ev["correct"] / ev["tokens"]) > 0.2


def test_errors(base):
  opt = optax.sgd(0.1)
  with pytest.raises(ValueError, match="apply_lora"):
    step_lib.init_train_state(nnx.clone(base), opt, method="lora")
  with pytest.raises(ValueError, match="peft.method"):
    step_lib.init_train_state(nnx.clone(base), opt, method="qlora")
