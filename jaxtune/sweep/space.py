"""A sweep file: what to search (config keys and their ranges), how, and for what objective.

`configs/sweeps/NAME.py` defines `get_sweep() -> dict`:

    dict(
      method="bayes",            # grid | random | bayes (Optuna's TPE)
      objective="eval/loss",     # any metric a trial logs at its eval steps (metrics.jsonl)
      direction="minimize",      # minimize | maximize
      trials=20,                 # the trial budget (grid: at most the grid's size)
      pruner="median",           # none | median | asha (successive halving), fed by each eval step
      seed=0,
      params={
        "optim.lr": dict(low=1e-4, high=1e-2, log=True),       # a float range (log or linear)
        "train.grad_accum": dict(low=1, high=4),               # an int range (ints for low and high)
        "data.batch_size": dict(values=[8, 16]),               # choices
        "peft.lora.rank,peft.lora.alpha": dict(values=[[8, 16.0], [16, 32.0]]),  # keys that vary together
      },
    )

Every key must exist in the training config; a grid needs choices for every parameter.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from typing import Any

import ml_collections

from jaxtune import configs
from jaxtune.errors import ConfigError

METHODS = ("grid", "random", "bayes")
PRUNERS = ("none", "median", "asha")
DIRECTIONS = ("minimize", "maximize")
FIELDS = ("method", "objective", "direction", "trials", "pruner", "seed", "params")


@dataclasses.dataclass(frozen=True)
class Param:
  """One searched dimension: a range, or choices; `keys` are the config keys it sets (several: they vary together)."""

  name: str  # as written in the sweep file ("optim.lr", "peft.lora.rank,peft.lora.alpha")
  keys: tuple[str, ...]
  values: tuple | None = None  # choices (each a tuple of len(keys) when several keys vary together)
  low: float | None = None
  high: float | None = None
  log: bool = False

  def suggest(self, trial) -> dict[str, Any]:
    """{config key: value} for this trial."""
    if self.values is not None:
      picked = trial.suggest_categorical(self.name, [_choice(v) for v in self.values])
      value = json.loads(picked) if len(self.keys) > 1 else picked
      return dict(zip(self.keys, value)) if len(self.keys) > 1 else {self.keys[0]: value}
    if isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.low, bool):
      return {self.keys[0]: trial.suggest_int(self.name, self.low, self.high, log=self.log)}
    return {self.keys[0]: trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)}

  def grid(self) -> list:
    return [_choice(v) for v in self.values]


def _choice(value: Any) -> Any:
  """A choice as Optuna stores it: plain numbers, strings and bools as they are; lists as JSON text."""
  return json.dumps(list(value)) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class Sweep:
  path: pathlib.Path
  method: str
  objective: str
  direction: str
  trials: int
  pruner: str
  seed: int
  params: tuple[Param, ...]

  def grid_space(self) -> dict[str, list]:
    return {p.name: p.grid() for p in self.params}

  def grid_size(self) -> int:
    size = 1
    for p in self.params:
      size *= len(p.values)
    return size


def load(path: str | pathlib.Path, config: ml_collections.ConfigDict) -> Sweep:
  """The sweep `path` defines, checked against the training `config`; ConfigError naming the file and key."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ConfigError(f"--sweep {path}: no such file; a sweep file defines get_sweep() (see configs/sweeps/)")
  spec = importlib.util.spec_from_file_location(f"jaxtune_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_sweep", None)):
    raise ConfigError(f"{path}: defines no get_sweep(); a sweep file returns its settings from get_sweep()")
  raw = dict(module.get_sweep())
  unknown = sorted(set(raw) - set(FIELDS))
  if unknown:
    raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}; a sweep has {', '.join(FIELDS)}")
  sweep = Sweep(
    path=path.absolute(),
    method=raw.get("method", "bayes"),
    objective=raw.get("objective", "eval/loss"),
    direction=raw.get("direction", "minimize"),
    trials=int(raw.get("trials", 10)),
    pruner=raw.get("pruner", "none"),
    seed=int(raw.get("seed", 0)),
    params=tuple(_param(path, name, value, config) for name, value in (raw.get("params") or {}).items()),
  )
  for field, allowed in (("method", METHODS), ("pruner", PRUNERS), ("direction", DIRECTIONS)):
    if getattr(sweep, field) not in allowed:
      raise ConfigError(f"{path}: {field}: {getattr(sweep, field)!r} is not one of {', '.join(allowed)}")
  if not sweep.params:
    raise ConfigError(f"{path}: params: the search space is empty; name at least one config key and its range")
  if sweep.trials < 1:
    raise ConfigError(f"{path}: trials: {sweep.trials} must be >= 1")
  if sweep.method == "grid":
    ranged = [p.name for p in sweep.params if p.values is None]
    if ranged:
      raise ConfigError(f"{path}: params {', '.join(ranged)}: a grid needs values=[...] for every parameter")
  return sweep


def _param(path: pathlib.Path, name: str, value: Any, config: ml_collections.ConfigDict) -> Param:
  keys = tuple(k.strip() for k in name.split(","))
  leaves = configs.leaves(config)
  for key in keys:
    if key not in leaves:
      raise ConfigError(f"{path}: params: '{key}' is not a config key{configs.nearest(key, config)}")
    if key == "output_dir":
      raise ConfigError(f"{path}: params: output_dir is the sweep's to set (one run directory per trial)")
  if not isinstance(value, dict):
    raise ConfigError(f"{path}: params['{name}']: expected dict(values=[...]) or dict(low=..., high=..., log=...)")
  if "values" in value:
    values = tuple(value["values"])
    if not values:
      raise ConfigError(f"{path}: params['{name}']: values is empty; give at least one")
    if len(keys) > 1 and not all(isinstance(v, (list, tuple)) and len(v) == len(keys) for v in values):
      raise ConfigError(f"{path}: params['{name}']: each value must list {len(keys)} settings, one per key")
    return Param(name, keys, values=values)
  if len(keys) > 1:
    raise ConfigError(f"{path}: params['{name}']: keys that vary together need values=[[...], ...]")
  if "low" not in value or "high" not in value or not value["low"] < value["high"]:
    raise ConfigError(f"{path}: params['{name}']: a range needs low < high (or give values=[...])")
  if value.get("log") and value["low"] <= 0:
    raise ConfigError(f"{path}: params['{name}']: a log range needs low > 0")
  return Param(name, keys, low=value["low"], high=value["high"], log=bool(value.get("log", False)))
