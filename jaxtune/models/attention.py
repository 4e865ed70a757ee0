"""Attention: one mask rule for training, packing, padding and KV-cache decoding.

Every query and key carries a *slot* (its index in the sequence or cache) and a
*segment* id (0 = padding / empty cache slot). A query attends a key when

    key slot <= query slot                      (causal)
    and key segment == query segment != 0       (no cross-talk between packed examples)
    and query slot - key slot < window          (sliding-window layers only)

Implementations (`ModelOptions.attention_impl`), all with the same mask and the same values:
- `xla`: the plain softmax program, differentiated by JAX;
- `chunked`: a custom backward that saves only each row's softmax max and sum, not the [T, S]
  probabilities, and recomputes them (one q k^T product) in the backward; with kernels that ask
  for it, queries run in causal blocks that skip the work above the diagonal;
- `cudnn`: `jax.nn.dot_product_attention`'s cuDNN kernel on GPU (`dot_product` is that call with
  XLA's implementation, so the wiring is tested on CPU);
- `splash`: Pallas splash attention on TPU (Pallas' interpret mode elsewhere), for training and
  prefill without a KV cache.
The products go through the run's kernels (models/kernels.py).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxtune.models.kernels import PLAIN, PlainKernels

ATTENTION_NAME = "attention"  # checkpoint_name of the attention output and softmax statistics
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows give a uniform softmax, not NaN


def keeps_fused_outputs(prim, *_, **__) -> bool:
  """Remat policy: keep the output and softmax statistics of cuDNN's attention forward.

  jax.nn.dot_product_attention names none of its residuals, so without this a remat policy that
  keeps only products and names reruns the whole cuDNN forward inside the backward; the XLA path
  keeps the same arrays by name (ATTENTION_NAME). Splash attention's forward (a pallas_call named
  splash_mha_fwd*) is deliberately not kept: it stores its statistics in float32 broadcast over
  128 lanes, [N, T, 128] per row, as large as its output, and the trade has not been measured on
  a TPU."""
  return prim.name == "dot_product_attention_fwd_wrapper"


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


CUDNN_MAX_HEAD_DIM = 128  # cuDNN's flash attention on any GPU; 256 needs Hopper or later and is not measured


def auto_impl(
  platform: str, dtype: str, head_dim: int, softcap: float | None, seq_lens: Sequence[int] = ()
) -> tuple[str, str]:
  """(implementation, reason) for attention_impl="auto"; seq_lens: every row length training will see.

  cuDNN on GPU wherever its fused kernel applies: 1.27x (LoRA) and 1.20x (full) the chunked
  path's train step on an H200, Llama 3.2 1B, bf16, T=2048 (docs/benchmarks.md). It needs 16-bit
  inputs, a head dim that is a multiple of 8 and at most 128, no logit soft-capping, and (with
  the mask it is given) even sequence lengths. Elsewhere the chunked path, which never keeps the
  [T, S] probabilities (the lower peak of the two portable paths in `parallel.dry_run`,
  docs/scaling.md); splash on TPU stays opt-in (it needs sequence lengths that are multiples of
  128, and has not been measured on TPU hardware).
  """
  fallback = "chunked"
  if platform != "gpu":
    return fallback, f"{platform}: the portable path that keeps no [T, S] probabilities"
  if dtype not in ("bfloat16", "float16"):
    return fallback, f"cuDNN attention needs bfloat16/float16; the compute dtype is {dtype}"
  if softcap is not None:
    return fallback, "cuDNN attention has no logit soft-capping"
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    return fallback, f"head_dim {head_dim}: cuDNN attention needs a multiple of 8, at most {CUDNN_MAX_HEAD_DIM}"
  odd = [t for t in seq_lens if t % 2]
  if odd:
    return fallback, f"cuDNN attention with a mask needs even sequence lengths; rows of {odd} tokens"
  return "cudnn", f"GPU, {dtype}, head_dim {head_dim}"


def attend(
  q_BTNH: jnp.ndarray,
  k_BSKH: jnp.ndarray,
  v_BSKH: jnp.ndarray,
  mask_BTS: jnp.ndarray,
  *,
  scale: float,
  softcap: float | None = None,
  impl: str = "xla",
  kernels: PlainKernels = PLAIN,
  causal: bool = False,
  causal_blocks: int | None = None,
  save_inputs: bool = True,
) -> jnp.ndarray:
  """Grouped-query attention; returns [B, T, N, H] in q's dtype.

  save_inputs: name q, k and v as the kernel reads them (grouped by KV head) for the dots remat
  policies. The backward then reads them as saved, and recomputes neither the caller's rope nor
  the transposes, while the projections' outputs, which nothing else reads back, are not kept
  instead (the same memory). Pass False when the backward needs those outputs anyway (q/k norms
  read their input), so that they are not kept twice.

  causal=True is a promise that mask_BTS is causal in the plain sense, key t never visible to
  query t' < t, as in self-attention without a cache; the mask still says which keys each query
  sees (packed segments, padding). The kernels then skip the work above the diagonal:
  - cuDNN is told is_causal besides the mask, so it skips the tiles above the diagonal;
  - the chunked path splits the queries into causal_blocks blocks (None: as many as the kernels
    choose for T), and block i attends only keys [0, (i + 1) T / blocks), so the blocks above the
    diagonal are never computed. A count that does not divide T, or keys longer than the queries,
    fall back to one block. Fully masked (padding) query rows still get a uniform softmax, over
    their block's keys only.
  """
  if impl in ("cudnn", "dot_product"):
    if softcap is not None:
      raise ValueError(f"attention impl {impl!r} has no logit soft-capping (Gemma 2); use attention_impl='xla'.")
    if save_inputs:
      q_BTNH, k_BSKH, v_BSKH = (kernels.name(x, ATTENTION_NAME) for x in (q_BTNH, k_BSKH, v_BSKH))
    return jax.nn.dot_product_attention(
      q_BTNH,
      k_BSKH,
      v_BSKH,
      mask=mask_BTS[:, None],
      scale=scale,
      is_causal=causal,
      implementation="cudnn" if impl == "cudnn" else "xla",
    )
  if impl not in ("xla", "chunked"):
    raise ValueError(f"unknown attention impl {impl!r}; choose 'xla', 'chunked', 'cudnn' or 'dot_product'.")
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
  if save_inputs:  # kept by the dots remat policies in the layout the backward reads (see the docstring)
    q_BKGTH, k_BKSH, v_BKSH = (kernels.name(x, ATTENTION_NAME) for x in (q_BKGTH, k_BKSH, v_BKSH))
  if impl == "xla":
    out_BKGTH = _plain_attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, scale, softcap, kernels)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
  if not causal:
    causal_blocks = 1
  elif causal_blocks is None:
    causal_blocks = kernels.causal_blocks(T)
  if causal_blocks > 1 and T % causal_blocks == 0 and k_BSKH.shape[1] == T:
    size = T // causal_blocks
    out_BKGTH = jnp.concatenate(
      [  # query block i: keys up to its last query
        _chunked_attention(
          q_BKGTH[:, :, :, i * size : (i + 1) * size],
          k_BKSH[:, :, : (i + 1) * size],
          v_BKSH[:, :, : (i + 1) * size],
          mask_BTS[:, i * size : (i + 1) * size, : (i + 1) * size],
          scale,
          softcap,
          kernels,
        )
        for i in range(causal_blocks)
      ],
      axis=3,
    )
  else:
    out_BKGTH = _chunked_attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, scale, softcap, kernels)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def attend_cache(
  q_BTNH: jnp.ndarray,
  k_BKSH: jnp.ndarray,
  v_BKSH: jnp.ndarray,
  mask_BTS: jnp.ndarray,
  *,
  scale: float,
  softcap: float | None = None,
  kernels: PlainKernels = PLAIN,
) -> jnp.ndarray:
  """Grouped-query attention over a KV cache laid out [B, K, S, H] (models/transformer.py, KVCache); [B, T, N, H].

  `attend`'s plain program, with the cache read as it is stored: only the T new queries are regrouped."""
  B, T, N, H = q_BTNH.shape
  K = k_BKSH.shape[1]
  q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  if T == 1 and kernels.one_query_sums:
    out_BKGTH = _one_query_attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, scale, softcap)
  else:
    out_BKGTH = _plain_attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, scale, softcap, kernels)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _one_query_attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, scale, softcap):
  """_plain_attention for one query per row (a decoding step), its two products written as multiply-and-sum.

  Per row and KV head they are [G, H] x [H, S] and [G, S] x [S, H] with G of 1-8: as batched products XLA's
  CPU backend runs them at a few GFLOP/s, far below the rate at which the cache can be read, while a fused
  multiply-and-sum reads each key and value once (docs/performance-notes.md, "Generation"). Both accumulate in
  float32, as the products do."""
  f32 = jnp.float32
  q_BKGH = q_BKGTH[:, :, :, 0].astype(f32)
  logits = jnp.sum(q_BKGH[:, :, :, None, :] * k_BKSH[:, :, None].astype(f32), axis=-1)[:, :, :, None] * scale
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask_BTS[:, None, None], logits, _MASKED)
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  probs = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(v_BKSH.dtype)  # [B, K, G, 1, S], as _plain_attention
  out = jnp.sum(probs[:, :, :, 0, :, None].astype(f32) * v_BKSH[:, :, None].astype(f32), axis=-2)
  return out[:, :, :, None].astype(v_BKSH.dtype)


def _masked_logits(q_BKGTH, k_BKSH, mask_BTS, scale, softcap):
  """(logits [B, K, G, T, S] float32 with masked entries at _MASKED, tanh of the soft-cap or None)."""
  logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH, preferred_element_type=jnp.float32) * scale
  tanh = None
  if softcap is not None:
    tanh = jnp.tanh(logits / softcap)
    logits = tanh * softcap
  return jnp.where(mask_BTS[:, None, None], logits, _MASKED), tanh


def _plain_attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, scale, softcap, kernels):
  """softmax(mask(cap(scale q k^T))) v for queries grouped per KV head; [B, K, G, T, H], autodiff's backward."""
  logits, _ = _masked_logits(q_BKGTH, k_BKSH, mask_BTS, scale, softcap)
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  probs = e / jnp.sum(e, axis=-1, keepdims=True)
  out = kernels.product("BKGTS,BKSH->BKGTH", probs.astype(v_BKSH.dtype), v_BKSH)
  return kernels.name(out, ATTENTION_NAME)  # kept by the dots policies: no attention recompute in the backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, scale, softcap, kernels):
  """As _plain_attention, with a backward that needs only the softmax's row max and sum.

  Only those ([B, K, G, T] each) are saved, and the probabilities are recomputed in the backward
  (one q k^T product), instead of a [B, K, G, T, S] float32 tensor per layer.
  """
  return _attention_fwd(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, scale, softcap, kernels)[0]


def _attention_fwd(q, k, v, mask, scale, softcap, kernels):
  logits, _ = _masked_logits(q, k, mask, scale, softcap)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  out = kernels.product("BKGTS,BKSH->BKGTH", (e / denom).astype(v.dtype), v)
  # Named so remat policies can keep them (models/transformer.py): the backward then needs no
  # forward recompute of the attention. Max and sum, not their log-sum-exp: m + log(S) rounds
  # back to m on a fully masked row (m = _MASKED).
  out, m, denom = (kernels.name(x, ATTENTION_NAME, differentiated=False) for x in (out, m, denom))
  return out, (q, k, v, mask, m, denom, out)


def _attention_bwd(scale, softcap, kernels, res, dout):
  q, k, v, mask, m, denom, out = res
  logits, tanh = _masked_logits(q, k, mask, scale, softcap)
  probs = jnp.exp(logits - m) / denom  # float32 [B, K, G, T, S]
  dprobs = jnp.einsum("BKGTH,BKSH->BKGTS", dout, v, preferred_element_type=jnp.float32)
  # softmax backward: dlogits = p * (dp - sum_s p dp); that row sum equals dout . out, a [T, H]
  # product instead of a reduction over the [T, S] tensor (as in FlashAttention's backward).
  row = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dlogits = probs * (dprobs - row)
  if softcap is not None:
    dlogits = dlogits * (1.0 - tanh * tanh)
  dlogits = jnp.where(mask[:, None, None], dlogits, 0.0) * scale
  dq = kernels.product("BKGTS,BKSH->BKGTH", dlogits.astype(q.dtype), k)
  dk, dv = kernels.key_value_grads(q, dout, dlogits, probs)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_chunked_attention.defvjp(_attention_fwd, _attention_bwd)


SPLASH_BLOCK = 128  # splash attention's default block size: sequence lengths must be a multiple of it


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, seq_len: int, window: int | None, softcap: float | None, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  shape = (seq_len, seq_len)
  head_mask = mask_lib.CausalMask(shape) if window is None else mask_lib.LocalMask(shape, (window - 1, 0), 0)
  return kernel_lib.make_splash_mha(
    mask_lib.MultiHeadMask([head_mask] * num_heads),
    head_shards=1,
    q_seq_shards=1,
    attn_logits_soft_cap=softcap,
    interpret=interpret,
  )


def splash_attend(
  q_BTNH,
  k_BTKH,
  v_BTKH,
  segment_ids_BT,
  is_sliding,
  *,
  window: int | None,
  scale: float,
  softcap: float | None = None,
  save_inputs: bool = True,
  kernels: PlainKernels = PLAIN,
  interpret: bool = False,
) -> jax.Array:
  """Causal (optionally sliding-window) self-attention over packed rows with Pallas splash attention.

  save_inputs as in `attend` (q as the kernel reads it; k and v before their heads are repeated).
  interpret: run the kernel in Pallas' interpret mode (any backend; the TPU kernel needs a TPU)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

  B, T, N, H = q_BTNH.shape
  if T % SPLASH_BLOCK:
    raise ValueError(
      f"splash attention needs sequence lengths that are multiples of {SPLASH_BLOCK}; got {T}. "
      "Set the data's max_seq_len / bucket lengths accordingly, or use attention_impl='xla'."
    )
  groups = N // k_BTKH.shape[2]
  q = (q_BTNH * scale).transpose(0, 2, 1, 3)
  if save_inputs:
    q, k_BTKH, v_BTKH = (kernels.name(x, ATTENTION_NAME) for x in (q, k_BTKH, v_BTKH))
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
