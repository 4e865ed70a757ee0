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


@pytest.mark.parametrize("einsum,want", [
    ("BTD,DNH->BTNH", ("BT", "D", "NH")),
    ("BTNH,NHD->BTD", ("BT", "NH", "D")),
    ("BTD,VD->BTV", None),  # tied head: the weight is [out, in]
    ("BTD,DF->BFT", None),  # output letters permuted
])
def test_flat_layout(einsum, want):
  assert matmul.flat_layout(einsum) == want
