"""The model's products, saved residuals and attention backward, as one explicit choice of kernels.

Model code calls these through `get(options.kernels)`, never `jax.default_backend()`:
- `plain` (this module) is the program every backend runs: einsums differentiated by JAX, no
  custom derivatives, no optimization barriers.
- `cpu` (models/cpu.py) lays the same math out for XLA's CPU backend: transposed operands behind
  barriers, 16-bit products with float32 results, residuals stacked as raw bits.
Both compute the same values (tests/models/test_kernels.py).

Shape letters: M tokens, I inputs, O outputs, R LoRA rank; B batch, K KV heads, G query heads per KV
head, T queries, S keys, H head dim.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


class PlainKernels:
  """Einsums differentiated by JAX: what XLA on TPU and GPU is given to optimise."""

  kind = "plain"
  # Whether generation takes each layer's weights out of the stack once per call (`CausalLM.layer_states`) and
  # decodes from those slices, rather than slicing in every step. XLA on TPU and GPU can fuse a slice of the stack
  # into the product that reads it (not measured on either here), so kept slices would only be a second copy of
  # the weights.
  layers_once = False
  # Whether attention over a KV cache computes a single query's products as multiply-and-sum (attention.py,
  # _one_query_attention) rather than as batched products.
  one_query_sums = False

  def linear(self, spec: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A Linear's product, einsum(spec, x, kernel) ("BTD,DNH->BTNH", ...)."""
    return jnp.einsum(spec, x, kernel)

  def product(self, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Any other product of two activations or of an activation and a weight."""
    return jnp.einsum(spec, a, b)

  def lora(
    self,
    x: jax.Array,
    a_spec: str,
    b_specs: Sequence[str],
    a: Sequence[jax.Array],
    b: Sequence[jax.Array],
    scales: Sequence[float],
  ) -> tuple[jax.Array, ...]:
    """[scale_i * B_i(A_i x)] for adapters that read the same x; never forms A_i B_i.

    The A factors share a_spec (the same contracted letters, rank last) and run as one product
    with [A_1 | A_2 | ...] concatenated on the rank axis: a product with a rank-16 output is
    bound by reading x, so one wide product costs about what one narrow one does.
    """
    ranks = [ai.shape[-1] for ai in a]
    a_cat = a[0] if len(a) == 1 else jnp.concatenate(a, axis=-1)
    h = self.product(a_spec, x, a_cat)
    hs = [h] if len(a) == 1 else jnp.split(h, [sum(ranks[:i]) for i in range(1, len(ranks))], axis=-1)
    return tuple(
      self.product(spec, hi * jnp.asarray(si, hi.dtype), bi) for spec, hi, bi, si in zip(b_specs, hs, b, scales)
    )

  def name(self, x: jax.Array, label: str, *, differentiated: bool = True) -> jax.Array:
    """checkpoint_name(x, label): a value the remat policies may keep."""
    del differentiated
    return checkpoint_name(x, label)

  def causal_blocks(self, num_queries: int) -> int:
    """Query blocks for causal block skipping in the chunked attention (1: no skipping)."""
    del num_queries
    return 1

  def key_value_grads(
    self, q_BKGTH: jax.Array, dout_BKGTH: jax.Array, dlogits_BKGTS: jax.Array, probs_BKGTS: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """(dk [B, K, S, H], dv [B, K, S, H]) of the chunked attention's backward: products over the queries."""
    dk = self.product("BKGTS,BKGTH->BKSH", dlogits_BKGTS.astype(q_BKGTH.dtype), q_BKGTH)
    dv = self.product("BKGTS,BKGTH->BKSH", probs_BKGTS.astype(dout_BKGTH.dtype), dout_BKGTH)
    return dk, dv

  def __repr__(self) -> str:
    return f"<{self.kind} kernels>"


PLAIN = PlainKernels()


def get(name: str) -> PlainKernels:
  """The kernels named by `ModelOptions.kernels`: "plain" or "cpu"."""
  if name == "plain":
    return PLAIN
  if name == "cpu":
    from jaxtune.models import cpu

    return cpu.CPU
  raise ValueError(f"kernels {name!r} is unknown; choose plain or cpu.")
