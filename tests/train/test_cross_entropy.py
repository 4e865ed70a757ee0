"""The fused LM-head cross-entropy against the plain formula: values and gradients."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.train.cross_entropy import fused_cross_entropy

B, T, D, V = 2, 7, 8, 11


def _inputs(layout, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(k[0], (B, T, D))
  w = jax.random.normal(k[1], (V, D) if layout == "VD" else (D, V))
  targets = jax.random.randint(k[2], (B, T), 0, V)
  top = jnp.argmax(jnp.einsum(f"BTD,{layout}->BTV", h, w), -1)
  targets = jnp.where(jnp.arange(T) % 2 == 0, top, targets)  # some predictions right, some wrong
  weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
  return h, w, targets, weights


def _reference(h, w, targets, weights, layout, softcap):
  logits = jnp.einsum(f"BTD,{layout}->BTV", h, w, precision="highest")
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(correct * weights)


@pytest.mark.parametrize("layout", ["VD", "DV"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [3, 7, 100])  # 3 does not divide T: the last chunk is padded
def test_matches_plain_cross_entropy(layout, softcap, chunk):
  h, w, targets, weights = _inputs(layout)
  with jax.default_matmul_precision("highest"):
    got = fused_cross_entropy(h, w, targets, weights, layout=layout, softcap=softcap, chunk=chunk)
    want = _reference(h, w, targets, weights, layout, softcap)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert float(got[1]) == float(want[1]) and float(want[1]) > 0

    # scaled like the train step (loss / tokens) so the incoming cotangent is not 1
    def f(h, w):
      return fused_cross_entropy(h, w, targets, weights, layout=layout, softcap=softcap, chunk=chunk)[0] / 5.0

    g = lambda h, w: _reference(h, w, targets, weights, layout, softcap)[0] / 5.0
    got_dh, got_dw = jax.grad(f, argnums=(0, 1))(h, w)
    want_dh, want_dw = jax.grad(g, argnums=(0, 1))(h, w)
  np.testing.assert_allclose(got_dh, want_dh, atol=1e-5)
  np.testing.assert_allclose(got_dw, want_dw, atol=1e-5)
  assert got_dw.shape == w.shape


def _shapes(jaxpr) -> set[tuple[int, ...]]:
  """Shapes of every value computed anywhere in a jaxpr, nested jaxprs (scan, custom_vjp) included."""
  out = set()
  for eqn in jaxpr.eqns:
    out |= {tuple(v.aval.shape) for v in eqn.outvars}
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _shapes(sub)
  return out


def test_frozen_head_gradient_is_never_formed():
  """Under LoRA the head is frozen: no [D, V] accumulator may appear in the step at all."""
  h, w, targets, weights = _inputs("VD")
  f = lambda h: fused_cross_entropy(h, w, targets, weights, layout="VD", chunk=3)[0]
  assert not {(D, V), (V, D)} & _shapes(jax.make_jaxpr(jax.grad(f))(h).jaxpr)
  trained = lambda h, w: fused_cross_entropy(h, w, targets, weights, layout="VD", chunk=3)[0]
  assert (D, V) in _shapes(jax.make_jaxpr(jax.grad(trained, argnums=(0, 1)))(h, w).jaxpr)  # the walk sees it
  np.testing.assert_allclose(
    jax.grad(f)(h), jax.grad(lambda h: _reference(h, w, targets, weights, "VD", None)[0])(h), atol=1e-5
  )


def test_bfloat16_inputs_give_float32_sums_and_input_dtype_gradients():
  h, w, targets, weights = _inputs("VD")
  h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  loss, correct = fused_cross_entropy(h16, w16, targets, weights, layout="VD", chunk=4)
  assert loss.dtype == correct.dtype == jnp.float32
  np.testing.assert_allclose(loss, _reference(h, w, targets, weights, "VD", None)[0], rtol=3e-2)
  dh, dw = jax.grad(lambda h, w: fused_cross_entropy(h, w, targets, weights, layout="VD")[0], argnums=(0, 1))(h16, w16)
  assert dh.dtype == dw.dtype == jnp.bfloat16


def _dot_operand_types(jaxpr) -> set[tuple[str, str]]:
  """(lhs, rhs) dtypes of every dot_general anywhere in a jaxpr, nested jaxprs included."""
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.add(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _dot_operand_types(sub)
  return out


@pytest.mark.parametrize("layout", ["VD", "DV"])
def test_bfloat16_head_gradients_are_16_bit_products(layout):
  """With a 16-bit head every product, the head weight's gradient included, takes 16-bit operands (a
  float32 one runs as TF32 on a GPU at a quarter of the rate), and both gradients stay within bf16's
  error of the float32 formula."""
  h, w, targets, weights = _inputs(layout)
  f = lambda h, w: fused_cross_entropy(h, w, targets, weights, layout=layout, chunk=4)[0]
  h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  grad = jax.grad(f, argnums=(0, 1))
  assert _dot_operand_types(jax.make_jaxpr(grad)(h16, w16).jaxpr) == {("bfloat16", "bfloat16")}
  with jax.default_matmul_precision("highest"):
    want = jax.grad(lambda h, w: _reference(h, w, targets, weights, layout, None)[0], argnums=(0, 1))(
      h16.astype(jnp.float32), w16.astype(jnp.float32)
    )
  for name, got, ref in zip(("dh", "dw"), grad(h16, w16), want):
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=0.02 * float(np.abs(ref).max()), err_msg=name)


def test_unknown_layout_is_refused():
  h, w, targets, weights = _inputs("VD")
  with pytest.raises(ValueError, match="layout"):
    fused_cross_entropy(h, w, targets, weights, layout="DD")


def test_positions_without_weight_skip_the_head():
  """Each row's 2 weighted positions fill chunk 0 after sorting; the other 3 chunks never reach the head.

  The hidden states at unweighted positions are NaN: had any of them met the head, the sums (0 x NaN)
  and their gradients would be NaN.
  """
  h, w, targets, _ = _inputs("VD")
  t = 8
  h, targets = jnp.concatenate([h, h[:, :1]], 1), jnp.concatenate([targets, targets[:, :1]], 1)  # T = 8
  weights = np.zeros((B, t), np.float32)
  weights[0, [1, 6]] = 1.0
  weights[1, [0, 3]] = 0.5
  poisoned = jnp.where(jnp.asarray(weights)[..., None] > 0, h, jnp.nan)
  f = lambda h: fused_cross_entropy(h, w, targets, weights, layout="VD", chunk=2)
  with jax.default_matmul_precision("highest"):
    loss, correct = f(poisoned)
    want = _reference(h, w, targets, weights, "VD", None)
    np.testing.assert_allclose(loss, want[0], rtol=1e-5)
    assert float(correct) == float(want[1])
    dh = jax.grad(lambda h: f(h)[0])(poisoned)
    want_dh = jax.grad(lambda h: _reference(h, w, targets, weights, "VD", None)[0])(h)
  np.testing.assert_allclose(dh, want_dh, atol=1e-5)  # in the original positions; zero where unweighted
  assert not np.asarray(dh)[weights == 0].any()
  zero, _ = fused_cross_entropy(poisoned, w, targets, np.zeros_like(weights), layout="VD", chunk=2)
  assert float(zero) == 0.0  # nothing weighted: no chunk runs at all
