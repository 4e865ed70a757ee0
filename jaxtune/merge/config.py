"""A merge recipe: the subset of mergekit's YAML that jaxtune runs, checked key by key.

    merge_method: ties                 # linear slerp task_arithmetic ties dare_linear dare_ties
    base_model: path/to/base           # required but for linear
    models:
      - model: path/to/a               # an HF directory, an adapter over base_model, or BASE+ADAPTER
        parameters: {weight: 0.6, density: 0.5}
      - model: path/to/b
        parameters: {weight: 0.4, density: 0.5}
    parameters: {normalize: true}      # settings of the whole merge (or defaults of the models')
    dtype: bfloat16                    # of the output (out_dtype too); default the base's
    tokenizer_source: base             # base, or one of the models (tokenizer: {source: ...} too)

A parameter's value is a number, a gradient (a list interpolated over the layers, as mergekit
does), or a list of {filter, value} whose first filter found in the tensor's name wins. The
names, defaults and precedence (a model's own parameters, then the merge's) are mergekit 0.1.5's,
so a recipe written for it means the same here; what jaxtune does not run (slices, modules, a
union of vocabularies) is refused by key rather than merged differently.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
from typing import Any

from jaxtune.errors import UserError


class MergeConfigError(UserError, ValueError):
  """A merge recipe that cannot be run as written; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Method:
  """A method's parameters, per input model (`inputs`) and per merge (`shared`), with defaults (None: required)."""

  name: str
  inputs: dict[str, Any]
  shared: dict[str, Any]
  needs_base: bool = True
  sparsify: str | None = None  # "magnitude" (TIES) or "random" (DARE)
  consensus: bool = False  # TIES sign election


def _task(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool) -> Method:
  shared = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
  return Method(name, {"weight": None, "density": 1.0}, shared, sparsify=sparsify, consensus=consensus)


# mergekit 0.1.5's merge_methods/registry.py: the same names and defaults.
METHODS = {
  m.name: m
  for m in (
    Method("linear", {"weight": None}, {"normalize": True}, needs_base=False),
    Method("slerp", {}, {"t": None}),
    _task("task_arithmetic", None, False, normalize=False, rescale=False),
    _task("ties", "magnitude", True, normalize=True, rescale=False),
    _task("dare_linear", "random", False, normalize=False, rescale=True),
    _task("dare_ties", "random", True, normalize=False, rescale=True),
  )
}
BOOLEAN = ("normalize", "rescale", "int8_mask")
KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer")
# mergekit keys jaxtune knows and does not run, with why.
UNSUPPORTED = {
  "slices": "layer slices (frankenmerges) are not supported; list whole models under models",
  "modules": "per-module merges are not supported; list whole models under models",
  "chat_template": "pick the chat template with tokenizer_source (its tokenizer files hold it)",
}
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Input:
  model: str  # as written: a directory, or BASE+ADAPTER
  parameters: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  method: Method
  base: str | None
  models: tuple[Input, ...]  # the base among them (first when the recipe did not list it)
  parameters: dict[str, Any]
  dtype: str | None
  tokenizer_source: str | None  # a model as written, or None: the base's (else the first model's)
  where: str  # the recipe's file, for messages


def _near(key: str, known) -> str:
  near = difflib.get_close_matches(key, list(known), n=1)
  return f"did you mean '{near[0]}'? " if near else ""


def _unknown(where: str, key: str, known, what: str = "key") -> MergeConfigError:
  return MergeConfigError(f"{where}: unknown {what} '{key}'; {_near(key, known)}known: {', '.join(known)}.")


def _check_setting(where: str, name: str, value: Any) -> None:
  """A parameter's value: scalar, gradient list, or {filter, value} conditions."""
  conditions = value if isinstance(value, list) and value and isinstance(value[0], dict) else None
  if isinstance(value, dict):
    conditions = [value]
  for cond in conditions or []:
    if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
      raise MergeConfigError(f"{where}: {name}: a conditional value is {{filter: NAME_PART, value: V}}; got {cond!r}.")
    _check_setting(where, name, cond["value"])
  if conditions is None and not (
    isinstance(value, (int, float, bool))
    or (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value))
  ):
    raise MergeConfigError(
      f"{where}: {name} is {value!r}; give a number, a list of numbers or {{filter, value}} items."
    )


def _parameters(where: str, method: Method, raw: Any, allowed: dict[str, Any], scope: str) -> dict[str, Any]:
  if raw is None:
    return {}
  if not isinstance(raw, dict):
    raise MergeConfigError(f"{where}: {scope} must be a mapping of parameter names to values; got {raw!r}.")
  for key, value in raw.items():
    if key not in allowed:
      if key in method.shared:
        raise MergeConfigError(
          f"{where}: {scope}.{key}: {key} is a setting of the whole merge; put it under parameters."
        )
      raise _unknown(f"{where}: {scope}", key, allowed, f"parameter of {method.name}")
    _check_setting(f"{where}: {scope}", key, value)
  return dict(raw)


def parse(raw: Any, where: str = "merge config") -> MergeConfig:
  """A MergeConfig from a YAML document (already loaded) or the same dict built from flags."""
  if not isinstance(raw, dict):
    raise MergeConfigError(f"{where}: a merge config is a mapping (merge_method, base_model, models, ...).")
  for key in raw:
    if key in UNSUPPORTED:
      raise MergeConfigError(f"{where}: {key}: {UNSUPPORTED[key]}.")
    if key not in KEYS:
      raise _unknown(where, key, KEYS)
  name = raw.get("merge_method")
  if name not in METHODS:
    if name is None:
      raise MergeConfigError(f"{where}: merge_method is missing; choose one of {', '.join(METHODS)}.")
    raise _unknown(where, str(name), METHODS, "merge_method")
  method = METHODS[name]
  base = raw.get("base_model")
  if base is not None and not isinstance(base, str):
    raise MergeConfigError(f"{where}: base_model is {base!r}; give a model directory.")
  if method.needs_base and not base:
    raise MergeConfigError(f"{where}: base_model is required by {name}.")
  entries = raw.get("models")
  if not isinstance(entries, list) or not entries:
    raise MergeConfigError(f"{where}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}.")
  models = []
  for i, entry in enumerate(entries):
    entry = {"model": entry} if isinstance(entry, str) else entry
    at = f"models[{i}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
      raise MergeConfigError(f"{where}: {at} must be {{model: PATH, parameters: {{...}}}}; got {entry!r}.")
    for key in entry:
      if key not in ("model", "parameters"):
        raise _unknown(f"{where}: {at}", key, ("model", "parameters"))
    params = _parameters(where, method, entry.get("parameters"), method.inputs, f"{at}.parameters")
    models.append(Input(entry["model"], params))
  if base and base not in [m.model for m in models]:
    models.insert(0, Input(base, {}))
  if name == "slerp" and len(models) != 2:
    raise MergeConfigError(f"{where}: slerp merges exactly two models (base_model and one other); got {len(models)}.")
  parameters = _parameters(where, method, raw.get("parameters"), {**method.inputs, **method.shared}, "parameters")
  dtype = raw.get("out_dtype") or raw.get("dtype")  # jaxtune computes in float32: the two only name the output's
  tokenizer = raw.get("tokenizer_source")
  if "tokenizer" in raw:
    spec = raw["tokenizer"]
    if not isinstance(spec, dict) or set(spec) - {"source"}:
      extra = sorted(set(spec) - {"source"}) if isinstance(spec, dict) else [repr(spec)]
      raise MergeConfigError(f"{where}: tokenizer: {extra[0]}: only tokenizer.source is supported.")
    if tokenizer is not None:
      raise MergeConfigError(f"{where}: give tokenizer_source or tokenizer.source, not both.")
    tokenizer = spec.get("source", "union")  # mergekit's default
  return MergeConfig(method, base, tuple(models), parameters, dtype, _tokenizer(tokenizer, models, where), where)


def _tokenizer(tokenizer: Any, models: list[Input], where: str) -> str | None:
  if tokenizer == "union":
    raise MergeConfigError(
      f"{where}: tokenizer_source: union is not supported: the models must share one vocabulary; "
      "choose base or one of the models."
    )
  if tokenizer == "base":
    tokenizer = None
  if tokenizer is not None and tokenizer not in [m.model for m in models]:
    raise MergeConfigError(
      f"{where}: tokenizer_source {tokenizer!r} is not one of the models; choose base or one of them."
    )
  return tokenizer


def with_overrides(cfg: MergeConfig, dtype: str | None = None, tokenizer_source: str | None = None) -> MergeConfig:
  """The recipe with the command line's --dtype and --tokenizer-source in place of its own."""
  if tokenizer_source is not None:
    cfg = dataclasses.replace(cfg, tokenizer_source=_tokenizer(tokenizer_source, list(cfg.models), cfg.where))
  return dataclasses.replace(cfg, dtype=dtype) if dtype is not None else cfg


def load(path: str | pathlib.Path) -> MergeConfig:
  """The merge recipe in a YAML file."""
  import yaml

  path = pathlib.Path(path).expanduser()
  try:
    raw = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    raise MergeConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e}).") from None
  return parse(raw, str(path))


# ---------------------------------------------------------------- one tensor's parameters


def layer_position(name: str, num_layers: int) -> float:
  """mergekit's t of a gradient: layer i of N at i/(N-1); tensors outside the layers at 0."""
  match = LAYER.search(name)
  if not match:
    return 0.0
  return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, name: str, t: float) -> Any:
  """A parameter's value for tensor `name` at gradient position t (mergekit's evaluate_setting); None: no match."""
  if isinstance(setting, dict):
    setting = [setting]
  if isinstance(setting, (int, float, bool)):
    return setting
  if all(isinstance(v, (int, float, bool)) for v in setting):
    if any(isinstance(v, bool) for v in setting):
      return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]
  for cond in setting:
    if cond.get("filter") in (None, "*") or (name and cond["filter"] in name):
      return evaluate(cond["value"], name, t)
  return None


def resolve(key: str, default: Any, scopes: list[dict[str, Any]], name: str, t: float, where: str) -> Any:
  """The first value of `key` in scopes (most specific first) that applies to tensor `name`, else the default."""
  for scope in scopes:
    if key in scope:
      value = evaluate(scope[key], name, t)
      if value is not None:
        return bool(value) if key in BOOLEAN else float(value)
  if default is None:
    raise MergeConfigError(f"{where}: parameter {key} is required for tensor {name}; set it under parameters.")
  return default
