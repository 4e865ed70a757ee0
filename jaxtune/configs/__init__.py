"""The shipped configs, and how a config file is found, loaded and overridden, strictly.

`--config` takes a file (`configs/quickstart.py`, `my_run.py`) or the name of a config shipped in
this package (`quickstart`, `tiny`, `llama3_8b_lora`, ...), so an installed wheel runs them with no
checkout. A config file's `get_config()` starts from `jaxtune.train.config.default_config()`, which
is locked: assigning a key that does not exist fails at that line, naming the nearest valid key.
`--config.KEY=VALUE` overrides then go through the same check, and a VALUE is parsed as the type
of the setting it replaces. The free-form maps stay open (`OPEN_MAPS`): their keys are the user's.

Every mistake raises ConfigError with the file and line, or the flag, and what to write instead.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
import re
import sys
import traceback
from typing import Any, Sequence

import ml_collections

from jaxtune.errors import ConfigError

HERE = pathlib.Path(__file__).resolve().parent
# Maps whose keys the user chooses: records' field names (data.field_map).
OPEN_MAPS = ("data.field_map",)
# What other tools call some of our keys: a misspelt key's hint names ours.
ALIASES = {
  "learning_rate": "lr",
  "lr_scheduler": "schedule",
  "lr_scheduler_type": "schedule",
  "max_steps": "steps",
  "num_train_epochs": "num_epochs",
  "gradient_accumulation_steps": "grad_accum",
  "micro_batch_size": "batch_size",
  "sequence_len": "max_seq_len",
  "max_length": "max_seq_len",
  "r": "rank",
  "lora_r": "rank",
  "lora_alpha": "alpha",
  "lora_dropout": "dropout",
  "target_modules": "targets",
  "lora_target_modules": "targets",
  "warmup": "warmup_steps",
  "model_name_or_path": "path",
  "base_model": "path",
}


def shipped() -> list[str]:
  """Names of the configs in this package."""
  return sorted(p.stem for p in HERE.glob("*.py") if not p.name.startswith("_"))


def find(spec: str) -> pathlib.Path:
  """The file a `--config` value names: a path to a .py file, or a shipped config's name."""
  path = pathlib.Path(spec).expanduser()
  if path.is_file():
    return path
  if path.suffix != ".py" and (HERE / f"{spec}.py").is_file():
    return HERE / f"{spec}.py"
  near = difflib.get_close_matches(path.stem, shipped(), n=1)
  hint = f"did you mean '{near[0]}'? " if near else ""
  raise ConfigError(
    f"--config {spec}: no such file, and no shipped config of that name; {hint}shipped: {', '.join(shipped())}"
  )


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of every setting; an open map counts as one setting."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and name not in OPEN_MAPS:
      out.update(leaves(value, name + "."))
    else:
      out[name] = value
  return out


def _sub_configs(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, ml_collections.ConfigDict]:
  """{dotted path: sub-config}, the root as ""."""
  out = {prefix.rstrip("."): config}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_sub_configs(value, f"{prefix}{key}."))
  return out


def _nodes(config: ml_collections.ConfigDict) -> dict[int, str]:
  """{id(sub-config): its dotted path}."""
  return {id(node): path for path, node in _sub_configs(config).items()}


def nearest(key: str, config: ml_collections.ConfigDict) -> str:
  """`; did you mean X?` for a key that does not exist, or the keys of its section."""
  parent, _, leaf = key.rpartition(".")
  section = config
  for part in parent.split(".") if parent else ():
    section = section.get(part) if isinstance(section, ml_collections.ConfigDict) else None
  if not isinstance(section, ml_collections.ConfigDict):  # the section itself is misspelt
    near = difflib.get_close_matches(key, list(leaves(config)), n=1, cutoff=0.5)
    return f"; did you mean {near[0]}?" if near else f"; the sections are {', '.join(config.keys())}"
  keys = list(section.keys())
  close = difflib.get_close_matches(leaf, ALIASES, n=1, cutoff=0.8)  # another tool's name, perhaps misspelt
  ours = ALIASES.get(leaf) or (ALIASES[close[0]] if close else "")
  near = [ours] if ours in keys else difflib.get_close_matches(leaf, keys, n=1, cutoff=0.6)
  if near:
    return f"; did you mean {parent + '.' if parent else ''}{near[0]}?"
  return f"; {parent or 'the config'} has {', '.join(keys)}"


def _file_line(error: BaseException, path: pathlib.Path) -> str:
  """`path:line` of the innermost frame of `error` in the config file."""
  line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
  for frame in traceback.extract_tb(error.__traceback__):
    if pathlib.Path(frame.filename).resolve() == path.resolve():
      line = frame.lineno
  return f"{path}:{line}" if line else str(path)


def _refused_by(error: BaseException) -> tuple[str, ml_collections.ConfigDict] | None:
  """(dotted path, root) of the innermost sub-config in `error`'s traceback that raised it, if any."""
  tb, owners = error.__traceback__, []
  while tb is not None:
    owners.append(tb.tb_frame.f_locals.get("self"))
    tb = tb.tb_next
  for owner in reversed(owners):  # innermost first: the sub-config whose __setattr__ / __getattr__ refused
    for root in reversed(_ROOTS):
      path = _nodes(root).get(id(owner))
      if path is not None:
        return path, root
  return None


def _explain(error: BaseException) -> str | None:
  """What a config file did wrong to a locked config: a key that is not a setting, or a value of the wrong type."""
  refused = _refused_by(error)
  if refused is None:
    return None
  parent, root = refused
  text = str(error.args[0]) if error.args else ""
  prefix = f"{parent}." if parent else ""
  if isinstance(error, (AttributeError, KeyError)):
    quoted = re.search(r"[\"'](\w+)\\?[\"']", text)  # `Key "lr_x" does not exist ...` or `'lrr'`
    leaf = quoted.group(1) if quoted else text
    return f"{prefix}{leaf} is not a setting{nearest(prefix + leaf, root)}"
  match = re.match(r"Could not override field '(\w+)' \(reference\)\. (.*) is of original type <class '(\w+)'>", text)
  if isinstance(error, TypeError) and match:
    field, value, given = match.groups()
    wanted = type(_sub_configs(root)[parent][field]).__name__
    return f"{prefix}{field} takes a {wanted}, not the {given} {value!r}"
  return None


def load_file(path: pathlib.Path) -> ml_collections.ConfigDict:
  """Runs `path`'s get_config(); any mistake in it becomes a ConfigError at its line."""
  name = f"jaxtune_config_{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"{path}: not a Python file; a config file defines get_config()")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise ConfigError(f"{path}: defines no get_config(); a config file returns its settings from get_config()")
    config = module.get_config()
  except ConfigError:
    raise
  except Exception as e:
    where = _file_line(e, path)
    problem = _explain(e)
    if problem is None:  # any other mistake in the file: its own message, at its line
      problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    raise ConfigError(f"{where}: {problem}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict")
  return config


# The locked defaults handed out while a config file runs, newest last: `_missing_key` maps the
# sub-config that refused a key back to its dotted path through them.
_ROOTS: list[ml_collections.ConfigDict] = []


def locked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` locked against new keys, its open maps (OPEN_MAPS) left open; remembered for errors."""
  config.lock()
  for node, path in ((n, p) for p, n in _sub_configs(config).items()):
    if any(name == path or name.endswith("." + path) for name in OPEN_MAPS):  # data_config() alone: "field_map"
      node.unlock()
  _ROOTS.append(config)
  del _ROOTS[:-4]
  return config


def check_keys(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, where: str) -> None:
  """Every key of `config` exists in `defaults`: catches files that built their own ConfigDict."""
  known = leaves(defaults)
  for key in leaves(config):
    if key not in known and not any(key.startswith(m + ".") for m in OPEN_MAPS):
      raise ConfigError(f"{where}: {key} is not a setting{nearest(key, defaults)}")


def parse_value(text: str, current: Any, key: str) -> Any:
  """`--config.KEY=text` as the type of the setting's current value."""

  def bad(kind: str) -> ConfigError:
    return ConfigError(f"--config.{key}={text}: expected {kind} (the setting is {current!r})")

  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
      return True
    if lowered in ("false", "0", "no", "off"):
      return False
    raise bad("true or false")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise bad("an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a number") from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    return _tuple(text, key)
  if isinstance(current, ml_collections.ConfigDict):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if not isinstance(value, dict):
      raise bad("a dict such as {'question': 'query'}, or set one key: --config." + key + ".NAME=VALUE")
    return ml_collections.ConfigDict(value)
  try:  # None and anything else: a Python literal, else the text
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _tuple(text: str, key: str) -> tuple:
  """A tuple from `a.jsonl`, `a.jsonl,b.jsonl`, `(64, 128)` or `()` (ml_collections' own rules, plus commas)."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return tuple(part for part in text.split(",") if part) if text else ()
  if isinstance(value, (tuple, list)):
    return tuple(value)
  return (value,)


def _setting(config: ml_collections.ConfigDict, key: str, flag: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the sub-config holding dotted `key`, its last part); a key that is not a setting fails, naming the nearest."""
  parent, _, leaf = key.rpartition(".")
  node = config
  for part in parent.split(".") if parent else ():
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and parent not in OPEN_MAPS):
    raise ConfigError(f"{flag}: not a setting{nearest(key, config)}")
  return node, leaf


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
  """Sets each (dotted key, text) of `--config.KEY=text` on `config`, the text parsed as the setting's type."""
  for key, text in overrides:
    node, leaf = _setting(config, key, f"--config.{key}")
    value = parse_value(text, node[leaf], key) if leaf in node else text
    try:
      node[leaf] = value
    except TypeError:
      raise ConfigError(
        f"--config.{key}={text}: a {type(value).__name__} for a {type(node[leaf]).__name__} setting ({node[leaf]!r})"
      ) from None


def update(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
  """Sets {dotted key: Python value} on `config` (from a notebook, say) with the same checks as the command line."""
  for key, value in values.items():
    node, leaf = _setting(config, key, key)
    try:
      node[leaf] = value
    except TypeError:
      raise ConfigError(f"{key}: a {type(value).__name__} for a {type(node[leaf]).__name__} setting") from None


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
  """(--config value, [(KEY, VALUE) of --config.KEY=VALUE], the other arguments), in order.

  `--config X`, `--config=X`, `--config.KEY=VALUE` and `--config.KEY VALUE` are all accepted.
  """
  spec, overrides, rest = None, [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--config" or arg.startswith("--config="):
      if "=" in arg:
        spec = arg.split("=", 1)[1]
      elif i + 1 < len(args):
        spec, i = args[i + 1], i + 1
      else:
        raise ConfigError("--config needs a value: a config file or a shipped name (" + ", ".join(shipped()) + ")")
    elif arg.startswith("--config."):
      key, eq, value = arg[len("--config.") :].partition("=")
      if not eq:
        if i + 1 >= len(args):
          raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
        value, i = args[i + 1], i + 1
      if not key:
        raise ConfigError(f"{arg}: no key; overrides look like --config.train.steps=100")
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return spec, overrides, rest


def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """The config `spec` names (a file or a shipped name) with `overrides` applied.

  A training config (one with a `model` section) is checked against `default_config()`, a
  data-only one (`tokenizer` and `data`, for `jaxtune data`) against `data_only_config()`.
  """
  from jaxtune.data.config import data_only_config
  from jaxtune.train.config import default_config

  path = find(spec)
  config = load_file(path)
  defaults = default_config() if "model" in config else data_only_config()
  check_keys(config, defaults, str(path))
  apply_overrides(config, overrides)
  return config


def dump(config: ml_collections.ConfigDict) -> None:
  """The config as `key = value` lines on stdout, sorted: what --print_config shows."""
  for key, value in sorted(leaves(config).items()):
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    print(f"{key} = {value!r}")
