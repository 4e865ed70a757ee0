"""Values the remat policies keep (`checkpoint_name`), stored as raw bits where 16-bit floats are slow to stack.

In a layer scan, each value a remat policy keeps is written into a stacked [L, ...] residual, one
layer per iteration (a dynamic-update-slice). XLA's CPU backend has no bfloat16 form of that
update: it converts the whole stack to float32, writes the layer, and converts it back, so every
iteration passes over all L layers (bench/NOTES.md items 31 and 37). The same update on a
uint16 array is done in place. `name` therefore keeps a 16-bit float's bits as uint16 on CPU;
the value, its rounding and its gradient are unchanged. Elsewhere it is plain `checkpoint_name`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_SIXTEEN_BIT = (jnp.bfloat16, jnp.float16)


def name(x: jax.Array, label: str, *, differentiated: bool = True) -> jax.Array:
  """checkpoint_name(x, label); on CPU a 16-bit float is named as its uint16 bits (see the module doc).

  differentiated=False where x is never differentiated, as in a custom_vjp's forward rule: there
  the bits are named directly. (A custom_jvp function that no JVP traces stays a call, and the
  remat policy would not see the name inside it.)"""
  if jax.default_backend() != "cpu" or x.dtype not in _SIXTEEN_BIT:
    return checkpoint_name(x, label)
  return _named_bits(x, label) if differentiated else _through_bits(x, label)


def _through_bits(x: jax.Array, label: str) -> jax.Array:
  bits = checkpoint_name(jax.lax.bitcast_convert_type(x, jnp.uint16), label)
  return jax.lax.bitcast_convert_type(bits, x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _named_bits(x: jax.Array, label: str) -> jax.Array:
  return _through_bits(x, label)


@_named_bits.defjvp
def _named_bits_jvp(label, primals, tangents):
  # An integer bitcast has no derivative, so the identity's tangent is given here. The primal is
  # formed in the rule itself, not by calling _named_bits: that keeps the name in the traced
  # program, where the remat policy can see it.
  return _through_bits(primals[0], label), tangents[0]
