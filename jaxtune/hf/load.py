"""Hugging Face checkpoint -> jaxtune NNX model, streamed tensor by tensor.

The model is first built abstractly (`nnx.eval_shape`: shapes, no memory), then
each parameter is filled from the checkpoint's memory-mapped tensors, converted
to the target dtype and moved to the device before the next one is read, so
peak host memory stays near one model in the target dtype.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.hf import mapping
from jaxtune.hf.safetensors_io import Checkpoint, CheckpointError
from jaxtune.models import options as options_lib
from jaxtune.models.config import ModelConfig, load_config
from jaxtune.models.options import ModelOptions
from jaxtune.models.transformer import CausalLM

# What a model download needs: configs, safetensors, tokenizer and template files; never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def resolve(path_or_hub_id: str | pathlib.Path) -> pathlib.Path:
  """A local directory, or a hub id resolved through huggingface_hub's cache (offline when cached)."""
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.exists() or str(path_or_hub_id).startswith((".", "/", "~")) or str(path_or_hub_id).count("/") != 1:
    raise CheckpointError(f"{path_or_hub_id}: not a directory, and not a hub id of the form 'org/name'.")
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  repo = str(path_or_hub_id)
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True))
  except Exception:  # not cached: fall through to a download
    pass
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo, allow_patterns=HUB_PATTERNS))
  except Exception as e:
    raise CheckpointError(f"{repo}: not in the local Hugging Face cache and could not be downloaded ({e}). "
                          "Download it where there is network, or pass a local directory.") from None


def _read(ckpt: Checkpoint, tmap: mapping.TensorMap, name: str, expected: tuple[int, ...], dtype) -> np.ndarray:
  if name not in ckpt:
    raise CheckpointError(f"{ckpt.directory}: tensor {name!r} is missing (needed for {'.'.join(tmap.path)}); "
                          "the checkpoint does not match its config.json.")
  raw = ckpt.file_of(name).get(name)
  try:
    value = tmap.to_jax(raw)
  except ValueError:
    value = None
  if value is None or value.shape != expected:
    raise CheckpointError(f"{ckpt.file_of(name).path}: tensor {name!r} has shape {tuple(raw.shape)}, but "
                          f"config.json implies a shape that maps to {expected}; the checkpoint does not match "
                          "its config.json.")
  return np.asarray(value, dtype=dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: jax.Array, i: int) -> jax.Array:
  return stack.at[i].set(layer)


def load_params(ckpt: Checkpoint, cfg: ModelConfig, abstract_state: nnx.State) -> nnx.State:
  """Fills an abstract (eval_shape) state from the checkpoint, one parameter at a time."""
  by_path = {m.path: m for m in mapping.tensor_maps(cfg)}
  used: set[str] = set()
  flat = []
  for path, var in nnx.to_flat_state(abstract_state):
    tmap = by_path.get(tuple(str(p) for p in path))
    if tmap is None:
      raise CheckpointError(f"no Hugging Face tensor is known for parameter {'.'.join(map(str, path))}.")
    shape, dtype = var.shape, np.dtype(var.dtype)
    if tmap.stacked:  # filled on the device one layer at a time: the host holds one layer, never the stack
      value = jnp.zeros(shape, dtype)
      for i, name in enumerate(tmap.hf_names(cfg.num_layers)):
        value = _set_layer(value, _read(ckpt, tmap, name, shape[1:], dtype), i)
        used.add(name)
    else:
      value = jnp.asarray(_read(ckpt, tmap, tmap.hf_name, shape, dtype))
      used.add(tmap.hf_name)
    flat.append((path, var.replace(value)))
  unexpected = [n for n in ckpt.keys() if n not in used and not n.endswith(mapping.IGNORED_SUFFIXES)
                and not (cfg.tie_embeddings and n == "lm_head.weight")]
  if unexpected:
    shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
    raise CheckpointError(f"{ckpt.directory}: unexpected tensors {shown}; the checkpoint holds weights that "
                          f"{cfg.model_type} models do not have (a different architecture or an adapter?).")
  return nnx.from_flat_state(flat)


def load_model(path_or_hub_id: str | pathlib.Path, dtype: Any = None, *, attention_impl: str = "xla",
               remat: str = "none", param_dtype: Any = None, kernels: str = "auto") -> CausalLM:
  """Loads an HF checkpoint as a jaxtune CausalLM (parameters and compute in `dtype`, default float32).

  kernels: "plain", "cpu", or "auto" (cpu on the CPU backend, plain elsewhere; models/kernels.py).
  """
  directory = resolve(path_or_hub_id)
  dtype = np.dtype(dtype or "float32").name
  options = options_lib.for_platform(jax.default_backend(), kernels=kernels, dtype=dtype,
                                     param_dtype=np.dtype(param_dtype or dtype).name,
                                     attention_impl=attention_impl, remat=remat)
  cfg = load_config(directory)
  ckpt = Checkpoint(directory)
  abstract = nnx.eval_shape(lambda: CausalLM(cfg, options, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  return nnx.merge(graphdef, load_params(ckpt, cfg, abstract_state))


def init_model(cfg: ModelConfig, seed: int = 0, options: ModelOptions | None = None) -> CausalLM:
  """A randomly initialised model (tests and benchmarks)."""
  return CausalLM(cfg, options, rngs=nnx.Rngs(seed))


def load_tokenizer(path_or_hub_id: str | pathlib.Path):
  """The checkpoint's transformers tokenizer (never with remote code)."""
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers.AutoTokenizer.from_pretrained(str(resolve(path_or_hub_id)), trust_remote_code=False)

