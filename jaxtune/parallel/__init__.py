"""Scale-out: the device mesh, shardings from logical axis rules, multi-host setup, sharded loading, dry runs."""

from jaxtune.parallel.mesh import PRESETS, RULES, axis_sizes, make_mesh, mesh_config
from jaxtune.parallel.sharding import (
  ActivationSharding,
  TrainShardings,
  batch_sharding,
  constrain,
  place,
  shard_batch,
  spec,
  train_shardings,
  variable_shardings,
)

__all__ = [
  "PRESETS",
  "RULES",
  "ActivationSharding",
  "TrainShardings",
  "axis_sizes",
  "batch_sharding",
  "constrain",
  "make_mesh",
  "mesh_config",
  "place",
  "shard_batch",
  "spec",
  "train_shardings",
  "variable_shardings",
]
