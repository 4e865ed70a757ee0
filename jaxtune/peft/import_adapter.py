"""A PEFT LoRA or DoRA adapter directory onto a loaded base model: the inverse of `jaxtune.export.adapter`.

    DIR/adapter_config.json         peft_type LORA, r, lora_alpha, use_rslora, use_dora
    DIR/adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]
                                    (DoRA: also <module>.lora_magnitude_vector [out])

The adapters become jaxtune's own (`apply_lora` with the file's r, alpha, kind and modules), their
values read through the weight table's LoRA layout (`mapping.TensorMap.lora_from_hf`), so a
loaded adapter generates, merges and exports like a trained one. Which modules are adapted comes
from the tensors in the file (PEFT's `target_modules` may be a regex). What jaxtune's LoRA has no
form for (per-module ranks, some layers only, trained biases, extra trained modules) is refused
with the key or tensor that asks for it.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import UserError
from jaxtune.hf import mapping
from jaxtune.hf.safetensors_io import SafetensorsFile
from jaxtune.models.transformer import CausalLM
from jaxtune.peft.lora import MAGNITUDE, PEFT_PREFIX, LoRAParam, PeftModule, apply_lora, lora_weights, peft_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FACTORS = (".lora_A.weight", ".lora_B.weight")

# adapter_config.json keys whose values other than PEFT's defaults jaxtune's LoRA cannot express.
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
  "modules_to_save": (bool, "modules trained in full besides the adapters are not supported"),
  "bias": (lambda v: v not in (None, "none"), "trained biases are not supported"),
  "lora_bias": (bool, "trained biases are not supported"),
  "fan_in_fan_out": (bool, "fan_in_fan_out (GPT-2 style Conv1D weights) is not supported"),
  "layers_to_transform": (lambda v: v is not None, "adapters on some layers only are not supported"),
  "rank_pattern": (bool, "a rank per module is not supported"),
  "alpha_pattern": (bool, "an alpha per module is not supported"),
  "target_parameters": (bool, "adapters on parameters (not modules) are not supported"),
}


class AdapterError(UserError, ValueError):
  """A PEFT adapter directory that cannot be loaded onto the model; the message names the file and key or tensor."""


def read_adapter_config(directory: pathlib.Path) -> dict:
  """adapter_config.json, checked for what jaxtune's LoRA can express."""
  if not directory.is_dir():
    raise AdapterError(
      f"{directory}: not a directory; pass a PEFT adapter directory ({CONFIG_FILE} and {WEIGHTS_FILE})."
    )
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise AdapterError(f"{path}: not found; a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}.")
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise AdapterError(f"{path}:{e.lineno}: invalid JSON ({e.msg}).") from None
  if config.get("peft_type") != "LORA":
    raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be loaded.")
  for key in ("r", "lora_alpha"):
    if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
      raise AdapterError(f"{path}: {key} is {config.get(key)!r}; a LoRA adapter needs a positive {key}.")
  for key, (unsupported, why) in _UNSUPPORTED.items():
    if unsupported(config.get(key)):
      raise AdapterError(f"{path}: {key} is {config[key]!r}: {why}; only LoRA and DoRA adapters can be loaded.")
  return config


def _is_hub_id(name: str) -> bool:
  """owner/name, not a path that exists here."""
  return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not pathlib.Path(name).exists()


def _check_base(adapter_base: str, base: str, path: pathlib.Path) -> None:
  if _is_hub_id(adapter_base) and _is_hub_id(base) and adapter_base.lower() != base.lower():
    raise AdapterError(
      f"{path}: base_model_name_or_path is {adapter_base!r}, but the model is {base!r}: the adapter was trained on "
      f"another base. If it is the same model under another name, set model.hub_id={adapter_base}."
    )


def _weights(directory: pathlib.Path) -> SafetensorsFile:
  path = directory / WEIGHTS_FILE
  if not path.is_file():
    pickled = directory / "adapter_model.bin"
    hint = (
      f"it holds {pickled.name}, a pickle, which jaxtune does not read: save the adapter with safe_serialization=True"
      if pickled.is_file()
      else "the adapter's weights are missing"
    )
    raise AdapterError(f"{path}: not found; {hint}.")
  return SafetensorsFile(path)


def _tensors(dora: bool) -> tuple[str, ...]:
  """The suffixes of one adapted module's tensors."""
  return FACTORS + (MAGNITUDE,) if dora else FACTORS


def _adapted(names: list[str], cfg, path: pathlib.Path, dora: bool) -> list[str]:
  """The HF module names (q_proj, ...) with LoRA factors in the file; AdapterError for a tensor of another kind."""
  known = set(mapping.module_names(cfg).values())
  found = set()
  for name in names:
    module = name.removeprefix(PEFT_PREFIX)
    if not dora and module.endswith(MAGNITUDE):
      raise AdapterError(
        f"{path.parent / CONFIG_FILE}: use_dora is not true, but tensor {name!r} is a DoRA magnitude; "
        "set use_dora: true if the adapter is DoRA."
      )
    suffix = next((f for f in _tensors(dora) if module.endswith(f)), None)
    short = module.removesuffix(suffix or "").rsplit(".", 1)[-1]
    if not name.startswith(PEFT_PREFIX) or suffix is None or short not in known:
      raise AdapterError(
        f"{path}: tensor {name!r} is not a LoRA factor of a linear layer of this {cfg.model_type} model "
        f"(expected {PEFT_PREFIX}<module>{' or '.join(_tensors(dora))}, modules {', '.join(sorted(known))})."
      )
    found.add(short)
  if not found:
    raise AdapterError(f"{path}: holds no LoRA tensors.")
  return sorted(found)


def _factors(weights: SafetensorsFile, module: PeftModule, rank: int) -> list[np.ndarray]:
  """The module's A, B (and DoRA's magnitude) in our layout (stacked over layers when its weight is), from
  PEFT's tensors."""
  adapter = module.adapter
  shapes = [adapter.lora_a.shape, adapter.lora_b.shape] + ([adapter.lora_magnitude.shape] if adapter.use_dora else [])
  stack = 1 if module.tmap.stacked else 0
  out = [np.zeros(shape, np.float32) for shape in shapes]
  present = set(weights.keys())
  for i, name in enumerate(module.names):
    for suffix in _tensors(adapter.use_dora):
      if name + suffix not in present:
        raise AdapterError(
          f"{weights.path}: tensor {name + suffix!r} is missing; jaxtune's LoRA adapts a module in every layer, "
          f"so the adapter must hold {name.rsplit('.', 1)[-1]} tensors for all {len(module.names)} layers."
        )
    try:
      layer = module.tmap.lora_from_hf(
        weights.get(name + FACTORS[0]),
        weights.get(name + FACTORS[1]),
        adapter.spec.w,
        shapes[0][stack:],
        shapes[1][stack:],
      )
      if adapter.use_dora:
        layer += (module.tmap.rows_from_hf(weights.get(name + MAGNITUDE), adapter.spec.w, shapes[2][stack:]),)
    except ValueError as e:
      raise AdapterError(
        f"{weights.path}: {name}.{e} for r={rank} on this base; the adapter was made for another model, or "
        f"{CONFIG_FILE}'s r is not the tensors' rank."
      ) from None
    for whole, value in zip(out, layer):
      whole[(i,) * stack] = value
  return out


def load_adapter(model: CausalLM, directory: str | os.PathLike, base: str = "") -> CausalLM:
  """The base `model` (no adapters) with the PEFT LoRA or DoRA adapter in `directory`: a new model sharing its arrays.

  base: the hub id the model is known by ("" when unknown): an adapter whose base_model_name_or_path is
  another hub id was trained on another model and is refused (shapes are checked tensor by tensor too).
  """
  if lora_weights(model):
    raise ValueError("the model already has LoRA adapters; load an adapter onto the base model.")
  directory = pathlib.Path(directory).expanduser()
  config = read_adapter_config(directory)
  _check_base(config.get("base_model_name_or_path") or "", base, directory / CONFIG_FILE)
  weights = _weights(directory)
  rank, dora = int(config["r"]), bool(config.get("use_dora", False))
  build = lambda: apply_lora(
    CausalLM(model.config, model.options, rngs=nnx.Rngs(0)),
    rank=rank,
    alpha=float(config["lora_alpha"]),
    use_rslora=bool(config.get("use_rslora", False)),
    use_dora=dora,
    targets=_adapted(weights.keys(), model.config, weights.path, dora),
    rngs=nnx.Rngs(0),
  )
  # Built abstractly (apply_lora's random init compiles once per shape), then filled from the file.
  graphdef, adapters, _ = nnx.split(nnx.eval_shape(build), LoRAParam, ...)
  adapters = jax.tree.map(lambda s: jnp.asarray(np.zeros(s.shape, s.dtype)), adapters)
  out = nnx.merge(graphdef, adapters, nnx.state(model))
  read = set()
  for module in peft_modules(out):
    adapter = module.adapter
    params = [adapter.lora_a, adapter.lora_b] + ([adapter.lora_magnitude] if dora else [])
    for param, value in zip(params, _factors(weights, module, rank)):
      param.set_value(jnp.asarray(value, param.dtype))
    read.update(name + suffix for name in module.names for suffix in _tensors(dora))
  extra = sorted(set(weights.keys()) - read)
  if extra:
    more = f"; so are {len(extra) - 1} more" if len(extra) > 1 else ""
    raise AdapterError(
      f"{weights.path}: tensor {extra[0]!r} is for no layer of this model ({model.config.num_layers} layers){more}; "
      "the adapter was made for another model."
    )
  return out
