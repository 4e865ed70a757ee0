"""Attention: one mask rule for training, packing, padding and KV-cache decoding.

Every query and key carries a *slot* (its index in the sequence or cache) and a
*segment* id (0 = padding / empty cache slot). A query attends a key when

    key slot <= query slot                      (causal)
    and key segment == query segment != 0       (no cross-talk between packed examples)
    and query slot - key slot < window          (sliding-window layers only)

The portable XLA path is the default; `impl="cudnn"` routes the same mask through
`jax.nn.dot_product_attention`'s cuDNN kernel on GPU (`impl="dot_product"` is that
call with XLA's implementation, so the wiring is tested on CPU); `impl="splash"` runs
Pallas splash attention on TPU (tested in Pallas' interpret mode on CPU) for training
and prefill without a KV cache.
"""

from __future__ import annotations

import functools

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


SPLASH_BLOCK = 128  # splash attention's default block size: sequence lengths must be a multiple of it


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, seq_len: int, window: int | None, softcap: float | None, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  shape = (seq_len, seq_len)
  head_mask = mask_lib.CausalMask(shape) if window is None else mask_lib.LocalMask(shape, (window - 1, 0), 0)
  return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * num_heads), head_shards=1,
                                    q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def splash_attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, is_sliding, *, window: int | None, scale: float,
                  softcap: float | None = None) -> jax.Array:
  """Causal (optionally sliding-window) self-attention over packed rows with Pallas splash attention."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

  B, T, N, H = q_BTNH.shape
  if T % SPLASH_BLOCK:
    raise ValueError(f"splash attention needs sequence lengths that are multiples of {SPLASH_BLOCK}; got {T}. "
                     "Set the data's max_seq_len / bucket lengths accordingly, or use attention_impl='xla'.")
  interpret = jax.default_backend() != "tpu"
  groups = N // k_BTKH.shape[2]
  q = (q_BTNH * scale).transpose(0, 2, 1, 3)
  k = jnp.repeat(k_BTKH, groups, axis=2).transpose(0, 2, 1, 3)
  v = jnp.repeat(v_BTKH, groups, axis=2).transpose(0, 2, 1, 3)
  segments = kernel_lib.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)

  def run(window_or_none):
    kernel = _splash_kernel(N, T, window_or_none, softcap, interpret)
    return jax.vmap(kernel)(q, k, v, segment_ids=segments)

  if window is None:
    out = run(None)
  else:  # the layer kind is a traced value inside the layer scan: run only the kernel it needs
    out = jax.lax.cond(is_sliding, lambda: run(window), lambda: run(None))
  return out.transpose(0, 2, 1, 3).astype(q_BTNH.dtype)
