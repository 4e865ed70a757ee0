"""Hugging Face checkpoint -> a sharded jaxtune model: the rules say where each block goes, hf/ reads it.

Every process calls `load_model_sharded`; `jaxtune.hf.load` reads only the tensor slices that
process's devices hold (see there for how the host's staging stays below one layer's tensor).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding

from jaxtune.hf import load as hf_load
from jaxtune.models.options import ModelOptions
from jaxtune.models.transformer import CausalLM
from jaxtune.parallel.sharding import spec


def load_model_sharded(
  path_or_hub_id: str | pathlib.Path,
  mesh: jax.sharding.Mesh,
  rules: Any,
  options: ModelOptions | None = None,
  stats: dict | None = None,
) -> CausalLM:
  """An HF checkpoint as a CausalLM whose parameters are global arrays sharded over `mesh` by `rules`.

  `stats`, when given, receives read_bytes and peak_staged_bytes (host bytes of one transfer, the most at once).
  """

  def sharding_of(var: nnx.Variable) -> NamedSharding:
    return NamedSharding(mesh, spec(var.get_metadata().get("axes"), tuple(var.shape), mesh, rules))

  return hf_load.load(path_or_hub_id, options, sharding_of=sharding_of, stats=stats)
