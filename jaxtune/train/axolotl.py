"""Axolotl YAML configs, translated into ours: `jaxtune train --axolotl PATH.yml`.

`translate(mapping)` is a pure function from the YAML's mapping to (our config, the keys we do not
support, warnings); `load(path)` reads the file with `yaml.safe_load` and applies `--config.KEY=VALUE`
overrides on top. A key the YAML leaves out takes Axolotl's default (`DEFAULTS`), not ours, so that the
same file trains the same run; a key set to null counts as left out, as in Axolotl.

Three outcomes for every key: translated (`KEYS`, the table docs/axolotl.md repeats), listed in one
warning as not supported (an error under --strict), or, when we translate the key but cannot honour
its value (`train_on_eos: none`, an optimizer we lack), a ConfigError naming it. Nothing is dropped
silently.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import ml_collections

from jaxtune import configs
from jaxtune.errors import ConfigError

# Axolotl's defaults for the keys we translate (its pydantic schema, src/axolotl/utils/schemas/, and the
# Hugging Face Trainer's for those Axolotl leaves unset: seed, max_grad_norm, adam_*).
DEFAULTS = {
  "sequence_len": 512,
  "sample_packing": False,
  "excess_length_strategy": "drop",
  "train_on_inputs": False,
  "micro_batch_size": 1,
  "gradient_accumulation_steps": 1,
  "num_epochs": 1,
  "lr_scheduler": "cosine",
  "optimizer": "adamw_torch_fused",
  "weight_decay": 0.0,
  "max_grad_norm": 1.0,
  "adam_beta1": 0.9,
  "adam_beta2": 0.999,
  "adam_epsilon": 1e-8,
  "lora_dropout": 0.0,
  "val_set_size": 0.0,
  "output_dir": "./model-out",
  "bf16": "auto",
  "gradient_checkpointing": False,
  "seed": 42,
  "logging_steps": 10,
  # Per dataset (the chat_template strategy's defaults).
  "split": "train",
  "field_messages": "messages",
  "field_chosen": "chosen",
  "field_rejected": "rejected",
  "roles_to_train": ["assistant"],
  "train_on_eos": "turn",
}

# Axolotl key -> our key(s) -> what differs. docs/axolotl.md's table lists every key here (a test checks).
KEYS = {
  "base_model": ("model.path", "an HF directory or hub id, as given"),
  "datasets": ("data.train, data.format, data.field_map", "all entries must read the same way (one format per run)"),
  "datasets[].path": ("data.train", "a local file or directory must exist; `json`/`parquet`/`csv` take data_files"),
  "datasets[].data_files": ("data.train", "with path json, parquet or csv"),
  "datasets[].split": ("data.train (`id:split`)", "hub datasets; a local file has only `train`"),
  "datasets[].type": ("data.format", "chat_template -> messages/sharegpt, alpaca, completion -> text; pairs"),
  "datasets[].field_messages": ("data.field_map", "messages (SFT) or prompt (pairs)"),
  "datasets[].field_chosen": ("data.field_map", "pairs"),
  "datasets[].field_rejected": ("data.field_map", "pairs"),
  "datasets[].field": ("data.field_map", "completion: the text field"),
  "datasets[].message_property_mappings": ("data.format", "role/content -> messages, from/value -> sharegpt"),
  "datasets[].roles": ("-", "accepted when it maps roles as our readers already do"),
  "datasets[].roles_to_train": ("data.train_on", "[assistant] only"),
  "datasets[].train_on_eos": ("data.train_on", "turn only: each trained answer's end-of-turn token"),
  "datasets[].chat_template": ("data.chat_template", "as the top-level key"),
  "chat_template": ("data.chat_template", "tokenizer_default, llama3, jinja (+ chat_template_jinja)"),
  "chat_template_jinja": ("data.chat_template", "the template text"),
  "sequence_len": ("data.max_seq_len", ""),
  "excess_length_strategy": ("data.truncation", "drop (default) -> drop, truncate -> right"),
  "sample_packing": ("data.packing", ""),
  "train_on_inputs": ("data.train_on", "true -> all"),
  "adapter": ("peft.method", "lora, qlora -> lora; absent -> full"),
  "load_in_4bit": ("model.quantize=nf4, model.double_quant", "Axolotl's QLoRA: NF4 with double quantisation"),
  "load_in_8bit": ("model.quantize=int8", "row-absmax int8, not LLM.int8 (a warning says so)"),
  "lora_model_dir": ("model.adapter", "a PEFT adapter to continue from"),
  "lora_r": ("peft.lora.rank", "required with an adapter"),
  "lora_alpha": ("peft.lora.alpha", "required with an adapter"),
  "lora_dropout": ("peft.lora.dropout", ""),
  "lora_target_modules": ("peft.lora.targets", "HF names, comma-separated"),
  "lora_target_linear": ("peft.lora.targets", "all-linear (with lora_target_modules: their union)"),
  "peft_use_dora": ("peft.lora.use_dora", ""),
  "peft_use_rslora": ("peft.lora.use_rslora", ""),
  "micro_batch_size": ("data.batch_size", "x gradient_accumulation_steps x data-parallel devices"),
  "gradient_accumulation_steps": ("train.grad_accum", ""),
  "num_epochs": ("data.num_epochs, train.steps=0", "whole epochs"),
  "max_steps": ("train.steps", "data repeats as needed (data.num_epochs=0)"),
  "learning_rate": ("optim.lr", "required"),
  "lr_scheduler": ("optim.schedule", "cosine, linear, constant, constant_with_warmup"),
  "warmup_steps": ("optim.warmup_steps", ""),
  "warmup_ratio": ("optim.warmup_ratio", ""),
  "optimizer": ("optim.name", "the AdamW family -> adamw, lion -> lion, adafactor, sgd"),
  "adam_beta1": ("optim.b1", ""),
  "adam_beta2": ("optim.b2", ""),
  "adam_epsilon": ("optim.eps", ""),
  "weight_decay": ("optim.weight_decay", ""),
  "max_grad_norm": ("optim.clip_norm", ""),
  "val_set_size": ("data.validation_fraction", "a fraction below 1"),
  "output_dir": ("output_dir", ""),
  "bf16": ("model.dtype", "auto -> auto, true/full -> bfloat16"),
  "fp16": ("model.dtype", "float16 (dynamic loss scaling, as AMP's)"),
  "gradient_checkpointing": ("model.remat", "true/offload -> full, false -> none"),
  "seed": ("train.seed, data.seed", ""),
  "save_steps": ("checkpoint.every", "absent: the end of training only"),
  "eval_steps": ("train.eval_every", "absent: the end of training only"),
  "save_total_limit": ("checkpoint.keep", f"absent: every checkpoint ({10_000})"),
  "resume_from_checkpoint": ("resume=auto", "output_dir or a checkpoint under it"),
  "auto_resume_from_checkpoints": ("resume", "true -> auto"),
  "logging_steps": ("train.log_every", ""),
  "dataset_prepared_path": ("data.cache_dir", "where tokenised data is cached"),
  "wandb_project": ("logging.wandb_project", ""),
  "wandb_entity": ("logging.wandb_entity", ""),
  "wandb_name": ("logging.wandb_run_name", ""),
  "wandb_mode": ("logging.wandb_project", "disabled -> no W&B; online accepted"),
  "rl": ("objective (+ dpo.loss_type)", "dpo, ipo, orpo, kto, simpo, grpo"),
  "rl_beta": ("dpo.beta, kto.beta, simpo.beta, orpo.beta, grpo.beta", ""),
  "orpo_alpha": ("orpo.beta", "TRL's ORPO beta"),
  "simpo_gamma": ("simpo.gamma", ""),
  "cpo_alpha": ("-", "simpo: must be 0 (we add no NLL term)"),
  "kto_desirable_weight": ("kto.desirable_weight", ""),
  "kto_undesirable_weight": ("kto.undesirable_weight", ""),
  "max_prompt_len": ("data.max_prompt_length", "pairs and KTO"),
  "trl.beta": ("grpo.beta, ...", "before rl_beta, as in Axolotl"),
  "trl.num_generations": ("grpo.num_generations", ""),
  "trl.max_completion_length": ("grpo.max_completion_length", ""),
  "trl.temperature": ("grpo.temperature", ""),
  "trl.reward_funcs": ("grpo.reward_funcs", "module.function -> module:function"),
  "trl.reward_weights": ("grpo.reward_weights", ""),
}

KEEP_ALL = 10_000  # checkpoint.keep standing for Axolotl's save_total_limit unset: every checkpoint is kept
DTYPE = {"auto": "auto", True: "bfloat16", "full": "bfloat16"}
# Optimizers that are the AdamW update (decoupled weight decay, bias-corrected moments) exactly: fused or
# paged kernels change where the state lives, not the numbers.
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "paged_adamw_32bit", "adamw_anyprecision")
# The same update with 8-bit block-quantised moments (bitsandbytes): ours keeps them in float32.
ADAMW_8BIT = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "ao_adamw_8bit")
OPTIMIZERS = {
  **{name: "adamw" for name in ADAMW + ADAMW_8BIT},
  "lion_32bit": "lion",
  "paged_lion_32bit": "lion",
  "lion_8bit": "lion",
  "paged_lion_8bit": "lion",
  "adafactor": "adafactor",
  "sgd": "sgd",
}
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
# rl -> (objective, dpo loss type); the beta each reads.
RL = {
  "dpo": ("dpo", "sigmoid"),
  "ipo": ("dpo", "ipo"),
  "orpo": ("orpo", None),
  "kto": ("kto", None),
  "simpo": ("simpo", None),
  "grpo": ("grpo", None),
}
CHAT_TEMPLATES = {"tokenizer_default": "", "llama3": "llama3"}  # Axolotl name -> ours (same rendering)
SFT_TYPES = ("chat_template", "chat_template.default", "alpaca", "completion", "input_output")
PAIR_TYPES = ("chat_template", "chat_template.default")
# Roles our record readers already map (records.py): Axolotl's `roles` may restate them, not add others.
KNOWN_ROLES = {
  "system": {"system"},
  "user": {"user", "human"},
  "assistant": {"assistant", "gpt", "model"},
}
LOCAL_FORMATS = ("json", "parquet", "csv", "text", "arrow")  # `path: json` + data_files: local files
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


@dataclasses.dataclass
class Translation:
  config: ml_collections.ConfigDict
  unsupported: list[str]  # Axolotl keys we do not translate, e.g. "tf32", "datasets[0].shards"
  warnings: list[str]  # where a translated key behaves differently from Axolotl


class _Reader:
  """An Axolotl mapping read key by key: what was read is translated, what was not is reported."""

  def __init__(self, raw: dict, prefix: str = ""):
    self.raw, self.prefix, self.read = raw, prefix, set()

  def get(self, key: str, default: Any = None) -> Any:
    self.read.add(key)
    value = self.raw.get(key)
    return (DEFAULTS.get(key) if default is None else default) if value is None else value

  def has(self, key: str) -> bool:
    self.read.add(key)
    return self.raw.get(key) is not None

  def unread(self) -> list[str]:
    return [f"{self.prefix}{k}" for k, v in self.raw.items() if k not in self.read and v is not None]


def _fail(key: str, problem: str, fix: str = "") -> None:
  raise ConfigError(f"{key}: {problem}" + (f"; {fix}" if fix else "") + ".")


def _number(r: _Reader, key: str, kind: type = float) -> Any:
  value = r.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    _fail(r.prefix + key, f"{value!r} is not a number")
  try:
    number = float(value)  # Axolotl reads learning_rate: "2e-4" as well
  except ValueError:
    _fail(r.prefix + key, f"{value!r} is not a number")
  if kind is int:
    if number != int(number):
      _fail(r.prefix + key, f"{value!r} is not a whole number")
    return int(number)
  return number


def _bool(r: _Reader, key: str) -> bool:
  value = r.get(key)
  if not isinstance(value, bool):
    _fail(r.prefix + key, f"{value!r} is not true or false")
  return value


def translate(raw: Any, *, devices: int = 1) -> Translation:
  """Our config for the Axolotl mapping `raw` (a parsed YAML), on `devices` data-parallel devices."""
  from jaxtune.train.config import default_config

  if not isinstance(raw, dict):
    raise ConfigError(f"the Axolotl config is {type(raw).__name__}, not a mapping of keys to values")
  r = _Reader(raw)
  c = default_config()
  warnings: list[str] = []

  if not r.has("base_model"):
    _fail("base_model", "not set", "name the model to fine-tune (an HF directory or hub id)")
  c.model.path = str(r.get("base_model"))
  c.output_dir = str(r.get("output_dir"))

  _objective(r, c)
  datasets, data_unread = _datasets(r, c)
  _data(r, c, datasets)
  _peft(r, c, warnings)
  _batches(r, c, devices)
  _optimizer(r, c, warnings)
  _run(r, c, warnings)
  return Translation(c, r.unread() + data_unread, warnings)


def _objective(r: _Reader, c: ml_collections.ConfigDict) -> None:
  rl = r.get("rl")
  trl = r.get("trl") or {}
  if not isinstance(trl, dict):
    _fail("trl", f"{trl!r} is not a mapping")
  beta = trl.get("beta") if trl.get("beta") is not None else r.get("rl_beta")
  if rl != "grpo":  # only GRPO reads trl's settings; elsewhere (but for beta) each is listed as not supported
    r.raw = {**r.raw, **{f"trl.{k}": v for k, v in trl.items() if k != "beta" or rl is None}}
  if rl is None:
    r.read.discard("rl_beta")  # without rl it means nothing: listed as not supported, like any unread key
    return
  if rl not in RL:
    _fail("rl", f"{rl!r} is not one we train", f"choose one of {', '.join(RL)}")
  c.objective, loss_type = RL[rl]
  if loss_type:
    c.dpo.loss_type = loss_type
  if rl == "orpo":
    beta = beta if beta is not None else r.get("orpo_alpha")
  if beta is not None:
    c[c.objective].beta = float(beta)
  if rl == "simpo":
    c.simpo.gamma = float(r.get("simpo_gamma", 0.5))
    if float(r.get("cpo_alpha", 1.0)) != 0.0:
      _fail(
        "cpo_alpha",
        "Axolotl's simpo adds TRL's CPO negative log-likelihood term (cpo_alpha, 1.0 unless set), and ours has none",
        "set cpo_alpha: 0",
      )
  if rl == "kto":
    c.kto.desirable_weight = float(r.get("kto_desirable_weight", 1.0))
    c.kto.undesirable_weight = float(r.get("kto_undesirable_weight", 1.0))
  if r.has("max_prompt_len"):
    c.data.max_prompt_length = _number(r, "max_prompt_len", int)
  if rl == "grpo":
    _grpo(trl, c)


def _grpo(trl: dict, c: ml_collections.ConfigDict) -> None:
  g = c.grpo
  for key, kind in (("num_generations", int), ("max_completion_length", int), ("temperature", float)):
    if trl.get(key) is not None:
      g[key] = kind(trl[key])
  funcs = trl.get("reward_funcs")
  if not funcs:
    _fail("trl.reward_funcs", "not set; GRPO needs rewards", "name reward functions as module.function")
  funcs = [funcs] if isinstance(funcs, str) else list(funcs)
  g.reward_funcs = tuple(f if ":" in f or "." not in f else "{}:{}".format(*f.rsplit(".", 1)) for f in funcs)
  if trl.get("reward_weights") is not None:
    g.reward_weights = tuple(float(w) for w in trl["reward_weights"])
  known = {"beta", "num_generations", "max_completion_length", "temperature", "reward_funcs", "reward_weights"}
  extra = sorted(k for k, v in trl.items() if k not in known and v is not None)
  if extra:
    _fail("trl", f"{', '.join('trl.' + k for k in extra)} not supported for GRPO", "remove them")


def _datasets(r: _Reader, c: ml_collections.ConfigDict) -> tuple[list[dict], list[str]]:
  """Each dataset's reading (format, field_map, train_on, chat template) and source; they must agree."""
  entries = r.get("datasets")
  if not entries or not isinstance(entries, list):
    _fail("datasets", "not set, or not a list", "list at least one dataset: - path: data.jsonl")
  readings, unread = [], []
  for i, entry in enumerate(entries):
    key = f"datasets[{i}]"
    if isinstance(entry, str):
      entry = {"path": entry}
    if not isinstance(entry, dict):
      _fail(key, f"{entry!r} is not a mapping", "write each dataset as a mapping with path and type")
    d = _Reader(entry, key + ".")
    readings.append(_dataset(d, c.objective, r))
    unread += d.unread()
  first = readings[0]
  for i, reading in enumerate(readings[1:], 1):
    if reading["how"] != first["how"]:
      _fail(
        f"datasets[{i}]",
        f"reads as {reading['how']}, but datasets[0] as {first['how']}",
        "jaxtune reads all training data one way: give them the same type and fields, or train them separately",
      )
  return readings, unread


def _dataset(d: _Reader, objective: str, r: _Reader) -> dict:
  key = d.prefix
  path = d.get("path")
  if path is None:
    _fail(key + "path", "not set", "name a local file or directory, or a hub dataset id")
  path = str(path)
  files = d.get("data_files")
  if path in LOCAL_FORMATS or d.has("ds_type"):
    if files is None:
      _fail(key + "data_files", f"not set, but path is {path!r}", "list the files")
    sources = [files] if isinstance(files, str) else list(files)
  elif files is not None:
    _fail(key + "data_files", "set with a dataset path", "use path: json (or parquet, csv) with data_files")
  else:
    sources = [path]
  split = str(d.get("split"))
  out = []
  for source in sources:
    local = pathlib.Path(source).expanduser()
    looks_local = local.exists() or source.startswith((".", "/", "~")) or local.suffix in DATA_SUFFIXES
    if looks_local or files is not None:
      if not local.exists():
        _fail(
          key + ("data_files" if files else "path"), f"{source} does not exist", "give an existing file or directory"
        )
      if split != "train":
        _fail(key + "split", f"{split!r}, but a local file has only the train split", "remove split")
      out.append(source)
    else:
      out.append(source if split == "train" else f"{source}:{split}")

  how = _reading(d, objective, r)
  return {"sources": out, "how": how}


def _reading(d: _Reader, objective: str, r: _Reader) -> tuple:
  """(format, field_map items, train_on, chat template) of one dataset entry."""
  key = d.prefix
  kind = d.get("type")
  if isinstance(kind, dict):
    _fail(key + "type", "a custom prompt format is not supported", "convert the records to chat messages")
  top = _chat_template(r, "")  # read even where each dataset names its own, so that it is never listed as ignored
  template = _chat_template(d, key) if d.has("chat_template") else top
  if objective in ("dpo", "orpo", "simpo", "kto", "grpo"):
    if kind is not None and kind not in PAIR_TYPES:
      _fail(key + "type", f"{kind!r} is not a type we read for rl", f"use {PAIR_TYPES[0]} records")
    _messages_keys(d, key)
    fields = {"prompt": str(d.get("field_messages"))}  # the conversation before the answers
    if objective in ("dpo", "orpo", "simpo"):
      fields["chosen"] = str(d.get("field_chosen"))
      fields["rejected"] = str(d.get("field_rejected"))
    fmt = {"kto": "kto", "grpo": "auto"}.get(objective, "preference")
    _train_on(d, r, key, chat=True)
    field_map = tuple(sorted((k, v) for k, v in fields.items() if k != v))
    return (fmt, field_map, "assistant", template)
  if kind is None:
    _fail(key + "type", "not set", f"choose one of {', '.join(SFT_TYPES)}")
  if kind == "input_output":
    _fail(
      key + "type",
      "input_output's labelled segments have no equivalent here (we mask by chat role, not by segment)",
      "write the records as chat messages (type: chat_template) or instruction/output (type: alpaca)",
    )
  if kind not in SFT_TYPES:
    _fail(key + "type", f"{kind!r} is not a type we read", f"choose one of {', '.join(SFT_TYPES[:-1])}")
  if kind == "completion":
    field = str(d.get("field", "text"))
    return ("text", (("text", field),) if field != "text" else (), "all", template)
  train_on = _train_on(d, r, key, chat=kind.startswith("chat_template"))
  if kind == "alpaca":
    fields = {name: d.get(f"field_{name}", name) for name in ("instruction", "input", "output")}
    return ("alpaca", tuple(sorted((k, str(v)) for k, v in fields.items() if k != v)), train_on, template)
  fmt = _messages_keys(d, key)
  field = str(d.get("field_messages"))
  return (fmt, (("messages", field),) if field != "messages" else (), train_on, template)


def _messages_keys(d: _Reader, key: str) -> str:
  """messages (role/content) or sharegpt (from/value) from message_property_mappings; checks `roles`."""
  mappings = d.get("message_property_mappings") or {}
  role = mappings.get("role", d.get("message_field_role", "role"))
  content = mappings.get("content", d.get("message_field_content", "content"))
  extra = sorted(set(mappings) - {"role", "content"})
  if extra:
    _fail(key + "message_property_mappings", f"{extra} are not properties we read", "map role and content only")
  layouts = {("role", "content"): "messages", ("from", "value"): "sharegpt"}
  if (role, content) not in layouts:
    _fail(
      key + "message_property_mappings",
      f"role: {role}, content: {content} is not a layout we read",
      "rename the fields to role/content (or from/value)",
    )
  roles = d.get("roles") or {}
  for target, names in roles.items():
    unknown = sorted(set(names if isinstance(names, list) else [names]) - KNOWN_ROLES.get(target, set()))
    if unknown:
      _fail(
        key + "roles",
        f"{target}: {unknown} are roles our readers do not map to {target}",
        "rename them in the data to " + ", ".join(sorted(KNOWN_ROLES.get(target, {target}))),
      )
  return layouts[(role, content)]


def _train_on(d: _Reader, r: _Reader, key: str, *, chat: bool) -> str:
  """data.train_on from train_on_inputs, roles_to_train and train_on_eos (the chat_template strategy's)."""
  train_inputs = d.get("train_on_inputs", r.get("train_on_inputs"))
  if not isinstance(train_inputs, bool):
    _fail(key + "train_on_inputs", f"{train_inputs!r} is not true or false")
  roles = d.get("roles_to_train")
  if chat and roles != ["assistant"] and not train_inputs:
    _fail(key + "roles_to_train", f"{roles}: we train the assistant's turns only", "use [assistant]")
  eos = d.get("train_on_eos")
  if chat and eos != "turn" and not train_inputs:
    _fail(
      key + "train_on_eos",
      f"{eos!r}: we train the end-of-turn token of each trained answer, and no other",
      "use turn (Axolotl's default)",
    )
  return "all" if train_inputs else "assistant"


def _chat_template(r: _Reader, key: str) -> str:
  name = r.get("chat_template")
  if name is None:
    return ""
  if name == "jinja":
    text = r.get("chat_template_jinja")
    if not text:
      _fail(key + "chat_template_jinja", "not set, but chat_template is jinja", "give the template text")
    return str(text)
  if name not in CHAT_TEMPLATES:
    _fail(
      key + "chat_template",
      f"{name!r} is not a template we ship with the same rendering",
      "use tokenizer_default, llama3, or jinja with chat_template_jinja set to the template's text",
    )
  return CHAT_TEMPLATES[name]


def _data(r: _Reader, c: ml_collections.ConfigDict, datasets: list[dict]) -> None:
  fmt, field_map, train_on, template = datasets[0]["how"]
  data = c.data
  data.train = tuple(s for d in datasets for s in d["sources"])
  data.format = fmt
  data.field_map = ml_collections.ConfigDict(dict(field_map))
  data.train_on = train_on
  data.chat_template = template
  data.max_seq_len = _number(r, "sequence_len", int)
  data.packing = _bool(r, "sample_packing")
  excess = r.get("excess_length_strategy")
  if excess not in ("drop", "truncate"):
    _fail("excess_length_strategy", f"{excess!r} is not drop or truncate", "use drop or truncate")
  data.truncation = "drop" if excess == "drop" else "right"
  val = _number(r, "val_set_size")
  if not 0.0 <= val < 1.0:
    _fail("val_set_size", f"{val} is not a fraction below 1", "give the share to hold out, e.g. 0.05")
  data.validation_fraction = val
  if r.has("dataset_prepared_path"):
    data.cache_dir = str(r.get("dataset_prepared_path"))


def _peft(r: _Reader, c: ml_collections.ConfigDict, warnings: list[str]) -> None:
  adapter = r.get("adapter")
  four, eight = bool(r.get("load_in_4bit")), bool(r.get("load_in_8bit"))
  if adapter is None:
    if four or eight:
      _fail("load_in_4bit / load_in_8bit", "a quantised base needs an adapter", "set adapter: qlora or lora")
    c.peft.method = "full"
    return
  if adapter not in ("lora", "qlora"):
    _fail("adapter", f"{adapter!r} is not one we train", "use lora or qlora")
  if adapter == "qlora" and not four:
    _fail("adapter", "qlora needs load_in_4bit: true (as in Axolotl)", "set load_in_4bit: true")
  if four and eight:
    _fail("load_in_8bit", "set together with load_in_4bit", "choose one")
  c.peft.method = "lora"
  if four:
    c.model.quantize, c.model.double_quant = "nf4", True  # bitsandbytes' nf4 with double quant, as Axolotl loads it
  if eight:
    c.model.quantize = "int8"
    warnings.append(
      "load_in_8bit: stored as int8 with one absmax per output row (bitsandbytes' int8_vectorwise); Axolotl's "
      "LLM.int8 also keeps outlier input features in 16 bits, so the frozen weights round differently"
    )
  for key in ("lora_r", "lora_alpha"):
    if not r.has(key):
      _fail(key, f"not set with adapter: {adapter}", "give the LoRA rank and alpha (e.g. lora_r: 16, lora_alpha: 32)")
  c.peft.lora.rank = _number(r, "lora_r", int)
  c.peft.lora.alpha = _number(r, "lora_alpha")
  c.peft.lora.dropout = _number(r, "lora_dropout")
  c.peft.lora.use_dora = bool(r.get("peft_use_dora", False))
  c.peft.lora.use_rslora = bool(r.get("peft_use_rslora", False))
  modules = r.get("lora_target_modules") or []
  modules = [modules] if isinstance(modules, str) else [str(m) for m in modules]
  linear = bool(r.get("lora_target_linear", False))
  if not modules and not linear:
    _fail("lora_target_modules", "not set, and lora_target_linear is not true", "name the modules or set one")
  all_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  if linear:
    modules = list(all_linear) + [m for m in modules if m not in all_linear]
  c.peft.lora.targets = "all-linear" if sorted(modules) == sorted(all_linear) else ",".join(modules)
  if r.has("lora_model_dir"):
    c.model.adapter = str(r.get("lora_model_dir"))


def _batches(r: _Reader, c: ml_collections.ConfigDict, devices: int) -> None:
  micro = _number(r, "micro_batch_size", int)
  accum = _number(r, "gradient_accumulation_steps", int)
  if micro < 1 or accum < 1:
    _fail("micro_batch_size / gradient_accumulation_steps", "must be >= 1")
  c.data.batch_size = micro * accum * devices  # Axolotl's micro-batch is per device; ours is the global batch
  c.train.grad_accum = accum
  epochs = _number(r, "num_epochs")
  if r.has("max_steps"):
    c.train.steps = _number(r, "max_steps", int)
    c.data.num_epochs = 0  # the Trainer repeats the data until max_steps
  else:
    if epochs != int(epochs) or epochs < 1:
      _fail("num_epochs", f"{epochs}: we train whole epochs", "give a whole number, or max_steps")
    c.train.steps = 0
    c.data.num_epochs = int(epochs)


def _optimizer(r: _Reader, c: ml_collections.ConfigDict, warnings: list[str]) -> None:
  o = c.optim
  if not r.has("learning_rate"):
    _fail("learning_rate", "not set (Axolotl requires it)", "e.g. learning_rate: 0.0002")
  o.lr = _number(r, "learning_rate")
  name = r.get("optimizer")
  if name not in OPTIMIZERS:
    _fail("optimizer", f"{name!r} has no equivalent here", f"use one of {', '.join(OPTIMIZERS)}")
  o.name = OPTIMIZERS[name]
  if name in ADAMW_8BIT or name.endswith("lion_8bit"):
    warnings.append(
      f"optimizer: {name} keeps 8-bit optimizer state; ours keeps it in float32 (same update, more memory)"
    )
  o.b1 = 0.0 if name == "sgd" else _number(r, "adam_beta1")  # the Trainer's SGD has no momentum
  o.b2, o.eps = _number(r, "adam_beta2"), _number(r, "adam_epsilon")
  o.weight_decay = _number(r, "weight_decay")
  o.clip_norm = _number(r, "max_grad_norm")
  schedule = r.get("lr_scheduler")
  if schedule not in SCHEDULES:
    _fail("lr_scheduler", f"{schedule!r} has no equivalent here", f"use one of {', '.join(SCHEDULES)}")
  o.schedule = SCHEDULES[schedule]
  if r.has("warmup_steps") and r.has("warmup_ratio"):
    _fail("warmup_steps / warmup_ratio", "both set", "set one of them")
  if schedule == "constant":  # the Trainer's "constant" has no warmup
    if r.has("warmup_steps") or r.has("warmup_ratio"):
      warnings.append("lr_scheduler: constant ignores warmup (as the Trainer does); use constant_with_warmup")
    return
  if r.has("warmup_steps"):
    o.warmup_steps = _number(r, "warmup_steps", int)
  if r.has("warmup_ratio"):
    o.warmup_ratio = _number(r, "warmup_ratio")


def _run(r: _Reader, c: ml_collections.ConfigDict, warnings: list[str]) -> None:
  fp16, bf16 = r.get("fp16"), r.get("bf16")
  if fp16 is True and bf16 is True:
    _fail("bf16 / fp16", "both true", "choose one")
  if fp16 is True:
    c.model.dtype = "float16"
  elif bf16 in DTYPE:
    c.model.dtype = DTYPE[bf16]
  elif bf16 is False:
    c.model.dtype = "float32"
  else:
    _fail("bf16", f"{bf16!r} is not auto, full, true or false")
  checkpointing = r.get("gradient_checkpointing")
  if checkpointing not in (True, False, "offload", "offload_disk"):
    _fail("gradient_checkpointing", f"{checkpointing!r} is not true, false or offload")
  if checkpointing in ("offload", "offload_disk"):
    warnings.append(f"gradient_checkpointing: {checkpointing} recomputes activations here instead of offloading them")
  c.model.remat = "none" if checkpointing is False else "full"
  seed = _number(r, "seed", int)
  c.train.seed = c.data.seed = seed
  c.train.log_every = _number(r, "logging_steps", int)

  for key, section, field in (("save_steps", c.checkpoint, "every"), ("eval_steps", c.train, "eval_every")):
    if r.has(key):
      value = r.get(key)
      if isinstance(value, float) and value < 1:
        _fail(key, f"{value}: a fraction of the run", "give a number of steps")
      section[field] = _number(r, key, int)
    else:
      section[field] = 0  # Axolotl saves and evaluates each epoch; we do at the end of training
  if not c.data.validation_fraction:
    c.train.eval_every = 0  # no validation split: Axolotl evaluates nothing either
  c.checkpoint.keep = _number(r, "save_total_limit", int) if r.has("save_total_limit") else KEEP_ALL

  c.resume = "never"  # Axolotl starts afresh unless told to resume; ours refuses to overwrite a run instead
  if r.has("resume_from_checkpoint"):
    where = pathlib.Path(str(r.get("resume_from_checkpoint"))).expanduser().resolve()
    run = pathlib.Path(c.output_dir).expanduser().resolve()
    if where != run and run not in where.parents:
      _fail(
        "resume_from_checkpoint",
        f"{where} is not under output_dir ({run}); we resume from our own checkpoints in output_dir",
        "set output_dir to the run to continue",
      )
    c.resume = "auto"
  if r.get("auto_resume_from_checkpoints") is True:
    c.resume = "auto"

  mode = r.get("wandb_mode")
  if mode not in (None, "online", "disabled"):
    _fail("wandb_mode", f"{mode!r} is not online or disabled")
  if mode != "disabled":
    c.logging.wandb_project = str(r.get("wandb_project", ""))
    c.logging.wandb_entity = str(r.get("wandb_entity", ""))
    c.logging.wandb_run_name = str(r.get("wandb_name", ""))
  else:
    for key in ("wandb_project", "wandb_entity", "wandb_name"):
      r.read.add(key)


def _one_line(unsupported: Sequence[str]) -> str:
  return f"not supported, ignored: {', '.join(unsupported)}"


def load(
  path: str | pathlib.Path,
  overrides: Sequence[tuple[str, str]] = (),
  *,
  strict: bool = False,
  devices: int = 1,
  warn: Any = None,
) -> ml_collections.ConfigDict:
  """Our config for the Axolotl YAML at `path`, `overrides` applied; each warning goes to `warn(text)`.

  Unsupported keys are one warning, or under `strict` one ConfigError.
  """
  import yaml

  path = pathlib.Path(path).expanduser()
  try:
    raw = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
  try:
    result = translate(raw, devices=devices)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  if result.unsupported and strict:
    raise ConfigError(f"{path}: {_one_line(result.unsupported)} (--strict); remove them, or drop --strict")
  messages = ([_one_line(result.unsupported)] if result.unsupported else []) + result.warnings
  for message in messages:
    (warn or _stderr)(f"{path}: {message}")
  configs.apply_overrides(result.config, overrides)
  return result.config


def _stderr(text: str) -> None:
  import sys

  print(f"warning: {text}", file=sys.stderr, flush=True)
