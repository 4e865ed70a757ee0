"""Token x weight products as plain 2-D matmuls, with backward passes chosen for their layout.

The weight gradients of a linear layer contract over tokens: dW = x^T dy for x [M, I], dy
[M, O], M = batch x sequence. Left to autodiff, XLA's CPU backend lays such a product out by
transposing one operand inside whatever elementwise fusion produced it, and picks the operand
by position, not size. On the SmolLM2-135M CPU step (bench/NOTES.md) those fused transposes
cost up to 17 ms each where a standalone transpose of the same array takes 1.4 ms: 1.2 s of a
7.1 s LoRA step and 0.7 s of a 7.2 s full step. The products below transpose a chosen operand
explicitly, behind an optimization barrier so the simplifier cannot fold the transpose back
into the dot, and every product is a plain [m, k] x [k, n]. The math is unchanged
(tests/models/test_matmul.py). The transposes chosen here are small, but their effect on GPU
and TPU step time has not been measured yet (bench/train_gpu.py).

16-bit products on CPU go through `wide_product` (see there): asked for a float32 result, XLA
runs them on the CPU's bfloat16 units, several times faster than a 16-bit result. Their products
that contract over tokens read a transposed copy made by `_copy_T`, without which XLA runs them
in float32 instead.

Shape letters: M tokens, I inputs, O outputs, R LoRA rank.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_barrier = jax.lax.optimization_barrier
_SIXTEEN_BIT = (jnp.bfloat16, jnp.float16)


def wide_product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array | None:
  """einsum(spec, a, b) asked for a float32 result and cast back to a's dtype, where that is faster; else None.

  Applies when the default backend (where jaxtune's programs run) is the CPU, to two operands of
  the same 16-bit dtype. There XLA runs a bfloat16 product that returns float32 on the CPU's
  bfloat16 units (AMX on session 8's Xeon: 1,230-1,490 GFLOP/s), while the same product
  returning bfloat16, which is what `a @ b` asks for, takes a generic path (218-253 GFLOP/s).
  Both accumulate in float32, so only the final rounding can differ (0.015% of the elements of
  a [1024, 576] x [576, 1536] product). Callers pass the operands as they are stored and let the
  spec say which axes contract: `a @ b.T` with a float32 result stays on the slow path (243
  GFLOP/s) where the equivalent einsum does not (1,340). The bfloat16 LoRA step on CPU went from
  3.44-3.61 to 2.25-2.38 s (bench/NOTES.md item 31).

  None elsewhere: on GPU and TPU the products stay as they were, because XLA may or may not fold
  the cast back into the GEMM there, and that is unmeasured. None for float32, whose products
  keep the forms measured for them below.
  """
  if not _widens(a, b):
    return None
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _widens(a: jax.Array, b: jax.Array) -> bool:
  return jax.default_backend() == "cpu" and a.dtype == b.dtype and a.dtype in _SIXTEEN_BIT


def product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum(spec, a, b), through `wide_product` where that applies."""
  out = wide_product(spec, a, b)
  return jnp.einsum(spec, a, b) if out is None else out


def flat_layout(einsum: str) -> tuple[str, str, str] | None:
  """(batch, in, out) letters when `einsum` is x [batch..., in...] . w [in..., out...] -> [batch..., out...].

  That is every Linear of the model ("BTD,DNH->BTNH", "BTNH,NHD->BTD", ...): such a product
  is one [M, I] x [I, O] matmul after reshapes that move no data. None for any other einsum.
  """
  x_spec, rest = einsum.replace(" ", "").split(",")
  w_spec, y_spec = rest.split("->")
  ins = "".join(c for c in w_spec if c in x_spec)
  outs = "".join(c for c in w_spec if c not in x_spec)
  batch = "".join(c for c in x_spec if c not in w_spec)
  if ins and w_spec == ins + outs and x_spec == batch + ins and y_spec == batch + outs:
    return batch, ins, outs
  return None


def _copy_T(a_MN: jax.Array) -> jax.Array:
  """a.T [N, M], written so that XLA's CPU backend moves the data.

  A plain transpose (behind a barrier or not) reaches XLA's operand upcaster as a layout change
  of its input, and a 16-bit product with such an operand is upcast to float32 and run off the
  bfloat16 units: a [576, 1024] x [1024, 1536] weight gradient at 185-193 GFLOP/s instead of
  307-330, transpose included (Zen 4; bench/NOTES.md item 38). Transposed as [M/k, k, N] ->
  [N, M/k, k], the array cannot be a relayout of its input, so the copy happens and the product
  stays 16-bit. The values are those of a.T.
  """
  m, n = a_MN.shape
  k = next((d for d in (8, 4, 2) if m % d == 0), 1)
  return a_MN.reshape(m // k, k, n).transpose(2, 0, 1).reshape(n, m)


def _token_contraction(x_MI: jax.Array, dy_MO: jax.Array) -> jax.Array:
  """x^T dy [I, O], transposing whichever of x and dy is smaller.

  The transposed operand is usually produced by an elementwise fusion (a norm, a recomputed
  activation), and XLA fuses that producer into the transpose: a strided loop, ~9 ms per
  [1024, 1536] array here. When dy is the smaller, dy^T x is formed and the [O, I] product,
  a plain copy, is transposed back.
  """
  if _widens(x_MI, dy_MO):  # 16-bit on CPU: the transposed operand as a real copy (see _copy_T)
    if x_MI.shape[1] <= dy_MO.shape[1]:
      return wide_product("im,mo->io", _copy_T(x_MI), dy_MO)
    return wide_product("om,mi->oi", _copy_T(dy_MO), x_MI).T
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
    wide = wide_product("mo,io->mi", dy, w)
    dx = (dy @ w.T if wide is None else wide).astype(w.dtype)
  dw = _token_contraction(x, dy).astype(w.dtype) if x is not None else None
  return dx, dw


dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)


def lora_matmul(x_MI: jax.Array, a_IR: jax.Array, b_RO: jax.Array, scale: float) -> jax.Array:
  """scale * (x @ A) @ B for x [M, I], A [I, R], B [R, O]; never forms A @ B."""
  return shared_lora_matmul(x_MI, (a_IR,), (b_RO,), (scale,))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def shared_lora_matmul(x_MI: jax.Array, a: tuple[jax.Array, ...], b: tuple[jax.Array, ...],
                       scales: tuple[float, ...]) -> tuple[jax.Array, ...]:
  """[scale_i * (x @ A_i) @ B_i] for adapters that read the same x (q/k/v, gate/up): A_i [I, R_i], B_i [R_i, O_i].

  The A factors run as one product with [A_1 | A_2 | ...] [I, sum R_i], in the forward and for
  both backward products over A (dx and dA): a [M, I] x [I, 16] product is memory-bound, so
  three of them cost about three reads of x where one [I, 48] product costs one (NOTES item 15).
  Both factor gradients contract over tokens; the small [M, R] operands are the ones
  transposed (dA is formed as [R, I] and transposed back: also small). Never forms A @ B.
  """
  return _shared_lora_fwd(x_MI, a, b, scales)[0]


def _shared_lora_fwd(x, a, b, scales):
  a_cat = _cat(a, axis=1)  # [I, sum R], saved: small (the backward needs the same concatenation)
  hs = _split(product("mi,ir->mr", x, a_cat), [bi.shape[0] for bi in b], axis=1)  # [M, R_i], saved: small
  hs = [hi * jnp.asarray(si, x.dtype) for hi, si in zip(hs, scales)]
  return tuple(product("mr,ro->mo", hi, bi) for hi, bi in zip(hs, b)), (x, a_cat, b, hs)


def _cat(parts: tuple[jax.Array, ...] | list[jax.Array], axis: int) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _split(t: jax.Array, sizes: list[int], axis: int) -> list[jax.Array]:
  if len(sizes) == 1:
    return [t]
  bounds = [sum(sizes[:i]) for i in range(1, len(sizes))]
  return jnp.split(t, bounds, axis=axis)


def _shared_lora_bwd(scales, res, dys):
  x, a_cat, b, hs = res
  sizes = [bi.shape[0] for bi in b]
  if _widens(x, a_cat) and all(_widens(dy, bi) for dy, bi in zip(dys, b)):  # 16-bit on CPU: see _copy_T
    dh = _cat([wide_product("mo,ro->mr", dy, bi) * jnp.asarray(si, dy.dtype) for dy, bi, si in zip(dys, b, scales)],
              axis=1)
    da = tuple(piece.T for piece in _split(wide_product("rm,mi->ri", _copy_T(dh), x), sizes, axis=0))
    db = tuple(wide_product("rm,mo->ro", _copy_T(hi), dy) for hi, dy in zip(hs, dys))
    return wide_product("mr,ir->mi", dh, a_cat), da, db
  dh = _cat([(dy @ bi.T) * jnp.asarray(si, dy.dtype) for dy, bi, si in zip(dys, b, scales)], axis=1)  # [M, sum R]
  dx = dh @ a_cat.T  # the sum of every adapter's dx
  da_RI = _barrier(dh.T) @ x  # [sum R, M] x [M, I]
  da = tuple(_barrier(piece).T for piece in _split(da_RI, sizes, axis=0))
  db = tuple(_barrier(hi.T) @ dy for hi, dy in zip(hs, dys))  # [R_i, M] x [M, O_i]
  return dx, da, db


shared_lora_matmul.defvjp(_shared_lora_fwd, _shared_lora_bwd)
