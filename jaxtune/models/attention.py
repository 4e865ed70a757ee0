"""Attention: one mask rule for training, packing, padding and KV-cache decoding.

Every query and key carries a *slot* (its index in the sequence or cache) and a
*segment* id (0 = padding / empty cache slot). A query attends a key when

    key slot <= query slot                      (causal)
    and key segment == query segment != 0       (no cross-talk between packed examples)
    and query slot - key slot < window          (sliding-window layers only)

The portable XLA path is the default; `impl="cudnn"` routes the same mask through
`jax.nn.dot_product_attention`'s cuDNN kernel on GPU (`impl="dot_product"` is that
call with XLA's implementation, so the wiring is tested on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows give a uniform softmax, not NaN


def attention_mask(
    q_slot_BT: jnp.ndarray,
    kv_slot_BS: jnp.ndarray,
    q_seg_BT: jnp.ndarray,
    kv_seg_BS: jnp.ndarray,
    window: jnp.ndarray | int | None = None,
) -> jnp.ndarray:
  """Boolean [B, T, S]: which keys each query may see."""
  q_slot, kv_slot = q_slot_BT[:, :, None], kv_slot_BS[:, None, :]
  mask = (kv_slot <= q_slot) & (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]) & (kv_seg_BS[:, None, :] != 0)
  if window is not None:
    mask &= (q_slot - kv_slot) < window
  return mask


def attend(
    q_BTNH: jnp.ndarray,
    k_BSKH: jnp.ndarray,
    v_BSKH: jnp.ndarray,
    mask_BTS: jnp.ndarray,
    *,
    scale: float,
    softcap: float | None = None,
    impl: str = "xla",
) -> jnp.ndarray:
  """Grouped-query attention; returns [B, T, N, H] in q's dtype."""
  if impl in ("cudnn", "dot_product"):
    if softcap is not None:
      raise ValueError(f"attention impl {impl!r} has no logit soft-capping (Gemma 2); use attention_impl='xla'.")
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale,
        implementation="cudnn" if impl == "cudnn" else "xla",
    )
  if impl != "xla":
    raise ValueError(f"unknown attention impl {impl!r}; choose 'xla', 'cudnn' or 'dot_product'.")
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask_BTS[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)
