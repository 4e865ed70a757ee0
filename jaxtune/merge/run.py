"""Runs a merge recipe: every tensor read from each model, merged, and written as it is reached.

The output is an HF checkpoint directory (sharded safetensors, the base's config.json with the
output dtype, its generation_config.json, and the tokenizer and chat template of the chosen
source), staged and renamed into place whole, as exports are (export/staging.py). The host holds
one tensor of each model at a time, never a whole model.

Models that differ in a tensor's shape or in their vocabulary are refused before anything is
written, naming the tensor or file: merged embeddings of two vocabularies give a model that loads
and talks nonsense.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import zlib

import numpy as np

from jaxtune.export import files, staging
from jaxtune.merge import config as config_lib
from jaxtune.merge import methods
from jaxtune.merge.config import MergeConfig
from jaxtune.merge.sources import MergeInputError, Model, open_models


def check_compatible(models: list[Model]) -> None:
  """Every model has the reference's tensors, in the same shapes, and the same tokenizer vocabulary."""
  ref = models[0]
  names = ref.names()
  for other in models[1:]:
    theirs = set(other.names())
    missing, extra = [n for n in names if n not in theirs], sorted(theirs - set(names))
    if missing or extra:
      has, lacks = (ref, other) if missing else (other, ref)
      name = (missing or extra)[0]
      raise MergeInputError(
        f"tensor {name}: {has.label} has it, {lacks.label} does not; only models of one architecture can be merged."
      )
    for name in names:
      if ref.shape(name) != other.shape(name):
        vocab = _vocab_sizes(ref, other)
        why = (
          f"the vocabularies differ (vocab_size {vocab[0]} and {vocab[1]}); merging them garbles the embeddings"
          if vocab[0] != vocab[1]
          else "only models of one architecture and size can be merged"
        )
        raise MergeInputError(
          f"tensor {name}: shape {ref.shape(name)} in {ref.label}, {other.shape(name)} in {other.label}; {why}."
        )
    _check_same_vocabulary(ref, other)


def _vocab_sizes(*models: Model) -> tuple:
  """config.json's vocab_size of each model (None without one)."""
  paths = [m.directory / "config.json" for m in models]
  return tuple(files.read_json(p).get("vocab_size") if p.is_file() else None for p in paths)


def _vocabulary(directory: pathlib.Path) -> dict | None:
  path = directory / "tokenizer.json"
  if not path.is_file():
    return None
  data = files.read_json(path)
  added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
  return {"vocab": (data.get("model") or {}).get("vocab"), "added": added}


def _check_same_vocabulary(ref: Model, other: Model) -> None:
  if ref.directory == other.directory:
    return
  mine, theirs = _vocabulary(ref.directory), _vocabulary(other.directory)
  if mine is not None and theirs is not None and mine != theirs:
    raise MergeInputError(
      f"{other.directory / 'tokenizer.json'}: a different vocabulary from {ref.directory / 'tokenizer.json'} "
      "(token ids mean different tokens); only models sharing one tokenizer can be merged."
    )


def _num_layers(model: Model) -> int:
  path = model.directory / "config.json"
  hf = files.read_json(path) if path.is_file() else {}
  hf = hf.get("text_config", hf)
  if "num_hidden_layers" in hf:
    return int(hf["num_hidden_layers"])
  found = {config_lib.LAYER.search(n) for n in model.names()} - {None}
  return len({m.group(1) for m in found})


class Merger:
  """The recipe bound to its opened models: `tensor(name)` is the merged value of one tensor."""

  def __init__(self, cfg: MergeConfig, models: list[Model], seed: int = 0):
    self.cfg, self.models, self.seed = cfg, models, seed
    refs = [m.model for m in cfg.models]
    self.base = refs.index(cfg.base) if cfg.base else None
    self.num_layers = _num_layers(models[self.base or 0])

  def _value(self, key: str, i: int | None, name: str, t: float):
    method = self.cfg.method
    scopes = ([self.cfg.models[i].parameters] if i is not None else []) + [self.cfg.parameters]
    default = method.inputs[key] if key in method.inputs else method.shared[key]
    where = f"{self.cfg.where}: {self.cfg.models[i].model}" if i is not None else self.cfg.where
    return config_lib.resolve(key, default, scopes, name, t, where)

  def tensor(self, name: str) -> np.ndarray:
    method, t = self.cfg.method, config_lib.layer_position(name, self.num_layers)
    first = self.models[self.base or 0]
    if not np.issubdtype(first.dtype(name), np.floating):
      return first.get(name)
    values = [m.get(name).astype(np.float32) for m in self.models]
    if method.name == "linear":
      weights = [self._value("weight", i, name, t) for i in range(len(values))]
      return methods.linear(values, weights, self._value("normalize", None, name, t))
    if method.name == "slerp":
      other = 1 - self.base
      return methods.slerp(self._value("t", None, name, t), values[self.base], values[other])
    others = [i for i in range(len(values)) if i != self.base]
    return methods.task_arithmetic(
      values[self.base],
      [values[i] for i in others],
      [self._value("weight", i, name, t) for i in others],
      [self._value("density", i, name, t) for i in others],
      sparsify=method.sparsify,
      consensus=method.consensus,
      normalize=self._value("normalize", None, name, t),
      rescale=self._value("rescale", None, name, t),
      lam=self._value("lambda", None, name, t),
      rng=np.random.default_rng([self.seed, zlib.crc32(name.encode())]),
    )


def merge(
  cfg: MergeConfig,
  out_dir: str | os.PathLike,
  *,
  root: str | os.PathLike = ".",
  overwrite: bool = False,
  max_shard_bytes: int = files.DEFAULT_MAX_SHARD_BYTES,
  seed: int = 0,
) -> pathlib.Path:
  """Writes the merge `cfg` describes to `out_dir`; returns the directory.

  root: the directory the recipe's model paths are relative to (the YAML file's).
  seed: of DARE's random drops (the same seed gives the same model).
  """
  models = open_models([m.model for m in cfg.models], cfg.base, pathlib.Path(root))
  check_compatible(models)
  merger = Merger(cfg, models, seed)
  ref = models[merger.base or 0]
  tokenizer = models[[m.model for m in cfg.models].index(cfg.tokenizer_source)] if cfg.tokenizer_source else ref
  dtype = files.dtype_of(cfg.dtype) if cfg.dtype else files.source_dtype(ref.directory)
  for m in models:
    for read in (m.directory, getattr(m, "adapter_dir", None)):
      if read is not None:
        files.check_not_source(out_dir, read)
  specs = []
  for name in ref.names():
    out = dtype if np.issubdtype(ref.dtype(name), np.floating) else ref.dtype(name)
    specs.append(files.TensorSpec(name, ref.shape(name), out, lambda n=name, d=out: merger.tensor(n).astype(d)))
  with staging.staged(out_dir, overwrite=overwrite, patterns=files.MODEL_PATTERNS) as stage:
    _write(stage, specs, ref.directory, tokenizer.directory, dtype, max_shard_bytes)
  return pathlib.Path(out_dir).expanduser().absolute()


def _write(stage, specs, source: pathlib.Path, tokenizer: pathlib.Path, dtype: np.dtype, max_shard_bytes: int):
  out = stage.path
  files.write_sharded(out, specs, max_shard_bytes, stage.record)
  config = {k: v for k, v in files.read_json(source / "config.json").items() if k != "torch_dtype"}
  config["dtype"] = dtype.name
  files.write_json(out / "config.json", config)
  if (source / "generation_config.json").is_file():
    shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
  files.copy_tokenizer_files(tokenizer, out)
