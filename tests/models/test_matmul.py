"""The layout-aware products against plain autodiff: same values, same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import matmul

M, I, O, R = 12, 8, 10, 3


def _arrays(seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  return (jax.random.normal(k[0], (M, I)), jax.random.normal(k[1], (I, O)), jax.random.normal(k[2], (I, R)),
          jax.random.normal(k[3], (R, O)), jax.random.normal(k[4], (M, O)))


@pytest.mark.parametrize("argnums", [(0, 1), (0,), (1,)])
def test_dense_gradients_match_autodiff(argnums):
  x, w, _, _, dy = _arrays()
  with jax.default_matmul_precision("highest"):
    got = jax.grad(lambda x, w: jnp.sum(matmul.dense(x, w) * dy), argnums)(x, w)
    want = jax.grad(lambda x, w: jnp.sum((x @ w) * dy), argnums)(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dense_with_a_frozen_weight_saves_no_input():
  """Under LoRA the base weight is frozen: its product keeps only w for the backward pass."""
  x, w, _, _, dy = _arrays()
  f = lambda x: jnp.sum(matmul.dense(x, w) * dy)  # noqa: E731
  _, vjp = jax.vjp(f, x)
  saved = [leaf.shape for leaf in jax.tree.leaves(vjp)]
  assert (M, I) not in saved and (I, O) in saved
  np.testing.assert_allclose(vjp(1.0)[0], dy @ w.T, atol=1e-5)


def test_lora_matmul_matches_autodiff():
  x, _, a, b, dy = _arrays()
  with jax.default_matmul_precision("highest"):
    y = matmul.lora_matmul(x, a, b, 0.5)
    np.testing.assert_allclose(y, 0.5 * (x @ a) @ b, atol=1e-5)
    got = jax.grad(lambda *p: jnp.sum(matmul.lora_matmul(*p, 0.5) * dy), (0, 1, 2))(x, a, b)
    want = jax.grad(lambda x, a, b: jnp.sum(0.5 * (x @ a) @ b * dy), (0, 1, 2))(x, a, b)
  for name, g, h in zip(("x", "A", "B"), got, want):
    np.testing.assert_allclose(g, h, atol=1e-5, err_msg=name)


def test_shared_lora_matmul_matches_autodiff():
  """Three adapters on one x (ranks 4, 2, 3; their own scales) as one A product: values and every gradient."""
  x, _, _, _, _ = _arrays()
  ks = jax.random.split(jax.random.key(5), 7)
  a = tuple(jax.random.normal(k, (I, r)) for k, r in zip(ks[:3], (4, 2, 3)))
  b = tuple(jax.random.normal(k, (r, o)) for k, r, o in zip(ks[3:6], (4, 2, 3), (5, 7, 6)))
  dys = tuple(jax.random.normal(jax.random.fold_in(ks[6], i), (M, o)) for i, o in enumerate((5, 7, 6)))
  scales = (0.5, 2.0, 1.5)

  def plain(x, a, b):
    return sum(jnp.sum(s * (x @ ai) @ bi * dy) for ai, bi, s, dy in zip(a, b, scales, dys))

  with jax.default_matmul_precision("highest"):
    ys = matmul.shared_lora_matmul(x, a, b, scales)
    for y, ai, bi, s in zip(ys, a, b, scales):
      np.testing.assert_allclose(y, s * (x @ ai) @ bi, atol=1e-4)
    got = jax.jit(jax.grad(lambda *p: sum(jnp.sum(y * dy) for y, dy in zip(matmul.shared_lora_matmul(*p, scales), dys)),
                           (0, 1, 2)))(x, a, b)
    want = jax.jit(jax.grad(plain, (0, 1, 2)))(x, a, b)
  for name, g, h in zip(("x", "A", "B"), got, want):
    for gi, hi in zip(jax.tree.leaves(g), jax.tree.leaves(h)):
      np.testing.assert_allclose(gi, hi, atol=1e-4, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("einsum,want", [
    ("BTD,DNH->BTNH", ("BT", "D", "NH")),
    ("BTNH,NHD->BTD", ("BT", "NH", "D")),
    ("BTD,VD->BTV", None),  # tied head: the weight is [out, in]
    ("BTD,DF->BFT", None),  # output letters permuted
])
def test_flat_layout(einsum, want):
  assert matmul.flat_layout(einsum) == want
