"""Random HF-layout checkpoints written from our own tensor map (no torch): for the sharded-loader tests."""

from __future__ import annotations

import json
import pathlib

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxtune.hf.mapping import tensor_maps
from jaxtune.models.config import from_hf_dict


def write(
  directory: pathlib.Path, hf_config: dict, dtype=np.float32, seed: int = 0, max_file_bytes: int = 1 << 62
) -> int:
  """Writes config.json and model(-N).safetensors of random tensors; returns the model's bytes in float32."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(hf_config))
  cfg = from_hf_dict(hf_config)
  rng = np.random.default_rng(seed)
  dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
  shards, current, size, total, weight_map = [], {}, 0, 0, {}
  for tmap in tensor_maps(cfg):
    for name in tmap.hf_names(cfg.num_layers):
      value = rng.standard_normal(tmap.hf_shape, np.float32).astype(dtype)
      if size + value.nbytes > max_file_bytes and current:
        shards.append(current)
        current, size = {}, 0
      current[name], size, total = value, size + value.nbytes, total + value.size * 4
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
  else:
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(directory / file), metadata={"format": "pt"})
      weight_map.update({n: file for n in shard})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return total
