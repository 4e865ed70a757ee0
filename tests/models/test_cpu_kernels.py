"""The CPU kernels' layout-aware products against plain autodiff: same values, same gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import cpu, einsum, kernels

from jaxprs import dot_result_types

M, D_IN, D_OUT, R = 12, 8, 10, 3


def _lora(x, a, b, scale):
  return cpu.shared_lora_matmul(x, (a,), (b,), (scale,))[0]


def _arrays(seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  return (
    jax.random.normal(k[0], (M, D_IN)),
    jax.random.normal(k[1], (D_IN, D_OUT)),
    jax.random.normal(k[2], (D_IN, R)),
    jax.random.normal(k[3], (R, D_OUT)),
    jax.random.normal(k[4], (M, D_OUT)),
  )


@pytest.mark.parametrize("argnums", [(0, 1), (0,), (1,)])
def test_dense_gradients_match_autodiff(argnums):
  x, w, _, _, dy = _arrays()
  with jax.default_matmul_precision("highest"):
    got = jax.grad(lambda x, w: jnp.sum(cpu.dense(x, w) * dy), argnums)(x, w)
    want = jax.grad(lambda x, w: jnp.sum((x @ w) * dy), argnums)(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dense_with_a_frozen_weight_saves_no_input():
  """Under LoRA the base weight is frozen: its product keeps only w for the backward pass."""
  x, w, _, _, dy = _arrays()
  f = lambda x: jnp.sum(cpu.dense(x, w) * dy)
  _, vjp = jax.vjp(f, x)
  saved = [leaf.shape for leaf in jax.tree.leaves(vjp)]
  assert (M, D_IN) not in saved and (D_IN, D_OUT) in saved
  np.testing.assert_allclose(vjp(1.0)[0], dy @ w.T, atol=1e-5)


def test_lora_matmul_matches_autodiff():
  x, _, a, b, dy = _arrays()
  with jax.default_matmul_precision("highest"):
    y = _lora(x, a, b, 0.5)
    np.testing.assert_allclose(y, 0.5 * (x @ a) @ b, atol=1e-5)
    got = jax.grad(lambda *p: jnp.sum(_lora(*p, 0.5) * dy), (0, 1, 2))(x, a, b)
    want = jax.grad(lambda x, a, b: jnp.sum(0.5 * (x @ a) @ b * dy), (0, 1, 2))(x, a, b)
  for name, g, h in zip(("x", "A", "B"), got, want):
    np.testing.assert_allclose(g, h, atol=1e-5, err_msg=name)


def test_shared_lora_matmul_matches_autodiff():
  """Three adapters on one x (ranks 4, 2, 3; their own scales) as one A product: values and every gradient."""
  x, _, _, _, _ = _arrays()
  ks = jax.random.split(jax.random.key(5), 7)
  a = tuple(jax.random.normal(k, (D_IN, r)) for k, r in zip(ks[:3], (4, 2, 3)))
  b = tuple(jax.random.normal(k, (r, o)) for k, r, o in zip(ks[3:6], (4, 2, 3), (5, 7, 6)))
  dys = tuple(jax.random.normal(jax.random.fold_in(ks[6], i), (M, o)) for i, o in enumerate((5, 7, 6)))
  scales = (0.5, 2.0, 1.5)

  def plain(x, a, b):
    return sum(jnp.sum(s * (x @ ai) @ bi * dy) for ai, bi, s, dy in zip(a, b, scales, dys))

  with jax.default_matmul_precision("highest"):
    ys = cpu.shared_lora_matmul(x, a, b, scales)
    for y, ai, bi, s in zip(ys, a, b, scales):
      np.testing.assert_allclose(y, s * (x @ ai) @ bi, atol=1e-4)
    got = jax.jit(
      jax.grad(lambda *p: sum(jnp.sum(y * dy) for y, dy in zip(cpu.shared_lora_matmul(*p, scales), dys)), (0, 1, 2))
    )(x, a, b)
    want = jax.jit(jax.grad(plain, (0, 1, 2)))(x, a, b)
  for name, g, h in zip(("x", "A", "B"), got, want):
    for gi, hi in zip(jax.tree.leaves(g), jax.tree.leaves(h)):
      np.testing.assert_allclose(gi, hi, atol=1e-4, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize(
  "spec,want",
  [
    ("BTD,DNH->BTNH", ("BT", "D", "NH")),
    ("BTNH,NHD->BTD", ("BT", "NH", "D")),
    ("BTD,VD->BTV", None),  # tied head: the weight is [out, in]
    ("BTD,DF->BFT", None),  # output letters permuted
  ],
)
def test_flat_layout(spec, want):
  parsed = einsum.parse(spec)
  assert (parsed.batch, parsed.ins, parsed.outs) == want if want else not parsed.flat


def _bf16(*arrays):
  return tuple(a.astype(jnp.bfloat16) for a in arrays)


def test_sixteen_bit_product_rounds_once_from_float32():
  """16-bit operands: one float32-result product cast back, equal to the f32 product rounded to bf16
  (within one bf16 step: both sum in float32, in orders that may differ). float32 operands: a plain product."""
  x, w, _, _, _ = _arrays()
  xb, wb = _bf16(x, w)
  got = cpu.product("mi,io->mo", xb, wb)
  assert got.dtype == jnp.bfloat16
  assert dot_result_types(lambda a, b: cpu.product("mi,io->mo", a, b), xb, wb) == {"float32"}
  exact = np.asarray(xb, np.float64) @ np.asarray(wb, np.float64)
  step = np.abs(exact) * 2.0**-7 + 1e-6  # one bf16 step at each value
  np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - exact), step)
  assert dot_result_types(lambda a, b: cpu.product("mi,io->mo", a, b), x, w) == {"float32"}
  assert dot_result_types(lambda a, b: cpu.product("mi,io->mo", a, b), xb, w) == {"float32"}


@pytest.mark.parametrize("ops,want", [(cpu.CPU, {"float32"}), (kernels.PLAIN, {"bfloat16"})])
def test_sixteen_bit_products_use_float32_results_with_the_cpu_kernels_only(ops, want):
  """A Linear's product and the LoRA products, forward and backward: float32-result dots with the CPU
  kernels; the plain kernels leave the result type to XLA."""
  x, w, _, _, dy = _bf16(*_arrays())
  a, b = _bf16(*_arrays(1)[2:4])

  def step(x, w, a, b):
    y = ops.linear("mi,io->mo", x, w) + ops.lora(x, "mi,ir->mr", ("mr,ro->mo",), (a,), (b,), (2.0,))[0]
    return jnp.sum((y * dy).astype(jnp.float32))

  assert dot_result_types(jax.grad(step, (0, 1, 2, 3)), x, w, a, b) == want


@pytest.mark.parametrize("ops", [cpu.CPU, kernels.PLAIN], ids=["cpu", "plain"])
def test_sixteen_bit_gradients_match_float32(ops):
  """Both kernels give bf16 gradients of a Linear + shared LoRA within bf16 error of float32."""
  x, w, _, _, _ = _arrays()
  ks = jax.random.split(jax.random.key(7), 5)
  a = (jax.random.normal(ks[0], (D_IN, 4)), jax.random.normal(ks[1], (D_IN, 2)))
  b = (jax.random.normal(ks[2], (4, D_OUT)), jax.random.normal(ks[3], (2, D_OUT)))
  dy = jax.random.normal(ks[4], (M, D_OUT))

  def loss(x, w, a, b):
    ys = ops.lora(x, "mi,ir->mr", ("mr,ro->mo",) * 2, a, b, (0.5, 2.0))
    return jnp.sum(((ops.linear("mi,io->mo", x, w) + ys[0] + ys[1]) * dy.astype(x.dtype)).astype(jnp.float32))

  with jax.default_matmul_precision("highest"):
    want = jax.grad(loss, (0, 1, 2, 3))(x, w, a, b)
  got = jax.grad(loss, (0, 1, 2, 3))(*_bf16(x, w), _bf16(*a), _bf16(*b))
  for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), h, atol=0.05 * float(np.abs(h).max()), rtol=0.05)


def test_copy_transpose_equals_the_transpose():
  for m in (1024, 12, 7):  # blocks of 8, of 4, and none
    a = np.arange(m * 6, dtype=np.float32).reshape(m, 6)
    np.testing.assert_array_equal(np.asarray(cpu._copy_T(jnp.asarray(a))), a.T)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU backend compiles the program read here")
def test_sixteen_bit_weight_gradients_stay_sixteen_bit_in_xla_on_cpu():
  """bf16 weight and LoRA factor gradients whose operands come from elementwise ops (as in the step): XLA's CPU
  backend upcasts a product over a plain transpose to float32 (the slow path); over `_copy_T` every product's
  operands stay bf16 (184 against 307-330 GFLOP/s for a layer's dW on an AMD EPYC Zen 4)."""
  rng = np.random.default_rng(0)  # big enough for XLA to hand the products to YNNPACK
  x, w, a, b, dy = _bf16(
    *(rng.standard_normal(shape, np.float32) for shape in ((256, 64), (64, 96), (64, 16), (16, 96), (256, 96)))
  )

  def loss(w, a, b):
    h = jnp.tanh(x)
    return jnp.sum((jnp.sin(cpu.dense(h, w) + _lora(h, a, b, 2.0)) * dy).astype(jnp.float32))

  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(w, a, b).compile().as_text()
  dots = 0
  for computation in hlo.split("\n\n"):
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))  # every instruction's element type
    for operands in re.findall(r"\bdot\(([^)]*)\)", computation):
      dots += 1
      assert {types[name] for name in re.findall(r"%([\w.\-]+)", operands)} == {"bf16"}, computation
  assert dots >= 6  # forward: base, x A, (x A) B; backward: dW, dA, dB (and dy B^T for dA)
