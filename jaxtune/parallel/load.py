"""Hugging Face checkpoint -> a sharded jaxtune model, each process reading only the slices its devices hold.

`jax.make_array_from_callback` asks for the block of our layout that each addressable device
holds; `_hf_block` turns that block into the matching slice of the HF tensor (HF keeps linear
weights [out, in] with heads flattened; we keep [D, N, H] etc., see hf/mapping.py), reads just
that slice through the safetensors memory map, and lays it out like ours. Stacked layer
parameters are built one layer at a time on the devices, so the host stages at most this
process's share of one layer's tensor at once, never the model.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtune.hf import mapping
from jaxtune.hf.load import resolve
from jaxtune.hf.safetensors_io import Checkpoint, CheckpointError
from jaxtune.models.config import ModelConfig, load_config
from jaxtune.models.options import ModelOptions
from jaxtune.models.transformer import CausalLM
from jaxtune.parallel.sharding import spec

Block = tuple[slice, ...]


def _norm(index: Block, shape: tuple[int, ...]) -> Block:
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _heads_rows(s: slice, head_dim: int) -> slice:
  return slice(s.start * head_dim, s.stop * head_dim)


def _layout(path: tuple[str, ...], cfg: ModelConfig) -> str:
  """How our per-layer array relates to the HF tensor: identity | transpose | heads_in | heads_bias | o_proj."""
  *_, module, leaf = ("",) + path
  if module in ("q", "k", "v"):
    return "heads_in" if leaf == "kernel" else "heads_bias"
  if module == "o" and leaf == "kernel":
    return "o_proj"
  if leaf == "kernel" and module in ("gate", "up", "down", "lm_head"):
    return "transpose"
  return "identity"


def _hf_block(layout: str, ours: Block, head_dim: int) -> tuple[Block, Callable[[np.ndarray], np.ndarray]]:
  """(the HF slice to read, how to turn what it reads into our block) for one block of our layout."""
  H = head_dim
  if layout == "identity":
    return ours, lambda x: x
  if layout == "transpose":  # ours [in, out]
    return ours[::-1], lambda x: x.T
  if layout == "heads_in":  # ours [D, n, H] <- HF [n*H, D]; read whole heads, then cut head_dim
    d, n, h = ours
    return (_heads_rows(n, H), d), lambda x: x.reshape(n.stop - n.start, H, -1).transpose(2, 0, 1)[:, :, h]
  if layout == "heads_bias":  # ours [n, H] <- HF [n*H]
    n, h = ours
    return (_heads_rows(n, H),), lambda x: x.reshape(n.stop - n.start, H)[:, h]
  if layout == "o_proj":  # ours [N, H, D] <- HF [D, N*H]
    n, h, d = ours
    return (d, _heads_rows(n, H)), lambda x: x.reshape(x.shape[0], n.stop - n.start, H).transpose(1, 2, 0)[:, h]
  raise ValueError(f"unknown layout {layout!r}")


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if layout == "transpose":
    return shape[::-1]
  if layout == "heads_in":
    return (shape[1] * shape[2], shape[0])
  if layout == "heads_bias":
    return (shape[0] * shape[1],)
  if layout == "o_proj":
    return (shape[2], shape[0] * shape[1])
  return shape


class _Reader:
  """Reads blocks of one HF tensor in our layout; counts what it stages on the host."""

  def __init__(self, ckpt: Checkpoint, layout: str, head_dim: int, dtype: np.dtype, stats: dict):
    self.ckpt, self.layout, self.head_dim, self.dtype, self.stats = ckpt, layout, head_dim, dtype, stats

  def check(self, name: str, path: tuple[str, ...], shape: tuple[int, ...]) -> None:
    if name not in self.ckpt:
      raise CheckpointError(f"{self.ckpt.directory}: tensor {name!r} is missing (needed for {'.'.join(path)}); "
                            "the checkpoint does not match its config.json.")
    expected, got = _hf_shape(self.layout, shape), self.ckpt.file_of(name).shape(name)
    if tuple(got) != expected:
      raise CheckpointError(f"{self.ckpt.file_of(name).path}: tensor {name!r} has shape {tuple(got)}, but "
                            f"config.json implies {expected}; the checkpoint does not match its config.json.")

  def block(self, name: str, index: Block, shape: tuple[int, ...]) -> np.ndarray:
    hf_index, to_ours = _hf_block(self.layout, _norm(index, shape), self.head_dim)
    out = np.ascontiguousarray(to_ours(self.ckpt.file_of(name).get_slice(name, hf_index)), dtype=self.dtype)
    self.stats["read_bytes"] = self.stats.get("read_bytes", 0) + out.nbytes
    return out

  def array(self, name: str, shape: tuple[int, ...], sharding: NamedSharding) -> jax.Array:
    staged: dict[tuple, np.ndarray] = {}  # replicas of one block (data / tensor axes) are read once

    def callback(index):
      key = tuple((s.start, s.stop) for s in _norm(index, shape))
      if key not in staged:
        staged[key] = self.block(name, index, shape)
      return staged[key]

    out = jax.make_array_from_callback(shape, sharding, callback)
    held = sum(x.nbytes for x in staged.values())  # every block of this call is alive until the transfer
    self.stats["peak_staged_bytes"] = max(self.stats.get("peak_staged_bytes", 0), held)
    return out


@functools.lru_cache(maxsize=None)
def _setter(sharding: NamedSharding) -> Callable:
  @functools.partial(jax.jit, donate_argnums=0, out_shardings=sharding)
  def set_layer(stack, layer, i):
    return stack.at[i].set(layer)
  return set_layer


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.Array:
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def load_params_sharded(ckpt: Checkpoint, cfg: ModelConfig, abstract_state: nnx.State, mesh: jax.sharding.Mesh,
                        rules: Any, stats: dict | None = None) -> nnx.State:
  """Fills an abstract (eval_shape) state with global arrays sharded by the rules, reading slices only."""
  stats = {} if stats is None else stats
  by_path = {m.path: m for m in mapping.tensor_maps(cfg)}
  flat = []
  for path, var in nnx.to_flat_state(abstract_state):
    path = tuple(str(p) for p in path)
    tmap = by_path.get(path)
    if tmap is None:
      raise CheckpointError(f"no Hugging Face tensor is known for parameter {'.'.join(path)}.")
    shape, dtype = tuple(var.shape), np.dtype(var.dtype)
    pspec = spec(var.get_metadata().get("axes"), shape, mesh, rules)
    sharding = NamedSharding(mesh, pspec)
    reader = _Reader(ckpt, _layout(path, cfg), cfg.head_dim, dtype, stats)
    if not tmap.stacked:
      reader.check(tmap.hf_name, path, shape)
      value = reader.array(tmap.hf_name, shape, sharding)
    else:
      names = tmap.hf_names(cfg.num_layers)
      for name in names:
        reader.check(name, path, shape[1:])
      layer_spec = tuple(pspec) + (None,) * (len(shape) - len(pspec))
      if layer_spec[0] is None:  # layers whole on every device: build the stack one layer at a time
        layer_sharding, set_layer = NamedSharding(mesh, P(*layer_spec[1:])), _setter(sharding)
        value = _zeros(shape, dtype, sharding)
        for i, name in enumerate(names):
          value = set_layer(value, reader.array(name, shape[1:], layer_sharding), i)
      else:  # the layer axis itself is split: each device reads its own layers
        def stacked(index, names=names, reader=reader):
          index = _norm(index, shape)
          return np.stack([reader.block(names[i], index[1:], shape[1:]) for i in range(*index[0].indices(len(names)))])
        value = jax.make_array_from_callback(shape, sharding, stacked)
    flat.append((path, var.replace(value)))
  return nnx.from_flat_state(flat)


def load_model_sharded(path_or_hub_id: str | pathlib.Path, mesh: jax.sharding.Mesh, rules: Any,
                       options: ModelOptions | None = None, stats: dict | None = None) -> CausalLM:
  """An HF checkpoint as a CausalLM whose parameters are global arrays sharded over `mesh` by `rules`.

  Every process calls this; each reads only the tensor slices its own devices hold. `stats`, when
  given, receives read_bytes and peak_staged_bytes (host bytes of one transfer, the most at once).
  """
  directory = resolve(path_or_hub_id)
  cfg = load_config(directory)
  abstract = nnx.eval_shape(lambda: CausalLM(cfg, options, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  return nnx.merge(graphdef, load_params_sharded(Checkpoint(directory), cfg, abstract_state, mesh, rules, stats))
