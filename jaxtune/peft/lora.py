"""LoRA (and DoRA) as a transform of the parameter tree.

`apply_lora` sets a `LoRA` module into the `adapter` slot of each targeted `Linear`; the
base kernels are not touched. A LoRA module derives its two factors from the Linear's
einsum string: for "BTD,DNH->BTNH" (q) the contracted letters are D and the output
letters N, H, so A is [L, D, r] and B is [L, r, N, H], where L is the layer-stack axis.
Adapters carry the logical axes of the weight they adapt (plus "lora_rank" for r), so
they shard like it. A quantised base (QLoRA, models/quantize.py) is a `QuantizedKernel` in the
Linear's kernel slot; the adapters read the weight's values only as `Linear.weight()` gives them
(dequantised, in the compute dtype: DoRA's norms), merges as `Linear.kernel_value` does.

DoRA (`use_dora`, PEFT's name) adds a magnitude per output row of the weight, m [L, N, H]
for q, initialised to the rows' norms ||W||; the layer computes PEFT's
    y = x W + (m / ||W + s B A|| - 1) x W + (m / ||W + s B A||) s B(A x)
with the norm over each output row's inputs held constant in the backward (DoRA paper, 4.3).

Dropout needs a fresh random mask per layer inside the layer scan: each LoRA module with
dropout holds a `LoRADropoutKey` ([L, key] raw key data, sliced by the scan like any
stacked variable), which the train step overwrites before every micro-batch
(`refresh_dropout_keys`), and a static `deterministic` flag (True by default, so plain
model calls and generation never drop; the train step sets it False).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.hf import mapping
from jaxtune.models import einsum as einsum_lib
from jaxtune.models import kernels as kernels_lib
from jaxtune.models.transformer import ADAPTED_NAME, CausalLM, HeadParam, Linear

# peft.method: train adapters only (LoRA/DoRA, IA3's vectors, prompt tuning's embeddings, prefix tuning's
# key/value prefixes), or every weight.
METHODS = ("lora", "ia3", "prompt", "prefix", "full")
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


class AdapterParam(nnx.Param):
  """A parameter a PEFT method adds: under every method but full fine-tuning, the only trainable leaves
  (with a task head's)."""


class LoRAParam(AdapterParam):
  """A LoRA factor (A or B) or DoRA magnitude."""


class LoRADropoutKey(nnx.Variable):
  """Raw PRNG key data [stack..., key] for adapter dropout; rewritten by the train step."""


def split_trainable(model: nnx.Module, method: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
  """(graphdef, trained leaves, adapter dropout keys, the rest) of `model` under peft.method `method`."""
  if method not in METHODS:
    raise ConfigError(f"peft.method: unknown {method!r}; choose one of {', '.join(METHODS)}.")
  trained = nnx.Param if method == "full" else nnx.Any(AdapterParam, HeadParam)
  return nnx.split(model, trained, LoRADropoutKey, ...)


def base_graphdef(model: nnx.Module) -> nnx.GraphDef:
  """The graph of `model` with every adapter detached: merged with the frozen weights of
  `split_trainable`, it is the base model (the reference of DPO and KTO under LoRA), run
  without the adapters' products and without a second copy of any weight."""
  linears = _linears(model)
  adapters = [linear.adapter for _, linear in linears]
  try:
    for _, linear in linears:
      linear.adapter = None
    return nnx.graphdef(model)
  finally:
    for (_, linear), adapter in zip(linears, adapters):
      linear.adapter = adapter


class LoRA(nnx.Module):
  """delta_y = scale * B(A(dropout(x))), shaped like the adapted Linear's output; DoRA's when use_dora."""

  def __init__(
    self,
    einsum: str,
    kernel_shape: tuple[int, ...],
    kernel_axes: tuple[Any, ...] | None,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    magnitude: jax.Array | None = None,
    dtype: Any,
    param_dtype: Any = jnp.float32,
    kernels: str = "plain",
    rngs: nnx.Rngs,
  ):
    """magnitude: DoRA's initial magnitude per output row, [stack..., out...] (`weight_row_norms`); given,
    the adapter is DoRA's."""
    spec = einsum_lib.parse(einsum)
    ins, outs, batch = spec.ins, spec.outs, spec.batch
    n_stack = len(kernel_shape) - len(spec.w)
    stack, dims = tuple(kernel_shape[:n_stack]), dict(zip(spec.w, kernel_shape[n_stack:]))
    axes = tuple(kernel_axes) if kernel_axes else (None,) * len(kernel_shape)
    stack_axes, letter_axes = axes[:n_stack], dict(zip(spec.w, axes[n_stack:]))
    if not ins or set(spec.y) != set(batch + outs):
      raise ValueError(
        f"LoRA cannot adapt einsum {einsum!r}: it needs x's non-kernel letters plus the kernel's "
        "output letters to make up the output."
      )
    if magnitude is not None and not spec.y.endswith(outs):
      raise ValueError(f"DoRA cannot adapt einsum {einsum!r}: its output must end with the kernel's output letters.")
    r = spec.free_letters(1)
    self.a_einsum = f"{spec.x},{ins}{r}->{batch}{r}"
    self.b_einsum = f"{batch}{r},{r}{outs}->{spec.y}"
    self.spec = spec  # the adapted Linear's parsed einsum: its kernel letters, inputs and outputs
    self.rank, self.alpha, self.dropout, self.use_rslora = rank, float(alpha), float(dropout), use_rslora
    self.use_dora = magnitude is not None
    self.scale = float(alpha) / (math.sqrt(rank) if use_rslora else rank)
    self.dtype, self.kernels = dtype, kernels
    self.deterministic = True
    fan_in = math.prod(dims[c] for c in ins)
    bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A [r, in]
    a_shape = stack + tuple(dims[c] for c in ins) + (rank,)
    self.lora_a = LoRAParam(
      jax.random.uniform(rngs.params(), a_shape, param_dtype, -bound, bound),
      axes=stack_axes + tuple(letter_axes[c] for c in ins) + ("lora_rank",),
    )
    b_shape = stack + (rank,) + tuple(dims[c] for c in outs)
    self.lora_b = LoRAParam(
      jnp.asarray(np.zeros(b_shape, param_dtype)),  # numpy: no compile per shape
      axes=stack_axes + ("lora_rank",) + tuple(letter_axes[c] for c in outs),
    )
    self.lora_magnitude = nnx.data(None)
    if self.use_dora:  # PEFT's lora_magnitude_vector: ||W + s B A|| per output row, B = 0 at init
      self.lora_magnitude = LoRAParam(
        jnp.asarray(magnitude, param_dtype), axes=stack_axes + tuple(letter_axes[c] for c in outs)
      )
    self.dropout_key = nnx.data(None)
    if dropout > 0:
      keys = jax.random.split(rngs.params(), max(math.prod(stack), 1))
      data = jax.random.key_data(keys)
      self.dropout_key = LoRADropoutKey(data.reshape(stack + data.shape[1:]), axes=stack_axes + (None,))

  def __call__(self, x: jax.Array, linear: Linear, y: jax.Array) -> jax.Array:
    """The delta for input x of the adapted `linear`, whose product with x (no bias) is y; only DoRA reads
    the Linear: its `weight()` and, under dropout, its product with the dropped-out x."""
    if self._dropout_active():
      key = jax.random.wrap_key_data(self.dropout_key[...])
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      dropped = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
      # PEFT's DoRA reruns the base product on the dropped-out input for its (m / norm - 1) term.
      y = linear.product(dropped) if self.use_dora else y
      x = dropped
    delta = _deltas([self], x)[0]
    if not self.use_dora:
      return delta
    ratio = self.lora_magnitude[...].astype(jnp.float32) / jax.lax.stop_gradient(self._weight_norms(linear.weight()))
    # The layer's output is ratio * (y + delta); the magnitudes' gradient reads that sum alone. Named, remat's
    # policies keep it instead of both products (one activation-sized array per layer rather than two).
    adapted = kernels_lib.get(self.kernels).name(y + delta.astype(y.dtype), ADAPTED_NAME)
    return ratio.astype(y.dtype) * adapted - y

  def _weight_norms(self, weight: jax.Array) -> jax.Array:
    """||W + s B A|| per output row, float32, without forming B A (nor keeping it for the backward).

    ||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s <B_o, (A^T W)_o> + s^2 B_o^T (A^T A) B_o: the products are
    [r, out] and [r, r], so no weight-sized temporary, and none that remat would save per layer.
    """
    spec, s = self.spec, self.scale
    r, q = spec.free_letters(2)
    w = weight.astype(jnp.float32)
    a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
    product = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
    aw = product(f"{spec.ins}{r},{spec.w}->{r}{spec.outs}", a, w)
    gram = product(f"{spec.ins}{r},{spec.ins}{q}->{r}{q}", a, a)
    bgb = product(f"{r}{spec.outs},{r}{q},{q}{spec.outs}->{spec.outs}", b, gram, b)
    squares = jnp.sum(jnp.square(w), axis=in_axes(spec, w.ndim)) + 2 * s * jnp.sum(b * aw, axis=0) + s * s * bgb
    return jnp.sqrt(squares)

  def _dropout_active(self) -> bool:
    return self.dropout > 0 and not self.deterministic

  @staticmethod
  def shared_deltas(adapters: Sequence[Any], x: jax.Array) -> list[jax.Array | None] | None:
    """Deltas for the adapters that all read x (q/k/v, gate/up), their A factors in one product.

    Entries are None for the adapters left to run on their own: not LoRA, DoRA (its delta needs the
    layer's own weight and product; the weight norm, not the A product, is its cost), dropout active,
    another dtype or kernels. None overall when fewer than two can share (PEFT's default targets, q
    and v only, still share).
    """
    kinds = [
      (ad.a_einsum, jnp.dtype(ad.dtype), ad.kernels)
      if isinstance(ad, LoRA) and not ad.use_dora and not ad._dropout_active()
      else None
      for ad in adapters
    ]
    first = next((k for k in kinds if k is not None), None)
    group = [i for i, k in enumerate(kinds) if k is not None and k == first]
    if len(group) < 2:
      return None
    out = [None] * len(adapters)
    for i, delta in zip(group, _deltas([adapters[i] for i in group], x)):
      out[i] = delta
    return out


def _deltas(adapters: Sequence["LoRA"], x: jax.Array) -> tuple[jax.Array, ...]:
  """scale * B(A x) for adapters sharing x and their A einsum, through the run's kernels."""
  first = adapters[0]
  return kernels_lib.get(first.kernels).lora(
    x,
    first.a_einsum,
    tuple(ad.b_einsum for ad in adapters),
    tuple(ad.lora_a[...].astype(ad.dtype) for ad in adapters),
    tuple(ad.lora_b[...].astype(ad.dtype) for ad in adapters),
    tuple(ad.scale for ad in adapters),
  )


def in_axes(spec: einsum_lib.LinearEinsum, ndim: int) -> tuple[int, ...]:
  """The axes of a kernel array (leading stack axes, then the einsum's kernel letters) that x contracts."""
  n_stack = ndim - len(spec.w)
  return tuple(n_stack + spec.w.index(c) for c in spec.ins)


def row_norms(kernel: Any, axes: tuple[int, ...]) -> Any:
  """The norm of each output row of a weight (over its input axes `axes`): HF's ||W||_row of [out, in]."""
  return jnp.sqrt(jnp.sum(jnp.square(kernel), axis=axes))


@nnx.jit
def weight_row_norms(linear: Linear) -> jax.Array:
  """||W|| per output row of `linear.weight()`, float32 [stack..., out...]: DoRA's initial magnitudes.
  Jitted, so neither a float32 copy nor a whole dequantised kernel is materialised."""
  w = linear.weight()
  return row_norms(w.astype(jnp.float32), in_axes(einsum_lib.parse(linear.einsum), w.ndim))


def dora_rows(merged: Any, magnitude: Any, axes: tuple[int, ...]) -> jax.Array:
  """DoRA merged: each output row of W + s B A (`merged`, input axes `axes`) rescaled to its magnitude,
  m / ||row|| * row, as PEFT merges; float32."""
  merged = jnp.asarray(merged, jnp.float32)
  ratio = jnp.asarray(magnitude, jnp.float32) / row_norms(merged, axes)
  return merged * jnp.expand_dims(ratio, axes)


def merge_kernel(
  kernel: jax.Array, a: jax.Array, b: jax.Array, adapter: LoRA, magnitude: jax.Array | None = None
) -> jax.Array:
  """kernel + scale * A @ B in float32, then DoRA's `dora_rows` with `magnitude` for a DoRA adapter; all
  share their leading stack axes (all layers, one, or none)."""
  linear = adapter.spec
  n_stack = a.ndim - len(linear.ins) - 1
  letters = linear.free_letters(n_stack + 1)  # the stack letters, then r
  stack, r = letters[:-1], letters[-1]
  spec = f"{stack}{linear.ins}{r},{stack}{r}{linear.outs}->{stack}{linear.w}"
  if adapter.use_dora:
    return _fold_dora(kernel, a, b, np.float32(adapter.scale), magnitude, spec=spec, axes=in_axes(linear, kernel.ndim))
  return _fold(kernel, a, b, np.float32(adapter.scale), spec=spec)


@functools.partial(jax.jit, static_argnames="spec")
def _fold(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, spec: str) -> jax.Array:
  delta = jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return kernel.astype(jnp.float32) + scale * delta


@functools.partial(jax.jit, static_argnames=("spec", "axes"))
def _fold_dora(kernel, a, b, scale, magnitude, spec: str, axes: tuple[int, ...]) -> jax.Array:
  return dora_rows(_fold(kernel, a, b, scale, spec=spec), magnitude, axes)


def _linears(model: nnx.Module) -> list[tuple[tuple[str, ...], Linear]]:
  return [(tuple(str(p) for p in path), m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]


def _select(
  model: nnx.Module, targets: str | Sequence[str], key: str = "peft.lora.targets"
) -> list[tuple[tuple[str, ...], Linear]]:
  linears = _linears(model)
  available = sorted({".".join(p) for p, _ in linears})
  hf_names = {hf: ours for ours, hf in mapping.module_names(model.config).items()}  # q_proj -> q, ...
  if isinstance(targets, str) and all(
    t.strip() in hf_names or t.strip() in hf_names.values() for t in targets.split(",")
  ):
    targets = [t.strip() for t in targets.split(",")]  # module names ("q_proj" or "q,v"), not a regex
  if targets == "all-linear":
    chosen = [(p, m) for p, m in linears if p[-1] in ALL_LINEAR]
  elif isinstance(targets, str):
    try:
      pattern = re.compile(targets)
    except re.error as e:
      raise ConfigError(f"{key}: {targets!r} is not a valid regex ({e}).") from None
    chosen = [(p, m) for p, m in linears if pattern.fullmatch(".".join(p))]
  else:
    names = {hf_names.get(t, t) for t in targets}
    present = {p[-1] for p, _ in linears}
    unknown = sorted(n for n in names if n not in present)
    if unknown:
      raise ConfigError(
        f"{key}: {unknown} name no linear layer of this model; use names from "
        f"{sorted(present)} or their HF forms ({', '.join(hf_names)})."
      )
    chosen = [(p, m) for p, m in linears if p[-1] in names]
  if not chosen:
    raise ConfigError(
      f"{key}: {targets!r} matched no linear layer; the model's layers are {available} "
      "(a regex must match a whole dotted path)."
    )
  return chosen


def apply_lora(
  model: CausalLM,
  *,
  rank: int,
  alpha: float,
  dropout: float = 0.0,
  use_rslora: bool = False,
  use_dora: bool = False,
  targets: str | Sequence[str] = "all-linear",
  rngs: nnx.Rngs,
  param_dtype: Any = jnp.float32,
) -> CausalLM:
  """Adds LoRA adapters (A random, B zero, float32) to the targeted Linears, in place; returns the model.

  use_dora: DoRA adapters, each with a magnitude per output row (the weight's row norms at init).

  targets: "all-linear" (q, k, v, o, gate, up, down; not lm_head), module names (a list, or one name or
  several comma-separated; ours: "q", or HF's: "q_proj"), or a regex matched against whole dotted paths
  ("layers.attn.(q|v)").
  """
  if rank < 1:
    raise ConfigError(f"peft.lora.rank must be >= 1, got {rank}.")
  if not 0.0 <= dropout < 1.0:
    raise ConfigError(f"peft.lora.dropout must be in [0, 1), got {dropout}.")
  for path, lin in _select(model, targets):
    if lin.adapter is not None:
      raise ValueError(f"{'.'.join(path)} already has an adapter; apply LoRA once.")
    lin.adapter = LoRA(
      lin.einsum,
      lin.kernel_shape,
      lin.kernel_axes,
      rank=rank,
      alpha=alpha,
      dropout=dropout,
      use_rslora=use_rslora,
      magnitude=weight_row_norms(lin) if use_dora else None,
      dtype=lin.dtype,
      param_dtype=param_dtype,
      kernels=lin.kernels,
      rngs=rngs,
    )
  return model


def adapter_settings(model: nnx.Module) -> dict[str, Any]:
  """The peft.lora settings that rebuild `model`'s adapters (rank, alpha, use_rslora, use_dora, targets as a
  regex over whole dotted paths), e.g. after `load_adapter`, so the run's saved config describes them."""
  adapted = [(path, linear.adapter) for path, linear in _linears(model) if isinstance(linear.adapter, LoRA)]
  if not adapted:
    raise ValueError("the model has no LoRA adapters.")
  setting = lambda a: (a.rank, a.alpha, a.use_rslora, a.use_dora)
  first = adapted[0][1]
  if any(setting(a) != setting(first) for _, a in adapted):
    raise ValueError("the adapters differ in rank, alpha or kind; peft.lora describes one setting for all.")
  paths = sorted(re.escape(".".join(path)) for path, _ in adapted)
  return {
    "rank": first.rank,
    "alpha": first.alpha,
    "use_rslora": first.use_rslora,
    "use_dora": first.use_dora,
    "targets": "|".join(paths),
  }


def refresh_dropout_keys(keys: Any, key: jax.Array) -> Any:
  """New key data for every LoRADropoutKey leaf of `keys` (a pure state), all from one key."""
  leaves, treedef = jax.tree.flatten(keys)
  fresh = []
  for i, leaf in enumerate(leaves):
    n = max(math.prod(leaf.shape[:-1]), 1)
    data = jax.random.key_data(jax.random.split(jax.random.fold_in(key, i), n))
    fresh.append(data.reshape(leaf.shape).astype(leaf.dtype))
  return jax.tree.unflatten(treedef, fresh)


class LoRAWeights(NamedTuple):
  """One adapted Linear: its module path, A [stack..., in..., r], B [stack..., r, out...], the scale, and
  DoRA's magnitude [stack..., out...] (None for LoRA)."""

  path: tuple[str, ...]
  a: jax.Array
  b: jax.Array
  scale: float
  magnitude: jax.Array | None = None


def lora_weights(model: nnx.Module) -> list[LoRAWeights]:
  """The adapters of every adapted Linear, in module order."""
  return [
    LoRAWeights(p, m.adapter.lora_a[...], m.adapter.lora_b[...], m.adapter.scale, _magnitude(m.adapter))
    for p, m in _linears(model)
    if isinstance(m.adapter, LoRA)
  ]


def _magnitude(adapter: LoRA) -> jax.Array | None:
  return adapter.lora_magnitude[...] if adapter.use_dora else None


def merge_lora(model: nnx.Module) -> dict[tuple[str, ...], jax.Array]:
  """The merged kernels in float32 (`merge_kernel`), keyed by kernel path (("layers", "attn", "q", "kernel"), ...)."""
  return {
    p + ("kernel",): merge_kernel(m.kernel_value(), ad.lora_a[...], ad.lora_b[...], ad, _magnitude(ad))
    for p, m in _linears(model)
    if isinstance(ad := m.adapter, LoRA)
  }


def merge_and_unload(model: CausalLM) -> CausalLM:
  """A copy of the model with adapters merged into the kernels (kernel dtype) and removed.

  A quantised kernel that has an adapter becomes a plain one in the compute dtype, merged into its
  dequantised values."""
  merged = merge_lora(model)
  out = nnx.clone(model)
  for p, m in _linears(out):
    if p + ("kernel",) in merged:
      value = merged[p + ("kernel",)]
      if m.quantized:
        m.kernel = nnx.Param(value.astype(m.dtype), axes=m.kernel_axes)
      else:
        m.kernel.set_value(value.astype(m.kernel.dtype))
      m.adapter = nnx.data(None)
  return out


PEFT_PREFIX = "base_model.model."  # PeftModel's path to the wrapped model's modules, as its saved names spell it


class PeftModule(NamedTuple):
  """One adapted Linear, its weight's row of the table, and PEFT's name of its module in each layer."""

  path: tuple[str, ...]
  adapter: LoRA
  tmap: mapping.TensorMap
  names: list[str]  # "base_model.model.model.layers.{i}.self_attn.q_proj", one per layer when stacked


def peft_modules(model: CausalLM) -> list[PeftModule]:
  """Every adapted Linear with its PEFT module names (no values read: works on an abstract model)."""
  hf_module = {m.path[:-1]: m for m in mapping.tensor_maps(model.config) if m.path[-1] == "kernel"}
  out = []
  for p, linear in _linears(model):
    if not isinstance(linear.adapter, LoRA):
      continue
    tmap = hf_module.get(p)
    if tmap is None:
      raise ValueError(f"no Hugging Face name is known for adapted layer {'.'.join(p)}.")
    names = [PEFT_PREFIX + name.removesuffix(".weight") for name in tmap.hf_names(model.config.num_layers)]
    out.append(PeftModule(p, linear.adapter, tmap, names))
  return out


MAGNITUDE = ".lora_magnitude_vector"  # DoRA's tensor: PEFT saves it without a ".weight" suffix


def peft_state_dict(model: CausalLM) -> dict[str, np.ndarray]:
  """Adapters as PEFT saves them: `base_model.model.<hf module>.lora_{A,B}.weight`, [r, in] and [out, r], and
  for DoRA `<hf module>.lora_magnitude_vector` [out]."""
  out = {}
  for module in peft_modules(model):
    adapter, tmap = module.adapter, module.tmap
    a, b = np.asarray(adapter.lora_a[...], np.float32), np.asarray(adapter.lora_b[...], np.float32)
    m = np.asarray(adapter.lora_magnitude[...], np.float32) if adapter.use_dora else None
    for i, name in enumerate(module.names):
      layer = (lambda x: x[i]) if tmap.stacked else (lambda x: x)
      a_hf, b_hf = tmap.lora_to_hf(layer(a), layer(b), adapter.spec.w)
      out[name + ".lora_A.weight"] = np.ascontiguousarray(a_hf)
      out[name + ".lora_B.weight"] = np.ascontiguousarray(b_hf)
      if m is not None:
        out[name + MAGNITUDE] = np.ascontiguousarray(tmap.rows_to_hf(layer(m), adapter.spec.w))
  return out


def peft_config(model: CausalLM, base_model_name_or_path: str = "") -> dict[str, Any]:
  """The `adapter_config.json` fields that match `peft_state_dict(model)`."""
  adapters = [(p, m.adapter) for p, m in _linears(model) if isinstance(m.adapter, LoRA)]
  if not adapters:
    raise ValueError("the model has no LoRA adapters; call apply_lora first.")
  first = adapters[0][1]
  to_hf = mapping.module_names(model.config)
  return {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "r": first.rank,
    "lora_alpha": first.alpha,
    "lora_dropout": first.dropout,
    "use_rslora": first.use_rslora,
    "target_modules": sorted({to_hf[p[-1]] for p, _ in adapters}),
    "bias": "none",
    "use_dora": first.use_dora,
    "modules_to_save": None,
    "fan_in_fan_out": False,
    "init_lora_weights": True,
  }
