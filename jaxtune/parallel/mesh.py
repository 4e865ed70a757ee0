"""The device mesh of a run: axes data / fsdp / tensor, sized from the config, and the logical-axis rules.

Parameters name their dimensions with logical axes ("embed", "heads", ...; see
models/transformer.py); `RULES` maps each logical axis to the mesh axes that split it.
One table serves every preset: an axis of size 1 splits nothing, so the presets differ
only in the mesh shape.

  dp       data=-1                 every chip holds every weight; the batch is split
  fsdp     fsdp=-1                 weights, gradients and optimizer state split 1/N (ZeRO-3)
  fsdp_tp  fsdp=-1, tensor=2       as fsdp, plus heads / MLP / vocab split over `tensor`
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from jaxtune.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
PRESETS = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1), "fsdp_tp": (1, -1, 2)}

# logical axis -> mesh axes (a name, a tuple of names, or None: replicated). Batch rows split over data and
# fsdp (FSDP is data parallel over sharded weights); weights split their model dimension over fsdp and their
# head / MLP / vocab dimension over tensor. A dimension that a mesh axis does not divide stays whole.
RULES = (
  ("batch", ("data", "fsdp")),  # activations and batches [B, ...]
  ("length", None),  # sequence positions
  ("layers", None),  # the stacked-layer axis: every chip runs every layer
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("lora_rank", None),  # adapters shard like the weight they adapt, along its other dimensions
  ("act_embed", None),  # activations' model dimension: whole on each chip (models/options.ACTIVATION_AXES)
)


def mesh_config() -> ml_collections.ConfigDict:
  """Defaults for `config.mesh`: a preset, per-axis overrides, and the rules table."""
  return ml_collections.ConfigDict(
    dict(
      preset="fsdp",  # dp | fsdp | fsdp_tp
      data=0,  # data-parallel axis size; for each axis 0: the preset's value, -1: every device left over
      fsdp=0,  # fully sharded data-parallel axis size (parameters, gradients and optimizer state sharded)
      tensor=0,  # tensor-parallel axis size (heads and hidden units split across devices)
      rules=RULES,  # (logical axis, mesh axes) pairs
    )
  )


def axis_sizes(cfg: Any, num_devices: int) -> dict[str, int]:
  """{data, fsdp, tensor} sizes for `num_devices`, with the one -1 resolved; raises on a mismatch."""
  if cfg.preset not in PRESETS:
    raise ConfigError(f"mesh.preset: unknown {cfg.preset!r}; choose one of {', '.join(PRESETS)}.")
  sizes = {a: int(cfg[a]) or preset for a, preset in zip(AXES, PRESETS[cfg.preset])}
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1 or any(s < -1 or s == 0 for s in sizes.values()):
    raise ConfigError(f"mesh: sizes {sizes}: each must be >= 1, with at most one -1 (the rest of the devices).")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if num_devices % fixed:
      raise ConfigError(
        f"mesh: {num_devices} devices do not split into {sizes} (the fixed axes take {fixed}); "
        "change mesh.data / mesh.fsdp / mesh.tensor."
      )
    sizes[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"mesh: sizes {sizes} use {fixed} devices, but there are {num_devices}; set one axis to -1.")
  return sizes


def make_mesh(cfg: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axes for SPMD propagation.

  jax.make_mesh orders the devices by the physical topology (ICI rings on TPU), so `tensor`, the
  innermost axis, gets the fastest links.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = axis_sizes(cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  try:
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError):  # a device subset make_mesh cannot lay out: keep the given order
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def rules_dict(rules: Any) -> dict[str, tuple[str, ...]]:
  """The rules table as {logical axis: tuple of mesh axes} (empty tuple: replicated)."""
  out = {}
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      mesh_axes = ()
    elif isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    out[logical] = tuple(mesh_axes)
  return out
