"""The decoder-only transformer of every supported family, in Flax NNX.

Layers are stored stacked (every parameter under `layers` has a leading
[num_layers] axis) and run with `jax.lax.scan`, so compile time does not grow
with depth. Every parameter carries logical axis names in its `axes` metadata
("layers", "embed", "heads", ...) for the sharding rules of the mesh stage.

Shape letters: B batch, T query length, S key length, D hidden, N query heads,
K key/value heads, H head dim, F MLP hidden, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models import attention as attn_lib
from jaxtune.models import einsum as einsum_lib
from jaxtune.models import kernels as kernels_lib
from jaxtune.models import quantize as quantize_lib
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig
from jaxtune.models.options import ACTIVATION_AXES, REMAT_POLICIES, ModelOptions

ADAPTED_NAME = "adapted"  # checkpoint_name of a Linear's output when an adapter adds to it
LAYER_INPUT_NAME = "layer_input"  # checkpoint_name of each layer's input, the scan's carry
_KEEP_INPUT = jax.checkpoint_policies.save_only_these_names(LAYER_INPUT_NAME)
_KEEP_NAMED = jax.checkpoint_policies.save_from_both_policies(
  jax.checkpoint_policies.save_only_these_names(attn_lib.ATTENTION_NAME, ADAPTED_NAME, LAYER_INPUT_NAME),
  attn_lib.keeps_fused_outputs,
)
# "dots*" keep the attention output and softmax statistics too (named on the XLA and chunked paths,
# by primitive for cuDNN's): otherwise the backward pass reruns the whole attention forward (its
# products have batch dimensions) before its own recompute.
# They also keep an adapted Linear's output (base product + adapter delta): otherwise both
# products are saved and the backward adds them again.
# Every policy keeps the layer's input by name, which the scan would stack anyway: named, the CPU
# kernels stack a 16-bit input as its bits, like the other names (models/cpu.py).
_REMAT_POLICIES = {
  "full": _KEEP_INPUT,
  "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _KEEP_NAMED),
  "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_NAMED
  ),
}
assert set(_REMAT_POLICIES) | {"none"} == set(REMAT_POLICIES)


@jax.jit
def take_layer(stack: jax.Array, i: jax.Array) -> jax.Array:
  """stack[i], with i traced: one compile per shape, not one per layer."""
  return jax.lax.dynamic_index_in_dim(stack, i, keepdims=False)


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  return 0.02 * jax.random.normal(rngs.params(), shape, dtype)


class Linear(nnx.Module):
  """y = einsum(x, kernel) [+ bias]: the one place a weight meets an activation.

  Adapters hook in here (`self.adapter`, a module called with x, this Linear and `product(x)`,
  returning a delta of y's shape, or one that rescales the layer's input or output: IA3), so the
  model code does not change when a PEFT method is applied.
  """

  def __init__(
    self,
    einsum: str,
    kernel_shape: tuple[int, ...],
    kernel_axes: tuple[str, ...],
    *,
    bias_shape: tuple[int, ...] | None = None,
    stack: tuple[int, ...] = (),
    options: ModelOptions,
    quantizable: bool = True,
    rngs: nnx.Rngs,
  ):
    """quantizable: store the kernel as `options.quantize` says (False: the LM head, always 16-bit)."""
    stack_axes = ("layers",) * len(stack)
    self.einsum = einsum
    self.dtype = options.dtype
    self.kernels = options.kernels  # the name: static, hashable
    self.quantizable = quantizable
    kernel = _init(rngs, stack + kernel_shape, options.param_dtype)
    if quantizable and options.quantize != "none":
      self.kernel = quantize_lib.QuantizedKernel(
        kernel,
        stack_axes + kernel_axes,
        kind=options.quantize,
        n_ins=len(einsum_lib.parse(einsum).ins),
        n_stack=len(stack),
        block=options.quant_block,
        double=options.double_quant,
      )
    else:
      self.kernel = nnx.Param(kernel, axes=stack_axes + kernel_axes)
    self.bias = nnx.data(None)
    if bias_shape is not None:
      bias_axes = kernel_axes[-len(bias_shape) :]
      self.bias = nnx.Param(jnp.zeros(stack + bias_shape, options.param_dtype), axes=stack_axes + bias_axes)
    self.adapter = nnx.data(None)  # data, not static: a PEFT transform assigns a module here later

  @property
  def quantized(self) -> bool:
    return isinstance(self.kernel, quantize_lib.QuantizedKernel)

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """[stack..., ins..., outs...], whether the kernel is stored quantised or not."""
    return self.kernel.shape if self.quantized else tuple(self.kernel.shape)

  @property
  def kernel_axes(self) -> tuple[Any, ...] | None:
    return self.kernel.axes if self.quantized else self.kernel.get_metadata().get("axes")

  def weight(self) -> jax.Array:
    """The kernel in the compute dtype, as the product reads it (dequantised when stored quantised)."""
    return self.kernel.value(self.dtype) if self.quantized else self.kernel[...].astype(self.dtype)

  def kernel_value(self, layer: int | None = None) -> jax.Array:
    """The kernel as stored (dequantised in float32 when quantised), of one layer of a stack or whole."""
    if self.quantized:
      arrays = self.kernel.arrays()
      return self.kernel.dequantized(arrays if layer is None else jax.tree.map(lambda x: take_layer(x, layer), arrays))
    return self.kernel[...] if layer is None else take_layer(self.kernel[...], layer)

  def product(self, x: jax.Array) -> jax.Array:
    """x's product with the kernel, without the bias (a quantised kernel dequantised inside it)."""
    kernels = kernels_lib.get(self.kernels)
    if self.quantized:
      return self.kernel.product(lambda x, w: kernels.linear(self.einsum, x, w), x, self.dtype)
    return kernels.linear(self.einsum, x, self.weight())

  def base(self, x: jax.Array) -> jax.Array:
    """The Linear without its adapter: x's product with the kernel, plus the bias."""
    y = self.product(x)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)

  def __call__(self, x: jax.Array, adapter_delta: jax.Array | None = None) -> jax.Array:
    """y for x; adapter_delta: the adapter's output when computed already (`shared_input`).

    An adapter with `rescales` set (IA3) wraps the whole layer instead: `adapter.rescale(x, self)`
    scales the input or the output of `base`."""
    if getattr(self.adapter, "rescales", False):
      return self.adapter.rescale(x, self)
    kernels = kernels_lib.get(self.kernels)
    y = self.product(x)
    if adapter_delta is None and self.adapter is not None:
      adapter_delta = self.adapter(x, self, y)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if adapter_delta is not None:  # named: remat policies save this sum, not its two products
      y = kernels.name(y + adapter_delta.astype(y.dtype), ADAPTED_NAME)
    return y


def shared_input(linears: Sequence[Linear], x: jax.Array) -> list[jax.Array]:
  """[linear(x) for linear in linears]; their adapters share work on the common x when they can
  (an adapter type offering `shared_deltas`, as LoRA does: one product for all the A factors)."""
  adapters = [linear.adapter for linear in linears]
  share = next((ad.shared_deltas for ad in adapters if hasattr(ad, "shared_deltas")), None)
  deltas = (share(adapters, x) if share is not None else None) or [None] * len(linears)
  return [linear(x) if delta is None else linear(x, delta) for linear, delta in zip(linears, deltas)]


class RMSNorm(nnx.Module):
  """RMS norm over the last axis, scaled by (offset + w); computed in float32."""

  def __init__(
    self,
    dim: int,
    *,
    eps: float,
    offset: float,
    axis_name: str,
    stack: tuple[int, ...] = (),
    param_dtype: Any,
    rngs: nnx.Rngs,
  ):
    del rngs
    init = jnp.zeros if offset else jnp.ones
    self.eps, self.offset = eps, offset
    self.scale = nnx.Param(init(stack + (dim,), param_dtype), axes=("layers",) * len(stack) + (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


@dataclasses.dataclass
class LayerInputs:
  """What every layer needs besides its own weights; built once per forward pass."""

  cos_sin_full: tuple[jax.Array, jax.Array]
  cos_sin_sliding: tuple[jax.Array, jax.Array]
  mask_full_BTS: jax.Array
  mask_sliding_BTS: jax.Array
  cache_index: jax.Array | None  # slot of the first new token when decoding with a KV cache
  segment_ids_BT: jax.Array  # for kernels that take segment ids rather than a dense mask
  virtual_BT: jax.Array | None = None  # prefix tuning: the virtual token at each slot, -1 for a real token


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads, optional q/k norms, rope and soft-capping."""

  def __init__(self, cfg: ModelConfig, options: ModelOptions, stack: tuple[int, ...], rngs: nnx.Rngs):
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    common = dict(stack=stack, options=options, rngs=rngs)
    qkv_bias = cfg.qkv_bias
    self.q = Linear(
      "BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), bias_shape=(N, H) if qkv_bias else None, **common
    )
    self.k = Linear(
      "BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), bias_shape=(K, H) if qkv_bias else None, **common
    )
    self.v = Linear(
      "BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), bias_shape=(K, H) if qkv_bias else None, **common
    )
    self.o = Linear(
      "BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), bias_shape=(D,) if cfg.o_bias else None, **common
    )
    self.q_norm = self.k_norm = nnx.data(None)
    if cfg.qk_norm:
      norm = dict(
        eps=cfg.rms_norm_eps,
        offset=cfg.norm_offset,
        axis_name="head_dim",
        stack=stack,
        param_dtype=options.param_dtype,
        rngs=rngs,
      )
      self.q_norm, self.k_norm = RMSNorm(H, **norm), RMSNorm(H, **norm)
    self.scale, self.softcap, self.impl = cfg.scale, cfg.attn_softcap, options.attention_impl
    self.kernels, self.interpret = options.kernels, options.interpret
    self.window = cfg.sliding_window

  def __call__(
    self,
    x_BTD,
    cos_sin,
    mask_BTS,
    kv_cache=None,
    cache_index=None,
    is_sliding=None,
    segment_ids_BT=None,
    prefix=None,
  ):
    """prefix: (virtual token of each slot [B, T], -1 for a real one; this layer's keys and values [2, P, K, H]):
    prefix tuning's keys and values replace those of the virtual slots, as they stand in the cache (after rope)."""
    q, k, v = shared_input((self.q, self.k, self.v), x_BTD)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope_lib.apply_rope(q, *cos_sin), rope_lib.apply_rope(k, *cos_sin)
    if prefix is not None:
      slots, kv_PKH = prefix
      virtual = (slots >= 0)[:, :, None, None]
      pick = lambda x: x[jnp.maximum(slots, 0)].astype(k.dtype)  # [B, T, K, H]
      k, v = jnp.where(virtual, pick(kv_PKH[0]), k), jnp.where(virtual, pick(kv_PKH[1]), v)
    if kv_cache is not None:  # write the new keys/values at their slots, attend over this layer's whole cache
      # kv_cache: this layer's keys and values [B, K, S, H], laid out as the attention reads them: a decoding step
      # writes T new slots in place and moves nothing else (see KVCache).
      k_cache, v_cache = kv_cache
      new_BKTH = lambda x, cache: x.astype(cache.dtype).transpose(0, 2, 1, 3)
      k_cache = jax.lax.dynamic_update_slice(k_cache, new_BKTH(k, k_cache), (0, 0, cache_index, 0))
      v_cache = jax.lax.dynamic_update_slice(v_cache, new_BKTH(v, v_cache), (0, 0, cache_index, 0))
      kv_cache = (k_cache, v_cache)
      # The plain path: splash has no cache form, cuDNN's is not measured.
      kernels = kernels_lib.get(self.kernels)
      out = attn_lib.attend_cache(
        q,
        k_cache.astype(q.dtype),
        v_cache.astype(q.dtype),
        mask_BTS,
        scale=self.scale,
        softcap=self.softcap,
        kernels=kernels,
      )
      return self.o(out), kv_cache
    kernels = kernels_lib.get(self.kernels)
    if self.impl == "splash":
      out = attn_lib.splash_attend(
        q,
        k,
        v,
        segment_ids_BT,
        is_sliding,
        window=self.window,
        scale=self.scale,
        softcap=self.softcap,
        save_inputs=self.q_norm is None,
        kernels=kernels,
        interpret=self.interpret,
      )
    else:  # without a cache every query and key slot is 0..T-1: the mask is causal, blocks above the diagonal skip
      out = attn_lib.attend(
        q,
        k,
        v,
        mask_BTS,
        scale=self.scale,
        softcap=self.softcap,
        impl=self.impl,
        kernels=kernels,
        causal=True,
        save_inputs=self.q_norm is None,
      )
    return self.o(out), kv_cache


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU or GeGLU)."""

  def __init__(self, cfg: ModelConfig, options: ModelOptions, stack: tuple[int, ...], rngs: nnx.Rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    common = dict(stack=stack, options=options, rngs=rngs)
    bias = cfg.mlp_bias
    self.gate = Linear("BTD,DF->BTF", (D, F), ("embed", "mlp"), bias_shape=(F,) if bias else None, **common)
    self.up = Linear("BTD,DF->BTF", (D, F), ("embed", "mlp"), bias_shape=(F,) if bias else None, **common)
    self.down = Linear("BTF,FD->BTD", (F, D), ("mlp", "embed"), bias_shape=(D,) if bias else None, **common)
    self.activation = cfg.activation

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    gate, up = shared_input((self.gate, self.up), x_BTD)
    act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return self.down(act * up)


class Block(nnx.Module):
  """One decoder layer (created stacked: every parameter has a leading [L] axis)."""

  def __init__(self, cfg: ModelConfig, options: ModelOptions, stack: tuple[int, ...], rngs: nnx.Rngs):
    norm = dict(
      eps=cfg.rms_norm_eps,
      offset=cfg.norm_offset,
      axis_name="embed",
      stack=stack,
      param_dtype=options.param_dtype,
      rngs=rngs,
    )
    D = cfg.hidden_size
    self.pre_attn_norm = RMSNorm(D, **norm)
    self.attn = Attention(cfg, options, stack, rngs)
    self.pre_mlp_norm = RMSNorm(D, **norm)
    self.mlp = MLP(cfg, options, stack, rngs)
    self.post_attn_norm = self.post_mlp_norm = nnx.data(None)
    if cfg.sandwich_norms:
      self.post_attn_norm, self.post_mlp_norm = RMSNorm(D, **norm), RMSNorm(D, **norm)

  def __call__(self, x_BTD, is_sliding, inputs: LayerInputs, kv_cache=None, prefix_kv=None):
    # Pick this layer's rope tables and mask; a model without sliding layers shares one of each
    # (no per-layer select, so the mask stays loop-invariant and is not saved once per layer).
    pick = lambda sliding, full: full if sliding is full else jnp.where(is_sliding, sliding, full)
    cos_sin = jax.tree.map(pick, inputs.cos_sin_sliding, inputs.cos_sin_full)
    mask = pick(inputs.mask_sliding_BTS, inputs.mask_full_BTS)
    prefix = None if prefix_kv is None else (inputs.virtual_BT, prefix_kv)
    h, kv_cache = self.attn(
      self.pre_attn_norm(x_BTD), cos_sin, mask, kv_cache, inputs.cache_index, is_sliding, inputs.segment_ids_BT, prefix
    )
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x_BTD = x_BTD + h
    h = self.mlp(self.pre_mlp_norm(x_BTD))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return x_BTD + h, kv_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of each layer (tuples of L arrays [B, K, S, H]), the segment of every slot [B, S] (0 = empty),
  the fill index.

  One array per layer, in the layout the attention reads ([B, K, S, H]: keys of one KV head contiguous), because
  decoding runs the layers as an unrolled loop (`CausalLM.hidden_states`): each layer writes its new slots into
  its own arrays in place and reads them where they are. A cache stacked [L, ...] and read by a scanned loop
  would be sliced out of the stack at every layer of every step, and XLA's CPU backend copies such a slice
  before a product reads it (docs/performance-notes.md, "Generation").
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  segments: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = "float32") -> "KVCache":
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return cls(zeros(), zeros(), jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


class HeadParam(nnx.Param):
  """A task head added to the LM (a reward model's score): trained under every PEFT method, as PEFT's
  modules_to_save trains a sequence classifier's `score`."""


class CausalLM(nnx.Module):
  """Embeddings, a scanned stack of decoder layers, final norm and LM head (and optionally a score head)."""

  def __init__(self, cfg: ModelConfig, options: ModelOptions | None = None, *, rngs: nnx.Rngs):
    """cfg: the architecture (config.json); options: how this run executes it (default: plain, float32)."""
    options = ModelOptions() if options is None else options
    self.config, self.options = cfg, options
    V, D = cfg.vocab_size, cfg.hidden_size
    self.embed = nnx.Param(_init(rngs, (V, D), options.param_dtype), axes=("vocab", "embed"))
    self.layers = Block(cfg, options, (cfg.num_layers,), rngs)
    self.final_norm = RMSNorm(
      D, eps=cfg.rms_norm_eps, offset=cfg.norm_offset, axis_name="embed", param_dtype=options.param_dtype, rngs=rngs
    )
    self.lm_head = nnx.data(None)
    if not cfg.tie_embeddings:
      self.lm_head = Linear("BTD,DV->BTV", (D, V), ("embed", "vocab"), options=options, quantizable=False, rngs=rngs)
    self.score = nnx.data(None)  # HeadParam [D, labels] once `add_score_head` makes this a reward model
    # Prompt or prefix tuning's module (jaxtune/peft/virtual.py), set by its PEFT transform: it fills the virtual
    # slots of input_ids (negative ids, -1 - k for virtual token k) with embeddings or, per layer, keys and values.
    self.virtual = nnx.data(None)

  def add_score_head(
    self, kernel: jax.Array | None = None, *, labels: int = 1, seed: int = 0, std: float = 0.02
  ) -> None:
    """Makes this a sequence scorer (transformers' *ForSequenceClassification `score`, no bias).

    kernel: [D, labels] (HF stores its transpose); default normal(0, std), transformers' init with
    its default initializer_range 0.02.
    """
    D = self.config.hidden_size
    if kernel is None:
      kernel = std * jax.random.normal(jax.random.key(seed), (D, labels), jnp.float32)
    if tuple(kernel.shape) != (D, labels):
      raise ValueError(f"score head kernel must be [{D}, {labels}], got {list(kernel.shape)}.")
    self.score = HeadParam(jnp.asarray(kernel, self.options.param_dtype), axes=("embed", None))

  def scores(self, hidden_BTD: jax.Array) -> jax.Array:
    """The score head at every position, float32 [B, T, labels]."""
    w = self.score[...]
    return jnp.einsum("BTD,DL->BTL", hidden_BTD, w.astype(hidden_BTD.dtype), preferred_element_type=jnp.float32)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    layers: Sequence[nnx.State] | None = None,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Logits [B, T, V]; with a cache, (logits, updated cache).

    attention_mask: HF's 0/1 padding mask [B, T]. segment_ids: packed rows [B, T] (0 = padding);
    positions default to 0..T-1 (from the cache index when decoding). layers: with a cache, each
    layer's weights as `layer_states` gives them (default: taken from the stack here).
    """
    hidden, cache = self.hidden_states(
      input_ids, attention_mask, segment_ids=segment_ids, positions=positions, cache=cache, layers=layers
    )
    logits = self.logits(hidden)
    return logits if cache is None else (logits, cache)

  def logits(self, hidden_BTD: jax.Array) -> jax.Array:
    """LM head (tied or not) and final soft-capping; float32 logits."""
    if self.lm_head is None:
      logits = jnp.einsum(
        "BTD,VD->BTV", hidden_BTD, self.embed[...].astype(hidden_BTD.dtype), preferred_element_type=jnp.float32
      )
    else:
      logits = self.lm_head(hidden_BTD).astype(jnp.float32)
    cap = self.config.final_softcap
    return jnp.tanh(logits / cap) * cap if cap else logits

  def head_weight(self) -> tuple[jax.Array, str] | None:
    """The LM head for fused losses: (embedding [V, D], "VD") if tied, else (kernel [D, V], "DV").

    None when the head is not a plain matrix (an adapter is attached): use `logits` then.
    """
    if self.lm_head is None:
      return self.embed[...], "VD"
    if self.lm_head.adapter is None and self.lm_head.bias is None:
      return self.lm_head.kernel[...], "DV"
    return None

  def layer_states(self) -> list[nnx.State]:
    """Each decoder layer's weights, sliced out of the stacked [L, ...] parameters: what decoding with a cache
    reads (`hidden_states(..., layers=)`). Taken once and reused by every decoding step, the slices are a
    second copy of the decoder weights for as long as they live; generation does that where the kernels ask
    for it (`layers_once`, models/kernels.py)."""
    _, state = nnx.split(self.layers)
    return [jax.tree.map(lambda a, i=i: a[i], state) for i in range(self.config.num_layers)]

  def hidden_states(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None, cache=None, layers=None):
    """Final-norm hidden states [B, T, D] (and the updated cache or None). layers: as in `__call__`."""
    cfg, dtype = self.config, self.options.dtype
    B, T = input_ids.shape
    virtual, prefix_kv = self.virtual, None
    slots = -1 - input_ids  # the virtual token at each slot (>= 0 only at virtual slots)
    x = self._constrain(self.embed[...][jnp.maximum(input_ids, 0)].astype(dtype))
    if cfg.scale_embeddings:
      x = x * jnp.asarray(cfg.hidden_size**0.5, dtype=dtype)
    if virtual is not None:  # after Gemma's scaling, which transformers applies in the embedding, not to inputs_embeds
      x, prefix_kv = virtual(x, slots)
    inputs, cache = self._layer_inputs(B, T, attention_mask, segment_ids, positions, cache)
    if prefix_kv is not None:
      inputs = dataclasses.replace(inputs, virtual_BT=jnp.maximum(slots, -1).astype(jnp.int32))
    if cache is None:
      x = self._run_layers(x, inputs, prefix_kv)
    else:
      x, cache = self._decode_layers(x, inputs, cache, layers, prefix_kv)
      cache = dataclasses.replace(cache, index=cache.index + T)
    return self.final_norm(x), cache

  def _constrain(self, x_BTD: jax.Array) -> jax.Array:
    """Pins [B, T, D] activations to the sharding of ACTIVATION_AXES, when the run sets one."""
    constrain = self.options.constrain
    return x_BTD if constrain is None else constrain(x_BTD, ACTIVATION_AXES)

  def _layer_inputs(self, B, T, attention_mask, segment_ids, positions, cache):
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    if cache is None:
      q_slot = kv_slot = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      kv_seg, index = segment_ids, None
    else:
      index = cache.index
      q_slot = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
      kv_slot = jnp.broadcast_to(jnp.arange(cache.segments.shape[1], dtype=jnp.int32), cache.segments.shape)
      kv_seg = jax.lax.dynamic_update_slice(cache.segments, segment_ids.astype(jnp.int32), (0, index))
      cache = dataclasses.replace(cache, segments=kv_seg)
    if positions is None:
      positions = q_slot
    full = rope_lib.rope_tables(cfg.rope_full, cfg.head_dim, positions)
    sliding = (
      full if cfg.rope_sliding == cfg.rope_full else rope_lib.rope_tables(cfg.rope_sliding, cfg.head_dim, positions)
    )
    mask_full = attn_lib.attention_mask(q_slot, kv_slot, segment_ids, kv_seg)
    mask_sliding = mask_full
    if cfg.sliding_window is not None and any(cfg.sliding_layers):
      mask_sliding = attn_lib.attention_mask(q_slot, kv_slot, segment_ids, kv_seg, cfg.sliding_window)
    return LayerInputs(full, sliding, mask_full, mask_sliding, index, segment_ids), cache

  def _run_layers(self, x, inputs: LayerInputs, prefix_kv: jax.Array | None = None):
    """The layers as one scan over the stacked weights. prefix_kv: prefix tuning's keys and values of every layer
    [L, 2, P, K, H], scanned with the layers."""
    cfg, remat = self.config, self.options.remat
    kernels = kernels_lib.get(self.options.kernels)
    graphdef, state = nnx.split(self.layers)
    sliding = jnp.asarray(cfg.sliding_layers or (False,) * cfg.num_layers)

    def body(x, xs):
      layer_state, is_sliding, prefix = xs
      x = kernels.name(self._constrain(x), LAYER_INPUT_NAME)
      x, _ = nnx.merge(graphdef, layer_state)(x, is_sliding, inputs, None, prefix)
      return x, None

    if remat != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, x, (state, sliding, prefix_kv))[0]

  def _decode_layers(self, x, inputs: LayerInputs, cache: KVCache, layers, prefix_kv):
    """The layers as an unrolled loop, each reading and updating its own cache arrays (see KVCache).

    layers: each layer's weights (`layer_states`); None slices them from the stack here, in this call, slices
    that XLA on TPU and GPU can fuse into the products (not measured there). Remat does not apply: nothing is
    differentiated through a cache."""
    cfg = self.config
    graphdef, _ = nnx.split(self.layers)
    layers = self.layer_states() if layers is None else layers
    sliding = cfg.sliding_layers or (False,) * cfg.num_layers
    ks, vs = [], []
    for i, layer_state in enumerate(layers):
      prefix = None if prefix_kv is None else prefix_kv[i]
      x = self._constrain(x)
      x, (k, v) = nnx.merge(graphdef, layer_state)(x, sliding[i], inputs, (cache.k[i], cache.v[i]), prefix)
      ks.append(k)
      vs.append(v)
    return x, dataclasses.replace(cache, k=tuple(ks), v=tuple(vs))
