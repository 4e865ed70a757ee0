"""Kernels for XLA's CPU backend: the plain math, laid out so that XLA's CPU code generator runs it fast.

Chosen with `ModelOptions.kernels="cpu"` (the training CLI's "auto" on CPU); never on TPU or GPU.
Three things differ from models/kernels.py, each measured on 2-vCPU AMD EPYC Zen 4 and Intel Xeon
machines (docs/performance-notes.md, "Matmuls" and "Memory"):

- Weight gradients contract over tokens (dW = x^T dy). Left to autodiff, XLA's CPU backend
  transposes one operand inside whatever elementwise fusion produced it, a strided loop up to 10x
  slower than a standalone transpose. Here every product is a plain [m, k] x [k, n] matmul and the
  smaller operand is transposed explicitly, behind an optimization barrier so the simplifier does not
  fold the transpose back into the dot (SmolLM2-135M LoRA step: 1.2 s of 7.1 s saved).
- 16-bit products ask for a float32 result and cast back: XLA then runs them on the CPU's bfloat16
  units (AMX, AVX512-BF16), several times faster than a product with a 16-bit result. Both accumulate
  in float32, so only the final rounding can differ.
- Values the remat policies keep are stacked over the layer scan one layer per iteration. XLA's CPU
  backend has no bfloat16 form of that in-place update: it converts the whole stack to float32 and
  back each layer. A 16-bit value is therefore named as its uint16 bits, which update in place.

Shape letters as in models/kernels.py.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxtune.models import einsum as einsum_lib
from jaxtune.models.kernels import PlainKernels

_barrier = jax.lax.optimization_barrier
_SIXTEEN_BIT = (jnp.bfloat16, jnp.float16)


def _sixteen_bit(*arrays: jax.Array) -> bool:
  return arrays[0].dtype in _SIXTEEN_BIT and all(a.dtype == arrays[0].dtype for a in arrays)


def product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum(spec, a, b); two 16-bit operands are multiplied with a float32 result, then cast back.

  Callers pass the operands as they are stored and let the spec say which axes contract: `a @ b.T`
  with a float32 result stays off the bfloat16 units where the equivalent einsum does not.
  """
  if _sixteen_bit(a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)
  return jnp.einsum(spec, a, b)


def _copy_T(a_MN: jax.Array) -> jax.Array:
  """a.T [N, M], written so that XLA's CPU backend moves the data.

  A plain transpose reaches XLA's operand upcaster as a layout change of its input, and a 16-bit
  product with such an operand is run in float32, off the bfloat16 units. Transposed as
  [M/k, k, N] -> [N, M/k, k], the array cannot be a relayout of its input, so the copy happens and
  the product stays 16-bit.
  """
  m, n = a_MN.shape
  k = next((d for d in (8, 4, 2) if m % d == 0), 1)
  return a_MN.reshape(m // k, k, n).transpose(2, 0, 1).reshape(n, m)


def _token_contraction(x_MI: jax.Array, dy_MO: jax.Array) -> jax.Array:
  """x^T dy [I, O], transposing whichever of x and dy is smaller.

  When dy is the smaller, dy^T x is formed and the [O, I] result, a plain copy, is transposed back.
  """
  if _sixteen_bit(x_MI, dy_MO):  # the transposed operand as a real copy (see _copy_T)
    if x_MI.shape[1] <= dy_MO.shape[1]:
      return product("im,mo->io", _copy_T(x_MI), dy_MO)
    return product("om,mi->oi", _copy_T(dy_MO), x_MI).T
  if x_MI.shape[1] <= dy_MO.shape[1]:
    return _barrier(x_MI.T) @ dy_MO
  return _barrier(_barrier(dy_MO.T) @ x_MI).T


@jax.custom_vjp
def dense(x_MI: jax.Array, w_IO: jax.Array) -> jax.Array:
  """x @ w; the weight gradient, when w is trained, is x^T dy by `_token_contraction`."""
  return product("mi,io->mo", x_MI, w_IO)


def _dense_fwd(x, w):
  # symbolic zeros: inputs arrive as CustomVJPPrimal(value, perturbed). A frozen weight (LoRA)
  # needs neither its gradient nor the saved x.
  x_saved = x.value if w.perturbed else None
  return product("mi,io->mo", x.value, w.value), (x_saved, w.value, x.perturbed)


def _dense_bwd(res, dy):
  x, w, x_perturbed = res
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None
  dx = None
  if x_perturbed:
    dx = (product("mo,io->mi", dy, w) if _sixteen_bit(dy, w) else dy @ w.T).astype(w.dtype)
  dw = _token_contraction(x, dy).astype(w.dtype) if x is not None else None
  return dx, dw


dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)


def _cat(parts: Sequence[jax.Array], axis: int) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _split(t: jax.Array, sizes: Sequence[int], axis: int) -> list[jax.Array]:
  if len(sizes) == 1:
    return [t]
  return jnp.split(t, [sum(sizes[:i]) for i in range(1, len(sizes))], axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def shared_lora_matmul(
  x_MI: jax.Array, a: tuple[jax.Array, ...], b: tuple[jax.Array, ...], scales: tuple[float, ...]
) -> tuple[jax.Array, ...]:
  """[scale_i * (x @ A_i) @ B_i] for adapters reading the same x: A_i [I, R_i], B_i [R_i, O_i].

  As PlainKernels.lora, with both factor gradients contracting over tokens through small
  transposed [M, R] operands (dA formed as [R, I] and transposed back: also small).
  """
  return _shared_lora_fwd(x_MI, a, b, scales)[0]


def _shared_lora_fwd(x, a, b, scales):
  a_cat = _cat(a, axis=1)  # [I, sum R], saved: small (the backward needs the same concatenation)
  hs = _split(product("mi,ir->mr", x, a_cat), [bi.shape[0] for bi in b], axis=1)  # [M, R_i], saved: small
  hs = [hi * jnp.asarray(si, x.dtype) for hi, si in zip(hs, scales)]
  return tuple(product("mr,ro->mo", hi, bi) for hi, bi in zip(hs, b)), (x, a_cat, b, hs)


def _shared_lora_bwd(scales, res, dys):
  x, a_cat, b, hs = res
  sizes = [bi.shape[0] for bi in b]
  if _sixteen_bit(x, a_cat, *dys, *b):  # see _copy_T
    dh = _cat([product("mo,ro->mr", dy, bi) * jnp.asarray(si, dy.dtype) for dy, bi, si in zip(dys, b, scales)], axis=1)
    da = tuple(piece.T for piece in _split(product("rm,mi->ri", _copy_T(dh), x), sizes, axis=0))
    db = tuple(product("rm,mo->ro", _copy_T(hi), dy) for hi, dy in zip(hs, dys))
    return product("mr,ir->mi", dh, a_cat), da, db
  dh = _cat([(dy @ bi.T) * jnp.asarray(si, dy.dtype) for dy, bi, si in zip(dys, b, scales)], axis=1)  # [M, sum R]
  dx = dh @ a_cat.T  # the sum of every adapter's dx
  da_RI = _barrier(dh.T) @ x  # [sum R, M] x [M, I]
  da = tuple(_barrier(piece).T for piece in _split(da_RI, sizes, axis=0))
  db = tuple(_barrier(hi.T) @ dy for hi, dy in zip(hs, dys))  # [R_i, M] x [M, O_i]
  return dx, da, db


shared_lora_matmul.defvjp(_shared_lora_fwd, _shared_lora_bwd)


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


def causal_block_count(num_queries: int, min_size: int = 128, most: int = 8) -> int:
  """The most query blocks (<= `most`) dividing T whose size is >= `min_size`, else 1.

  On a 2-vCPU Zen 4, one SmolLM2 layer's attention forward and backward at T=256 took 16 ms in one
  block, 13 ms in 2 and 11 ms in 4, but in the whole train step blocks under 128 queries gained
  nothing: their slices and partial key/value gradients cost what the smaller products save.
  """
  for blocks in range(min(most, num_queries // min_size), 1, -1):
    if num_queries % blocks == 0:
      return blocks
  return 1


class CPUKernels(PlainKernels):
  """The plain math, laid out for XLA's CPU backend (see the module docstring)."""

  kind = "cpu"
  # XLA's CPU backend copies a slice of the stacked weights before each product that reads it. Sliced in every
  # decoding step, the whole decoder would be copied once per token, which at batch 1 costs more than the
  # products (docs/performance-notes.md, "Generation"); generation slices once per call instead.
  layers_once = True
  # XLA's CPU backend runs a decoding step's attention products ([G, H] x [H, S] per row and KV head) at a few
  # GFLOP/s; as multiply-and-sum they run at the speed the cache is read.
  one_query_sums = True

  def linear(self, spec: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    parsed = einsum_lib.parse(spec)
    if not parsed.flat or kernel.ndim != len(parsed.w):  # stack axes left: not one 2-D product
      return self.product(spec, x, kernel)
    n_in = len(parsed.ins)
    lead, out = x.shape[: x.ndim - n_in], kernel.shape[n_in:]  # [M, I] x [I, O]
    y = dense(x.reshape(math.prod(lead), -1), kernel.reshape(math.prod(kernel.shape[:n_in]), -1))
    return y.reshape(lead + out)

  def product(self, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return product(spec, a, b)

  def lora(self, x, a_spec, b_specs, a, b, scales):
    parsed = einsum_lib.parse(a_spec)
    flat = parsed.flat and all(ai.ndim == len(parsed.w) for ai in a) and all(einsum_lib.parse(s).flat for s in b_specs)
    if not flat:
      return super().lora(x, a_spec, b_specs, a, b, scales)
    n_in = len(parsed.ins)
    lead = x.shape[: x.ndim - n_in]
    ys = shared_lora_matmul(
      x.reshape(math.prod(lead), -1),
      tuple(ai.reshape(-1, ai.shape[-1]) for ai in a),
      tuple(bi.reshape(bi.shape[0], -1) for bi in b),
      tuple(scales),
    )
    return tuple(y.reshape(lead + bi.shape[1:]) for y, bi in zip(ys, b))

  def name(self, x: jax.Array, label: str, *, differentiated: bool = True) -> jax.Array:
    """checkpoint_name(x, label), a 16-bit float named as its uint16 bits (see the module docstring).

    differentiated=False where x is never differentiated, as in a custom_vjp's forward rule: there
    the bits are named directly (a custom_jvp function that no JVP traces stays a call, and the
    remat policy would not see the name inside it).
    """
    if x.dtype not in _SIXTEEN_BIT:
      return checkpoint_name(x, label)
    return _named_bits(x, label) if differentiated else _through_bits(x, label)

  def causal_blocks(self, num_queries: int) -> int:
    return causal_block_count(num_queries)

  def key_value_grads(self, q_BKGTH, dout_BKGTH, dlogits_BKGTS, probs_BKGTS):
    """As the plain rule, computed transposed ([.., H, S]) from small transposed operands.

    Left alone, XLA's CPU backend transposes the [.., T, S] probabilities instead.
    """
    B, K, G, T, H = q_BKGTH.shape
    rows = lambda x: x.reshape(B, K, G * T, x.shape[-1])
    dk_T = product(
      "BKHM,BKMS->BKHS", _barrier(rows(q_BKGTH).transpose(0, 1, 3, 2)), rows(dlogits_BKGTS).astype(q_BKGTH.dtype)
    )
    dv_T = product(
      "BKHM,BKMS->BKHS", _barrier(rows(dout_BKGTH).transpose(0, 1, 3, 2)), rows(probs_BKGTS).astype(dout_BKGTH.dtype)
    )
    return _barrier(dk_T).transpose(0, 1, 3, 2), _barrier(dv_T).transpose(0, 1, 3, 2)


CPU = CPUKernels()
