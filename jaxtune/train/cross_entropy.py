"""Cross-entropy fused with the LM head: chunked logits, gradients computed on the way forward.

The logits of a 49k-262k vocabulary are the largest tensor of a step ([N, V] float32). This
op never holds more than one chunk of them, and it never computes them twice: while a
chunk's logits are live it also forms d loss / d logits = (softmax - onehot) * weight and
contracts it at once into the gradient of the hidden states ([N, D], saved for the backward
pass) and, only if the head weight is being trained, of the weight. The backward pass just
scales those by the incoming cotangent. Against checkpointing each chunk this saves one
[N, D] x [D, V] product per step: 58 GFLOP, 7% of a SmolLM2-135M LoRA step at 4 x 256 tokens.

Shape letters: B batch, T positions, C positions in a chunk, D hidden, V vocabulary. Chunks
run over positions, so a batch sharded over B stays sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LAYOUTS = ("VD", "DV")  # tied embedding [V, D]; untied lm_head kernel [D, V]


def fused_cross_entropy(
  h_BTD: jax.Array,
  w: jax.Array,
  targets_BT: jax.Array,
  weights_BT: jax.Array,
  *,
  layout: str,
  softcap: float | None = None,
  chunk: int = 128,
) -> tuple[jax.Array, jax.Array]:
  """(sum of weight * nll, sum of weight * [target is the top logit]) over B x T tokens, float32.

  w: the LM head, [V, D] (layout "VD", tied embeddings) or [D, V] ("DV"). softcap: the final
  logit soft-cap (Gemma 2) or None. chunk: positions whose logits exist at once (B x chunk tokens).
  A target counts as correct when its logit equals the maximum (ties count as correct, unlike
  argmax, which picks the first maximal index; with float logits ties are vanishingly rare).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
  return _fused(
    h_BTD, w, targets_BT.astype(jnp.int32), weights_BT.astype(jnp.float32), layout, softcap, max(int(chunk), 1)
  )


def _chunked(x: jax.Array, size: int) -> jax.Array:
  """[B, T, ...] -> [num, B, size, ...], zero-padded along T."""
  b, t = x.shape[:2]
  num = -(-t // size)
  x = jnp.pad(x, [(0, 0), (0, num * size - t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, num, size) + x.shape[2:]), 1, 0)


def _scan(h, w, targets, weights, layout, softcap, chunk, *, grad_h: bool, grad_w: bool):
  """Loss and correct sums; with grad_h / grad_w also d(loss_sum)/dh [B, T, D] and d(loss_sum)/dw (w's layout).

  Positions without loss weight (prompts, padding) need no logits. Each row's weighted positions
  are moved to its front (a stable sort, so [B, T] keeps its sharding over B), and the chunks
  past the longest row's count skip the head entirely (`lax.cond`): the head's work follows the
  trained tokens, not the sequence length. dh is moved back to the original positions.
  """
  b, t, d = h.shape
  size = max(min(chunk, t), 1)
  vocab = w.shape[0] if layout == "VD" else w.shape[1]
  head = f"BCD,{layout}->BCV"
  order_BT = jnp.argsort(weights == 0, axis=1, stable=True)  # weighted positions first, in order
  h_s = jnp.take_along_axis(h, order_BT[..., None], axis=1)
  targets, weights = jnp.take_along_axis(targets, order_BT, axis=1), jnp.take_along_axis(weights, order_BT, axis=1)
  live_chunks = -(-jnp.max(jnp.sum(weights != 0, axis=1)) // size)

  def chunk_sums(carry, h_c, t_c, w_c, h_DN):
    loss, correct, dw_DV = carry
    z = jnp.einsum(head, h_c, w, preferred_element_type=jnp.float32)
    if softcap:
      tanh = jnp.tanh(z / softcap)
      z = tanh * softcap
    zmax = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - zmax)  # one exp for the loss and the gradient
    total = jnp.sum(e, axis=-1, keepdims=True)
    lse = zmax + jnp.log(total)
    target = jnp.take_along_axis(z, t_c[..., None], axis=-1)
    loss += jnp.sum((lse - target)[..., 0] * w_c)
    correct += jnp.sum((target >= zmax)[..., 0].astype(jnp.float32) * w_c)
    dh_c = None
    if grad_h or grad_w:
      onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == t_c[..., None]
      g_BCV = (e / total - onehot.astype(jnp.float32)) * w_c[..., None]
      if softcap:
        g_BCV = g_BCV * (1.0 - tanh * tanh)
      # Both gradient products take their operands in the head's dtype and accumulate in float32.
      # Float32 operands would make the weight's a TF32 product on a GPU: ~215 TFLOP/s on an H200,
      # 20 ms of a 168 ms full fine-tuning step against 6 ms in bf16.
      g_BCV = g_BCV.astype(w.dtype)
      if grad_h:
        dh_c = jnp.einsum(f"BCV,{layout}->BCD", g_BCV, w, preferred_element_type=jnp.float32).astype(h.dtype)
      if grad_w:  # [D, BC] x [BC, V], h transposed before the scan (see below)
        dw_DV += jnp.matmul(h_DN.astype(w.dtype), g_BCV.reshape(-1, vocab), preferred_element_type=jnp.float32)
    return (loss, correct, dw_DV), dh_c

  def body(carry, xs):
    i, h_c, t_c, w_c, h_DN = xs
    skip = lambda carry, h_c, *_: (carry, jnp.zeros_like(h_c) if grad_h else None)
    return jax.lax.cond(i < live_chunks, chunk_sums, skip, carry, h_c, t_c, w_c, h_DN)

  zero = jnp.zeros((), jnp.float32)
  dw0 = jnp.zeros((d, vocab), jnp.float32) if grad_w else zero
  h_c, t_c, w_c = (_chunked(x, size) for x in (h_s, targets, weights))
  # The weight gradient's [D, BC] operand: every chunk of h transposed once, before the scan, and
  # read as a scanned input (one more copy of h); the [BC, V] operand is never transposed.
  # Transposed inside the loop, even behind an optimization barrier, a 16-bit [D, BC] operand
  # made XLA's CPU backend run the product in float32: the bf16 full step at SmolLM2's shape took
  # 3.66 s that way and takes 3.46 s this way (on an Intel Xeon with AMX).
  h_DN = jnp.swapaxes(h_c.reshape(h_c.shape[0], -1, d), 1, 2) if grad_w else None
  xs = (jnp.arange(h_c.shape[0]), h_c, t_c, w_c, h_DN)
  (loss, correct, dw_DV), dh_s = jax.lax.scan(body, (zero, zero, dw0), xs)
  dh = None
  if grad_h:  # back from the sorted positions: dh[b, order[b, j]] = dh_s[b, j]
    dh_s = jnp.moveaxis(dh_s, 0, 1).reshape(b, -1, d)[:, :t]
    dh = jnp.take_along_axis(dh_s, jnp.argsort(order_BT, axis=1)[..., None], axis=1)
  dw = None
  if grad_w:
    dw = (dw_DV.T if layout == "VD" else dw_DV).astype(w.dtype)
  return loss, correct, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(h, w, targets, weights, layout, softcap, chunk):
  loss, correct, _, _ = _scan(h, w, targets, weights, layout, softcap, chunk, grad_h=False, grad_w=False)
  return loss, correct


def _fused_fwd(h, w, targets, weights, layout, softcap, chunk):
  # symbolic_zeros: each differentiable input arrives as CustomVJPPrimal(value, perturbed), so the
  # weight gradient is computed only when the head is trained (not under LoRA).
  loss, correct, dh, dw = _scan(
    h.value, w.value, targets.value, weights.value, layout, softcap, chunk, grad_h=h.perturbed, grad_w=w.perturbed
  )
  return (loss, correct), (dh, dw)


def _fused_bwd(layout, softcap, chunk, res, cotangents):
  del layout, softcap, chunk
  dh, dw = res
  g = cotangents[0]  # the accuracy output has no gradient
  g = jnp.zeros((), jnp.float32) if isinstance(g, jax.custom_derivatives.SymbolicZero) else g
  scale = lambda x: None if x is None else (x * g.astype(x.dtype))
  return scale(dh), scale(dw), None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def token_log_probs(
  logits_fn, h_BTD: jax.Array, targets_BT: jax.Array, needed_BT: jax.Array | None = None, *, chunk: int = 128
) -> tuple[jax.Array, jax.Array]:
  """(log p(target), [target is the top logit]) per position, float32 [B, T], for sequence-level losses.

  logits_fn maps hidden states [B, C, D] to float32 logits (the model's head, adapters and
  soft-cap included). Logits exist one chunk of positions at a time and are recomputed in the
  backward pass: preference losses weight each sequence's tokens by a factor that depends on
  the sums themselves, so the gradient cannot be formed on the way forward as `fused_cross_entropy` does.
  needed_BT: where the values are wanted (others come out 0). As in `_scan`, each row's needed
  positions are moved to its front and chunks past the longest row's count skip the head, so its
  cost follows the completion tokens, not the sequence length.
  """
  b, t = targets_BT.shape
  size = max(min(int(chunk), t), 1)
  if needed_BT is None:
    needed_BT = jnp.ones((b, t), bool)
  needed_BT = needed_BT != 0
  order_BT = jnp.argsort(~needed_BT, axis=1, stable=True)
  h_s = jnp.take_along_axis(h_BTD, order_BT[..., None], axis=1)
  targets = jnp.take_along_axis(targets_BT.astype(jnp.int32), order_BT, axis=1)
  live_chunks = -(-jnp.max(jnp.sum(needed_BT, axis=1)) // size)

  def values(h_c, t_c):
    z = logits_fn(h_c).astype(jnp.float32)
    target = jnp.take_along_axis(z, t_c[..., None], axis=-1)[..., 0]
    return target - jax.nn.logsumexp(z, axis=-1), (target >= jnp.max(z, axis=-1)).astype(jnp.float32)

  @jax.checkpoint
  def body(_, xs):
    i, h_c, t_c = xs
    zeros = lambda h_c, t_c: (jnp.zeros(t_c.shape, jnp.float32), jnp.zeros(t_c.shape, jnp.float32))
    return None, jax.lax.cond(i < live_chunks, values, zeros, h_c, t_c)

  h_c, t_c = _chunked(h_s, size), _chunked(targets, size)
  _, (logp, top1) = jax.lax.scan(body, None, (jnp.arange(h_c.shape[0]), h_c, t_c))
  inverse = jnp.argsort(order_BT, axis=1)
  back = lambda x: jnp.take_along_axis(jnp.moveaxis(x, 0, 1).reshape(b, -1)[:, :t], inverse, axis=1) * needed_BT
  return back(logp), back(top1)
