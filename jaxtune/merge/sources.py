"""The models a merge reads, tensor by tensor: HF checkpoint directories, and PEFT LoRA adapters over one.

An adapter is merged as the model it makes: each adapted weight read as W + scale · B @ A
(scale = alpha / r, or alpha / sqrt(r) with rsLoRA; DoRA then rescales each row to its magnitude,
`jaxtune.peft.lora.dora_rows`), everything else as the base's. It is named
as mergekit names it, `BASE+ADAPTER`, or as a bare adapter directory, which then applies to the
recipe's base_model.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from jaxtune.errors import UserError
from jaxtune.hf.safetensors_io import Checkpoint, SafetensorsFile
from jaxtune.peft.import_adapter import CONFIG_FILE, FACTORS, WEIGHTS_FILE, AdapterError, read_adapter_config
from jaxtune.peft.lora import MAGNITUDE, PEFT_PREFIX, dora_rows


class MergeInputError(UserError, ValueError):
  """A model a merge cannot read, or models that cannot be merged together; the message names the tensor or file."""


class Model:
  """An HF checkpoint directory."""

  def __init__(self, label: str, directory: pathlib.Path):
    if not directory.is_dir():
      raise MergeInputError(f"{label}: not a directory; a merge reads HF checkpoint or PEFT adapter directories.")
    self.label, self.directory = label, directory
    self.checkpoint = Checkpoint(directory)

  def names(self) -> list[str]:
    return self.checkpoint.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return self.checkpoint.file_of(name).shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self.checkpoint.file_of(name).dtype(name)

  def get(self, name: str) -> np.ndarray:
    return self.checkpoint.file_of(name).get(name)


class Adapted(Model):
  """A base checkpoint with a PEFT LoRA (or DoRA) adapter folded in, tensor by tensor."""

  def __init__(self, label: str, base: Model, adapter_dir: pathlib.Path):
    self.label, self.directory, self.checkpoint, self.base = label, base.directory, base.checkpoint, base
    self.adapter_dir = adapter_dir
    config = read_adapter_config(adapter_dir)
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
      raise AdapterError(f"{path}: not found; the adapter's weights must be saved as safetensors.")
    weights = SafetensorsFile(path)
    rank, alpha = float(config["r"]), float(config["lora_alpha"])
    self.scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    self.dora = bool(config.get("use_dora"))
    suffixes = FACTORS + (MAGNITUDE,) if self.dora else FACTORS
    self.weights, self.adapted = weights, {}
    for tensor in weights.keys():
      suffix = next((f for f in suffixes if tensor.endswith(f)), None)
      if not tensor.startswith(PEFT_PREFIX) or suffix is None:
        raise AdapterError(
          f"{path}: tensor {tensor!r} is not a LoRA factor of a linear layer "
          f"({PEFT_PREFIX}<module>{' or '.join(suffixes)}); only LoRA and DoRA adapters can be merged."
        )
      self.adapted.setdefault(tensor.removeprefix(PEFT_PREFIX).removesuffix(suffix) + ".weight", []).append(tensor)
    for name, tensors in self.adapted.items():
      prefix = PEFT_PREFIX + name.removesuffix(".weight")
      a_name, b_name = prefix + FACTORS[0], prefix + FACTORS[1]
      missing = [prefix + s for s in suffixes if prefix + s not in tensors]
      if missing:
        raise AdapterError(f"{path}: tensor {missing[0]!r} is missing; a module needs all of {', '.join(suffixes)}.")
      if name not in base.checkpoint:
        raise AdapterError(
          f"{path}: tensor {a_name!r} adapts {name}, which {base.label} does not have; "
          "the adapter was made for another base model."
        )
      (r_a, n_in), (n_out, r_b), w = weights.shape(a_name), weights.shape(b_name), base.shape(name)
      if r_a != int(rank) or r_b != int(rank) or (n_out, n_in) != tuple(w):
        raise AdapterError(
          f"{path}: tensors {a_name!r} {weights.shape(a_name)} and {b_name!r} {weights.shape(b_name)} do not fit "
          f"{name} {tuple(w)} of {base.label} with r={int(rank)} ({CONFIG_FILE}); the adapter was made for another "
          "base model."
        )
      if self.dora and weights.shape(prefix + MAGNITUDE) != (n_out,):
        raise AdapterError(
          f"{path}: tensor {prefix + MAGNITUDE!r} {weights.shape(prefix + MAGNITUDE)} does not fit {name} {tuple(w)} "
          f"of {base.label}; the adapter was made for another base model."
        )

  def get(self, name: str) -> np.ndarray:
    w = self.base.get(name)
    if name not in self.adapted:
      return w
    prefix = PEFT_PREFIX + name.removesuffix(".weight")
    a = self.weights.get(prefix + FACTORS[0]).astype(np.float32)
    b = self.weights.get(prefix + FACTORS[1]).astype(np.float32)
    merged = w.astype(np.float32) + np.float32(self.scale) * (b @ a)
    if self.dora:  # HF's [out, in]: a row's inputs are axis 1
      merged = np.asarray(dora_rows(merged, self.weights.get(prefix + MAGNITUDE), (1,)))
    return merged.astype(w.dtype)


def is_adapter(directory: pathlib.Path) -> bool:
  return (directory / CONFIG_FILE).is_file()


def open_models(refs: list[str], base: str | None, relative_to: pathlib.Path) -> list[Model]:
  """The models named by `refs` (paths relative to the recipe's directory), each checkpoint opened once."""
  opened: dict[pathlib.Path, Model] = {}

  def checkpoint(text: str) -> Model:
    path = (relative_to / pathlib.Path(text).expanduser()).absolute()
    if path not in opened:
      if is_adapter(path):
        raise MergeInputError(f"{text}: is a PEFT adapter; as base_model give the model it adapts.")
      opened[path] = Model(text, path)
    return opened[path]

  def model(ref: str) -> Model:
    path = (relative_to / pathlib.Path(ref).expanduser()).absolute()
    if "+" in ref and not path.exists():
      under, adapter = ref.rsplit("+", 1)
      return Adapted(ref, checkpoint(under), (relative_to / pathlib.Path(adapter).expanduser()).absolute())
    if path.is_dir() and is_adapter(path):
      if base is None or ref == base:
        raise MergeInputError(f"{ref}: is a PEFT adapter; name the model it adapts as base_model, or write BASE+{ref}.")
      return Adapted(ref, model(base), path)
    return checkpoint(ref)

  return [model(ref) for ref in refs]
