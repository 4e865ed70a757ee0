"""A frozen base in 4 or 8 bits: NF4 and int8 as bitsandbytes computes them, dequantised inside the step.

`model.quantize` (`ModelOptions.quantize`) stores every decoder-layer Linear's kernel as a
`QuantizedKernel`; embeddings, norms and the LM head stay 16-bit. The product dequantises one
layer's kernel in the compute dtype, inside a `jax.checkpoint` that saves nothing, so the backward
recomputes the 16-bit kernel instead of keeping every layer's copy as a residual.

Numerics (bitsandbytes 0.50, `functional.quantize_4bit`, `int8_vectorwise_quant`):
- nf4: blocks of `block` consecutive weights of the flat HF [out, in] tensor, each scaled by its
  absolute maximum (float32) and rounded to the nearest of the 16 NF4 values (ties to the lower one);
  two codes per byte, the first in the high nibble. Double quantisation (`double_quant`) subtracts
  the mean of the tensor's absmax values and stores them 8-bit with bitsandbytes' signed dynamic
  code, in blocks of 256 of the same flat order, each with a float32 absmax.
- int8: one float32 absmax per output row; code = round(w * 127 / absmax), half to even. This is
  bitsandbytes' vector-wise quantisation, not LLM.int8()'s outlier decomposition (no column is kept
  in 16 bits).

Layout: a kernel is [ins..., outs...] (models/einsum.py); HF's [out, in] is its transpose with the
input letters flattened. A block therefore runs along the innermost input axis (embed for q, k, v,
gate and up; head_dim for o; mlp for down), and `block` must divide that axis. NF4 codes keep the
kernel's axes with the innermost input axis halved (two codes per byte); the absmax values keep them
with that axis divided by the block. So a mesh may split any axis of the kernel as long as each
shard of the innermost input axis holds whole blocks (`check_shards`): the dequantisation then runs
on each shard alone.

Built on our own variables rather than qwix: qwix has NF4 but no double quantisation, and it
intercepts products by module path; here the kernel is one Variable type inside `Linear`, so remat,
the layer scan, adapters-only checkpoints and resume see an ordinary frozen leaf.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ConfigError

KINDS = ("none", "nf4", "int8")
BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' NF4 block sizes
DOUBLE_BLOCK = 256  # double quantisation: absmax values per 8-bit block

NF4 = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)
INT8_INVERSE = np.float32(7.874015718698502e-3)  # bitsandbytes' 1/127 for int8 dequantisation


# bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map()`), the code of double quantisation:
# 256 sorted float32 values as torch computes them (its float32 linspace rounds unlike numpy's, and
# one value off would change codes, so the values are listed rather than recomputed).
# fmt: off
DYNAMIC = np.array(
  [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375, -0.107031256,
    -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125, -0.059218753, -0.05640625,
    -0.05359375, -0.05078125, -0.04796875, -0.04515625, -0.042343747, -0.03953125, -0.036718752, -0.03390625,
    -0.03109375, -0.028281251, -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125,
    -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004,
    -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06, -5.5000004e-07, 0,
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125,
    0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,
    0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625,
    0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125,
    0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125,
    0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,
    0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125,
    0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1,
  ],
  np.float32,
)
# fmt: on


class QuantCodes(nnx.Variable):
  """The codes of a quantised kernel (uint8 pairs of NF4 codes, or int8); frozen."""


class QuantScale(nnx.Variable):
  """A quantised kernel's scales (absmax values, or their 8-bit codes and statistics); frozen."""


def _nearest(x: jax.Array, code: np.ndarray) -> jax.Array:
  """Index of the nearest value of the sorted `code` for each x; a tie goes to the lower index."""
  bounds = jnp.asarray((code[:-1] + code[1:]) / np.float32(2))
  return jnp.searchsorted(bounds, x, side="left").astype(jnp.uint8)


def _dynamic_table() -> np.ndarray:
  """bitsandbytes' CPU rounding to the dynamic code: the nearest code of each of 65536 evenly spaced
  values in [-1, 1] (uint8). Its CUDA kernel searches the code instead; the two differ only for
  values within 1/65535 of a midpoint between two codes."""
  bins = np.float32(-1.0) + (np.float32(2.0) * np.arange(65536, dtype=np.float32)) / np.float32(65535)
  return np.searchsorted((DYNAMIC[:-1] + DYNAMIC[1:]) * np.float32(0.5), bins, side="left").astype(np.uint8)


DYNAMIC_TABLE = _dynamic_table()


def _dynamic_codes(scaled: jax.Array) -> jax.Array:
  """Codes of values in [-1, 1] as bitsandbytes' CPU quantiser rounds them (`DYNAMIC_TABLE`)."""
  index = ((scaled + jnp.float32(1.0)) * jnp.float32(0.5) * jnp.float32(65535) + jnp.float32(0.5)).astype(jnp.uint16)
  return jnp.asarray(DYNAMIC_TABLE)[index]


def _scaled(blocks: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """(blocks / their absmax along `axis`, clipped to [-1, 1]; the absmax), as bitsandbytes rounds them."""
  absmax = jnp.max(jnp.abs(blocks), axis=axis)
  inverse = jnp.float32(1.0) / jnp.maximum(absmax, jnp.float32(1e-38))
  return jnp.clip(blocks * jnp.expand_dims(inverse, axis), -1.0, 1.0), absmax


def _hf_order(x: jax.Array, n_ins: int) -> jax.Array:
  """[ins..., outs...] -> flat in HF's [out, in] order."""
  ins = math.prod(x.shape[:n_ins])
  return x.reshape(ins, -1).T.reshape(-1)


def _our_order(flat: jax.Array, shape: tuple[int, ...], n_ins: int) -> jax.Array:
  """Inverse of `_hf_order` for an array of `shape`."""
  ins = math.prod(shape[:n_ins])
  return flat.reshape(-1, ins).T.reshape(shape)


def _group_of(shape: tuple[int, ...], n_ins: int) -> jax.Array:
  """For absmax values laid out as `shape` ([in blocks..., outs...]), the 256-block of HF's flat order each is in."""
  return _our_order(jnp.arange(math.prod(shape), dtype=jnp.int32), shape, n_ins) // DOUBLE_BLOCK


def quantize_layer(
  w: jax.Array, *, kind: str, n_ins: int, block: int = 64, double: bool = False, offset: jax.Array | None = None
) -> dict:
  """One layer's kernel [ins..., outs...] -> the arrays of its QuantizedKernel (see the module docstring).

  offset: the mean subtracted before double quantisation (default: the float32 mean of the absmax
  values; bitsandbytes takes torch's, whose summation order depends on the CPU's vector width, so
  the two can differ in the last bit).
  """
  w = w.astype(jnp.float32)
  k = n_ins - 1  # the innermost input axis
  if kind == "int8":
    absmax = jnp.max(jnp.abs(w), axis=tuple(range(n_ins)))
    codes = jnp.round(w * (jnp.float32(127.0) / absmax)).astype(jnp.int8)
    return {"codes": jnp.where(absmax == 0, jnp.int8(0), codes), "absmax": absmax}
  if kind != "nf4":
    raise ValueError(f"quantisation {kind!r} is unknown; choose one of {', '.join(KINDS[1:])}.")
  n = w.shape[k]
  blocks = w.reshape(w.shape[:k] + (n // block, block) + w.shape[k + 1 :])
  scaled, absmax = _scaled(blocks, k + 1)
  codes = _nearest(scaled, NF4).reshape(w.shape[:k] + (n // 2, 2) + w.shape[k + 1 :])
  pairs = jnp.moveaxis(codes, k + 1, 0)
  out = {"codes": (pairs[0] << 4) | pairs[1]}
  if not double:
    return out | {"absmax": absmax}
  flat = _hf_order(absmax, n_ins)
  offset = jnp.mean(flat) if offset is None else jnp.asarray(offset, jnp.float32)
  padded = jnp.pad(flat - offset, (0, -flat.size % DOUBLE_BLOCK))
  scaled2, absmax2 = _scaled(padded.reshape(-1, DOUBLE_BLOCK), 1)
  codes2 = jnp.where(jnp.repeat(absmax2 == 0, DOUBLE_BLOCK), jnp.uint8(0), _dynamic_codes(scaled2.reshape(-1)))
  absmax_codes = _our_order(codes2[: flat.size], absmax.shape, n_ins)
  return out | {"absmax": absmax_codes, "absmax2": absmax2, "offset": offset}


def _lookup(codes: jax.Array, table: np.ndarray) -> jax.Array:
  """table[codes] as an elementwise select, which XLA fuses with the scaling (a gather it would not)."""
  return jax.lax.select_n(codes, *(jnp.full(codes.shape, v, jnp.float32) for v in table))


def dequantize_layer(arrays: dict, *, kind: str, n_ins: int, block: int = 64) -> jax.Array:
  """One layer's kernel in float32 from its QuantizedKernel arrays."""
  codes, absmax = arrays["codes"], arrays["absmax"]
  if kind == "int8":
    return codes.astype(jnp.float32) * absmax * INT8_INVERSE
  k = n_ins - 1
  if "absmax2" in arrays:  # double quantisation: absmax = dynamic[code] * absmax2[its 256-block] + offset
    groups = _group_of(absmax.shape, n_ins)
    absmax = jnp.asarray(DYNAMIC)[absmax] * arrays["absmax2"][groups] + arrays["offset"]
  nibbles = jnp.stack([codes >> 4, codes & 15], axis=k + 1)
  shape = codes.shape[:k] + (codes.shape[k] * 2,) + codes.shape[k + 1 :]
  values = _lookup(nibbles.reshape(shape), NF4)
  blocks = values.reshape(shape[:k] + (shape[k] // block, block) + shape[k + 1 :])
  return (blocks * jnp.expand_dims(absmax, k + 1)).reshape(shape)


def _per_layer(fn: Callable, n_stack: int) -> Callable:
  for _ in range(n_stack):
    fn = jax.vmap(fn)
  return fn


@functools.partial(jax.jit, static_argnames=("kind", "n_ins", "block", "double", "n_stack"))
def quantize(w: jax.Array, *, kind: str, n_ins: int, block: int, double: bool, n_stack: int) -> dict:
  """`quantize_layer` over the leading `n_stack` axes of w."""
  return _per_layer(functools.partial(quantize_layer, kind=kind, n_ins=n_ins, block=block, double=double), n_stack)(w)


def dequantize(arrays: dict, *, kind: str, n_ins: int, block: int, n_stack: int) -> jax.Array:
  """`dequantize_layer` over the leading `n_stack` axes of the arrays."""
  return _per_layer(functools.partial(dequantize_layer, kind=kind, n_ins=n_ins, block=block), n_stack)(arrays)


class QuantizedKernel(nnx.Module):
  """A Linear's frozen kernel [stack..., ins..., outs...] stored quantised; reads back as float32."""

  def __init__(
    self,
    kernel: jax.Array,
    axes: tuple[Any, ...],
    *,
    kind: str,
    n_ins: int,
    n_stack: int,
    block: int = 64,
    double: bool = False,
  ):
    layer = tuple(kernel.shape[n_stack:])
    if kind == "nf4":
      problem = block_problem(layer, n_ins, block)
      if problem:
        raise ConfigError(f"model.quantize_block: {problem}.")
    self.kind, self.n_ins, self.n_stack, self.block = kind, n_ins, n_stack, block
    self.double = bool(double and kind == "nf4")
    self.shape, self.axes = tuple(kernel.shape), tuple(axes)
    arrays = quantize(kernel, kind=kind, n_ins=n_ins, block=block, double=self.double, n_stack=n_stack)
    for name, (value, value_axes) in self._with_axes(arrays).items():
      var = QuantCodes if name == "codes" else QuantScale
      setattr(self, name, var(value, axes=value_axes))

  def _with_axes(self, arrays: dict) -> dict:
    """{name: (array, logical axes)}: codes and absmax keep the kernel's axes; the rest the stack's."""
    stack = self.axes[: self.n_stack]
    outs = self.axes[self.n_stack + self.n_ins :]
    axes = {
      "codes": self.axes,
      "absmax": stack + outs if self.kind == "int8" else self.axes,
      "absmax2": (None,),
      "offset": (),
    }
    return {
      name: (value, stack + axes[name] if name in ("absmax2", "offset") else axes[name])
      for name, value in arrays.items()
    }

  def arrays(self) -> dict:
    names = ("codes", "absmax", "absmax2", "offset")
    return {name: getattr(self, name)[...] for name in names if hasattr(self, name)}

  def dequantized(self, arrays: dict) -> jax.Array:
    """float32 kernel from its `arrays` (`arrays()`, or a slice of them) holding any number of the stack axes
    (none inside the layer scan, or for one layer of a stacked kernel)."""
    n_stack = arrays["codes"].ndim - (len(self.shape) - self.n_stack)
    return dequantize(arrays, kind=self.kind, n_ins=self.n_ins, block=self.block, n_stack=n_stack)

  def value(self, dtype: Any = jnp.float32) -> jax.Array:
    """The dequantised kernel in `dtype`."""
    return self.dequantized(self.arrays()).astype(dtype)

  def product(self, matmul: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, dtype: Any) -> jax.Array:
    """matmul(x, kernel in `dtype`); the backward dequantises again instead of keeping the kernel."""
    run = lambda x, arrays: matmul(x, self.dequantized(arrays).astype(dtype))
    return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(x, self.arrays())


def block_problem(layer_shape: tuple[int, ...], n_ins: int, block: int) -> str | None:
  """Why NF4 blocks of `block` do not fit a kernel of `layer_shape` ([ins..., outs...]), or None."""
  if block not in BLOCKS:
    return f"{block} is not a bitsandbytes block size; choose one of {', '.join(map(str, BLOCKS))}"
  n = layer_shape[n_ins - 1]
  if n % block:
    return f"{block} does not divide the innermost input dimension ({n}) of a {list(layer_shape)} kernel"
  return None


def check_blocks(kernels: dict[str, tuple[tuple[int, ...], int, Any]], block: int) -> None:
  """ConfigError naming the first tensor whose NF4 blocks of `block` would not fit, and the blocks that fit all.

  kernels: {HF tensor name: (one layer's kernel shape [ins..., outs...], number of input axes, innermost
  input axis name)}."""
  innermost = {name: (shape[n_ins - 1], axis) for name, (shape, n_ins, axis) in kernels.items()}
  fits = [b for b in BLOCKS if all(n % b == 0 for n, _ in innermost.values())]
  fix = f"use a block that fits every weight ({', '.join(map(str, fits))})" if fits else "use model.quantize=int8"
  for name, (n, axis) in innermost.items():
    if n % block:
      raise ConfigError(
        f"model.quantize_block: {block} does not divide {name}'s innermost input axis ({axis}, {n}), "
        f"along which NF4 blocks run; {fix}."
      )


def shard_problem(kernel: QuantizedKernel, codes_sharding: jax.sharding.Sharding) -> str | None:
  """Why `codes_sharding` would split an NF4 block across devices, or None.

  Blocks run along the kernel's innermost input axis, so each shard of that axis must hold whole
  blocks; every other axis may be split freely (int8 has no blocks along the inputs)."""
  if kernel.kind != "nf4":
    return None
  k = kernel.n_stack + kernel.n_ins - 1
  n = kernel.shape[k]
  codes_shape = kernel.shape[:k] + (n // 2,) + kernel.shape[k + 1 :]
  shards = codes_shape[k] // codes_sharding.shard_shape(codes_shape)[k]
  if (n // shards) % kernel.block == 0:
    return None
  return (
    f"the mesh splits its innermost input axis ({kernel.axes[k]}, {n}) into {shards} shards of {n // shards}, "
    f"which do not hold whole NF4 blocks of model.quantize_block={kernel.block}; use a block that divides "
    f"{n // shards}, fewer devices on the mesh axis that {kernel.axes[k]} maps to, or a mesh.rules entry "
    f"that leaves {kernel.axes[k]} whole"
  )


def weight_count(model: nnx.Module) -> int:
  """The model's parameters, each quantised kernel counted as the weights it stores (not its bytes)."""
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return params + sum(math.prod(m.shape) for _, m in nnx.iter_modules(model) if isinstance(m, QuantizedKernel))
