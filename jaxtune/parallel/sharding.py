"""Shardings from the rules: parameters, LoRA adapters, optimizer state, batches; activation constraints.

Every nnx Variable of the model names its dimensions in its `axes` metadata; `spec` turns
those names into a PartitionSpec through the rules table (mesh.RULES). The shardings come out
as the same pure nested dicts as `train.step.init_train_state` produces, so they go straight
into `make_train_step(..., shardings=train_shardings(...).step_args)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune.errors import ConfigError
from jaxtune.parallel.mesh import rules_dict
from jaxtune.peft.lora import split_trainable
from jaxtune.train.step import Frozen, TrainState


def spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: jax.sharding.Mesh, rules: Any) -> P:
  """The PartitionSpec of an array with logical `axes`: each dimension split over its rule's mesh axes.

  Mesh axes that do not divide the dimension are dropped (from the end) and a mesh axis is used
  at most once per array, so every spec is valid for every model: a rule is a preference.
  """
  if axes is None:
    return P()
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}.")
  table, used, out = rules_dict(rules), set(), []
  for name, dim in zip(axes, shape):
    if name is not None and name not in table:
      raise ConfigError(f"mesh.rules: no rule for logical axis {name!r}; add ({name!r}, mesh axes or None).")
    mesh_axes = [a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1]
    while mesh_axes and dim % int(np.prod([mesh.shape[a] for a in mesh_axes])):
      mesh_axes.pop()
    used.update(mesh_axes)
    out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
  return P(*out)


def _axes(var: nnx.Variable) -> tuple | None:
  return var.get_metadata().get("axes")


def variable_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Any) -> dict:
  """Pure nested dict (as nnx.to_pure_dict) of the NamedSharding of every Variable in `state`."""
  flat = [
    (path, NamedSharding(mesh, spec(_axes(var), var.shape, mesh, rules))) for path, var in nnx.to_flat_state(state)
  ]
  return nnx.to_pure_dict(nnx.from_flat_state(flat))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def optimizer_shardings(
  optimizer: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: jax.sharding.Mesh
) -> Any:
  """Shardings of optimizer.init(params): leaves shaped like their parameter shard like it; others replicate.

  `params` may be abstract (ShapeDtypeStructs). Factored statistics (Adafactor's row / column
  moments) have other shapes than their parameter and are small: they are replicated.
  """
  abstract = jax.eval_shape(optimizer.init, params)
  rep = replicated(mesh)

  def like_param(leaf, param, sharding):
    return sharding if getattr(leaf, "shape", None) == tuple(param.shape) else rep

  return optax.tree_map_params(
    optimizer, like_param, abstract, params, param_shardings, transform_non_params=lambda _: rep
  )


def batch_sharding(mesh: jax.sharding.Mesh, rules: Any, accumulated: bool = True) -> NamedSharding:
  """[A, B, T] (or [B, T]) int batches: rows split over the rule of "batch", micro-batch and time axes whole."""
  rows = rules_dict(rules).get("batch", ())
  rows = tuple(a for a in rows if mesh.shape[a] > 1) or None
  return NamedSharding(mesh, P(None, rows, None) if accumulated else P(rows, None))


@dataclasses.dataclass(frozen=True)
class TrainShardings:
  """Where each part of the training state lives on the mesh."""

  state: TrainState  # a TrainState of NamedShardings
  frozen: Frozen
  batch: NamedSharding

  @property
  def step_args(self) -> tuple[Any, Any, Any]:
    """(state, frozen, batch): the `shardings` argument of make_train_step / make_eval_step (use .params)."""
    return (self.state, self.frozen, self.batch)


def train_shardings(
  model: nnx.Module,
  optimizer: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  rules: Any,
  *,
  method: str = "lora",
  loss_scale: Any = None,
) -> TrainShardings:
  """Shardings of (TrainState, Frozen, batch) for `model` (concrete or nnx.eval_shape'd), split as the step splits
  it. loss_scale: the state's LossScale (float16 runs), replicated like the other scalars."""
  _, params, keys, rest = split_trainable(model, method)
  param_sh = variable_shardings(params, mesh, rules)
  abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(params))
  rep = replicated(mesh)
  state = TrainState(
    params=param_sh,
    opt_state=optimizer_shardings(optimizer, abstract_params, param_sh, mesh),
    step=rep,
    rng=rep,
    nonfinite_streak=rep,
    skipped=rep,
    loss_scale=jax.tree.map(lambda _: rep, loss_scale),
  )
  frozen = Frozen(variable_shardings(rest, mesh, rules), variable_shardings(keys, mesh, rules))
  return TrainShardings(state, frozen, batch_sharding(mesh, rules))


def place(tree: Any, shardings: Any) -> Any:
  """Copies host or single-device arrays into global arrays with `shardings` (each process fills its shards).

  Works with several processes as long as every process holds the same values (same seed, same checkpoint).
  """

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:  # already in place (e.g. from load_model_sharded)
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # a global array: reshard on the devices
      return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x)) if not isinstance(x, np.ndarray) else x
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def shard_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A global batch from this process's rows ([A, b_local, T] each; the rows dimension is the split one).

  grain hands process p the p-th block of rows; the mesh puts process-major devices first, so
  block p lands on process p's devices.
  """

  def one(x):
    x = np.asarray(x)
    rows_axis = 1 if x.ndim == 3 else 0
    shape = list(x.shape)
    shape[rows_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

  return {k: one(v) for k, v in local.items()}


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: jax.sharding.Mesh, rules: Any) -> jax.Array:
  """with_sharding_constraint by logical axis names, e.g. ("batch", "length", "act_embed") for [B, T, D]."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(logical_axes, x.shape, mesh, rules)))


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
  """`ModelOptions.constrain`: activations pinned by their logical axis names through the rules table.

  A hint only: an array with a dimension that its rule's mesh axes do not divide (a generation
  batch of one row on a data-parallel mesh) is left to XLA's propagation instead of replicated.
  """

  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]

  def __post_init__(self):  # hashable: the options holding this are part of the jitted program's key
    object.__setattr__(
      self, "rules", tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in self.rules)
    )

  def __call__(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    table = rules_dict(self.rules)
    for name, dim in zip(logical_axes, x.shape):
      if dim % int(np.prod([self.mesh.shape[a] for a in table.get(name, ())], dtype=np.int64)):
        return x
    return constrain(x, logical_axes, self.mesh, self.rules)


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings` (the largest shard)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, NamedSharding))):
    total += int(np.prod(s.shard_shape(tuple(x.shape)), dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total
