"""The CPU kernels' `name`: a remat-kept 16-bit value is stored as its uint16 bits, with the same value and gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models.cpu import CPU

KEEP = jax.checkpoint_policies.save_only_these_names("keep")


def _residuals(fn, *args, capsys) -> list[str]:
  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(fn, policy=KEEP), *args)
  return capsys.readouterr().out.splitlines()


def _inputs(dtype):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((4, 8)), dtype), jnp.asarray(0.3 * rng.standard_normal((8, 8)), dtype))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_sixteen_bit_value_is_kept_as_bits_with_the_same_value_and_gradient(dtype, capsys):
  def loss(x, w, keep):
    y = jnp.sin(x @ w)
    y = keep(y)
    return jnp.sum(jnp.cos(y).astype(jnp.float32) * jnp.arange(8.0))

  bits = lambda y: CPU.name(y, "keep")
  plain = lambda y: jax.ad_checkpoint.checkpoint_name(y, "keep")
  x, w = _inputs(dtype)
  lines = _residuals(lambda x, w: loss(x, w, bits), x, w, capsys=capsys)
  assert [line for line in lines if "named 'keep'" in line] and all(
    line.startswith("u16[4,8]") for line in lines if "named 'keep'" in line
  ), lines
  assert not [line for line in lines if "named" not in line and "argument" not in line], lines  # nothing else kept
  want = jax.value_and_grad(jax.checkpoint(lambda x, w: loss(x, w, plain), policy=KEEP), argnums=(0, 1))(x, w)
  got = jax.value_and_grad(jax.checkpoint(lambda x, w: loss(x, w, bits), policy=KEEP), argnums=(0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_float32_is_named_as_it_is(capsys):
  x, w = _inputs(jnp.float32)
  lines = _residuals(lambda x, w: jnp.sum(jnp.cos(CPU.name(x @ w, "keep"))), x, w, capsys=capsys)
  assert any(line.startswith("f32[4,8] named 'keep'") for line in lines), lines


def test_a_name_in_a_custom_vjp_forward_is_kept_as_bits(capsys):
  """differentiated=False (a custom_vjp forward rule, which no JVP traces): the policy still sees the name."""

  @jax.custom_vjp
  def double(y):
    return 2 * y

  def fwd(y):
    out = CPU.name(2 * y, "keep", differentiated=False)
    return out, out

  def bwd(out, g):
    return (2 * g * jnp.ones_like(out),)

  double.defvjp(fwd, bwd)
  x, w = _inputs(jnp.bfloat16)
  lines = _residuals(lambda x, w: jnp.sum(jnp.sin(double(x @ w)).astype(jnp.float32)), x, w, capsys=capsys)
  assert any(re.match(r"u16\[4,8\] named 'keep'", line) for line in lines), lines
