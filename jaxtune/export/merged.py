"""Merged export: the model with its LoRA (or DoRA) adapters or IA3 vectors folded in, as a Hugging Face
checkpoint directory.

Loadable by `transformers.AutoModelForCausalLM.from_pretrained` and by vLLM: safetensors
shards (+ `model.safetensors.index.json` past `max_shard_bytes`), the source checkpoint's
config.json with the new dtype, a generation_config.json whose EOS ids include every
end-of-turn token, and the source's tokenizer and chat-template files.

Each tensor is computed only when the writer reaches it (one layer's slice of a stacked
parameter, the adapter folded in float32, then cast), so the host holds the model plus one tensor.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings
from typing import Any

import jax
import numpy as np

from jaxtune.export import files, staging
from jaxtune.export.files import ExportError, TensorSpec
from jaxtune.hf import mapping
from jaxtune.hf.tokens import END_OF_TURN_TOKENS
from jaxtune.models.config import ModelConfig, from_hf_dict
from jaxtune.models.transformer import CausalLM, Linear, take_layer
from jaxtune.peft.ia3 import IA3
from jaxtune.peft.lora import LoRA, merge_kernel

DEFAULT_MAX_SHARD_BYTES = files.DEFAULT_MAX_SHARD_BYTES


def _module_at(model: CausalLM, path: tuple[str, ...]) -> Any:
  module = model
  for name in path:
    module = getattr(module, name)
  return module


def _merged_kernel(linear: Linear, i: int | None) -> jax.Array:
  """The kernel with its adapter merged (`merge_kernel`, float32), for layer i of a stacked Linear (or the whole
  unstacked one); a quantised kernel is merged as it dequantises."""
  adapter = linear.adapter
  if isinstance(adapter, IA3):
    scale = adapter.ia3_l[...]
    return adapter.merge(linear.kernel_value(i), scale if i is None else take_layer(scale, i))
  arrays = [adapter.lora_a[...], adapter.lora_b[...]] + ([adapter.lora_magnitude[...]] if adapter.use_dora else [])
  if i is not None:
    arrays = [take_layer(x, i) for x in arrays]
  return merge_kernel(linear.kernel_value(i), *arrays[:2], adapter, *arrays[2:])


def hf_tensors(model: CausalLM, dtype: Any) -> list[TensorSpec]:
  """Every Hugging Face tensor of the model, in checkpoint order, each computed when asked for.

  Adapters (LoRA or DoRA) are folded in (in float32) before the cast to `dtype`; tied embeddings
  give no lm_head tensor. A model with a score head (a reward model) is written as transformers'
  *ForSequenceClassification: the backbone, `score.weight` [labels, D], no lm_head.
  """
  if getattr(model, "virtual", None) is not None:
    raise ExportError(
      f"the model has {model.virtual.method} tuning's virtual tokens, which no weight of the base can hold; "
      "export the adapter (--format adapter) instead."
    )
  dtype = np.dtype(dtype)
  cfg = model.config
  specs = []
  scorer = model.score is not None
  for tmap in mapping.tensor_maps(cfg):
    if scorer and tmap.path[0] == "lm_head":
      continue
    owner = _module_at(model, tmap.path[:-1])
    var = getattr(owner, tmap.path[-1])
    adapted = tmap.path[-1] == "kernel" and isinstance(owner, Linear) and isinstance(owner.adapter, (LoRA, IA3))
    # IA3 scales the bias of a module whose output it scales, as PEFT's merge does.
    scaled_bias = tmap.path[-1] == "bias" and isinstance(owner, Linear) and isinstance(owner.adapter, IA3)
    for i, name in enumerate(tmap.hf_names(cfg.num_layers)):
      layer = i if tmap.stacked else None

      def produce(tmap=tmap, owner=owner, var=var, adapted=adapted, scaled_bias=scaled_bias, layer=layer):
        if adapted:
          value = _merged_kernel(owner, layer)
        elif scaled_bias:
          scale, bias = owner.adapter.ia3_l[...], var[...]
          pick = (lambda x: x) if layer is None else (lambda x: take_layer(x, layer))
          value = owner.adapter.merge_bias(pick(bias), pick(scale))
        elif isinstance(owner, Linear) and tmap.path[-1] == "kernel":
          value = owner.kernel_value(layer)
        else:
          value = var[...] if layer is None else take_layer(var[...], layer)
        return np.asarray(tmap.to_hf(np.asarray(jax.device_get(value)))).astype(dtype)

      specs.append(TensorSpec(name, tmap.hf_shape, dtype, produce))
  if scorer:
    kernel = model.score  # [D, labels]; HF's Linear stores [labels, D]
    produce = lambda: np.asarray(jax.device_get(kernel[...])).T.astype(dtype)
    specs.append(TensorSpec(SCORE_TENSOR, kernel.shape[::-1], dtype, produce))
  return specs


SCORE_TENSOR = "score.weight"


def scorer_config(hf_config: dict, labels: int, pad_id: int) -> dict:
  """config.json of the *ForSequenceClassification twin of a causal LM config.

  pad_token_id is what transformers pools by (each sequence's last token that is not a pad);
  without it a batch of more than one sequence cannot be scored.
  """
  arch = [a.replace("ForCausalLM", "ForSequenceClassification") for a in hf_config.get("architectures") or []]
  config = dict(hf_config, architectures=arch, pad_token_id=int(pad_id))
  config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
  config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
  return config


def check_matches_source(cfg: ModelConfig, hf_config: dict, where: pathlib.Path) -> None:
  """The model must have the architecture of the source config.json whose files the export reuses.

  A ModelConfig holds the architecture only (run options live in the model's ModelOptions), so the
  two compare whole."""
  source = from_hf_dict(hf_config, where=str(where))
  if cfg != source:
    short = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
    diffs = [
      f"{f.name}: model {short(getattr(cfg, f.name))}, config.json {short(getattr(source, f.name))}"
      for f in dataclasses.fields(source)
      if getattr(cfg, f.name) != getattr(source, f.name)
    ]
    raise ExportError(
      f"{where}: describes a different model than the one being exported ({'; '.join(diffs[:4])}); "
      "pass the checkpoint directory the model was loaded from."
    )


def generation_config(source_dir: pathlib.Path, hf_config: dict) -> dict:
  """The source's generation_config.json with every end-of-turn token of the tokenizer among the EOS ids."""
  path = source_dir / "generation_config.json"
  gen = (
    files.read_json(path)
    if path.is_file()
    else {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
  )
  eos = gen.get("eos_token_id", hf_config.get("eos_token_id"))
  ids = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
  added = files.added_tokens(source_dir)
  tok_cfg_path = source_dir / "tokenizer_config.json"
  eos_token = files.read_json(tok_cfg_path).get("eos_token") if tok_cfg_path.is_file() else None
  eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
  ids += [added[t] for t in (eos_token, *END_OF_TURN_TOKENS) if t in added]
  ids = list(dict.fromkeys(int(i) for i in ids))
  if ids:
    gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
  return gen


def export_merged(
  model: CausalLM,
  source_dir: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  dtype: Any = None,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  overwrite: bool = False,
  chat_template: str | None = None,
  pad_id: int | None = None,
) -> pathlib.Path:
  """Writes `model` (adapters merged) as an HF checkpoint in `out_dir`; returns the directory.

  source_dir: the HF checkpoint the model was loaded from (config.json, generation and
  tokenizer files are taken from it). dtype: of the written tensors; default the source's.
  chat_template: made the tokenizer's chat template instead of the source's (a run's
  `data.chat_template`). The directory appears only once complete and checked (export/staging.py).
  pad_id: for a reward model (a score head), the pad token its config names, which decides
  where transformers pools; required then.
  """
  source = pathlib.Path(source_dir).expanduser()
  hf_config = files.read_json(source / "config.json")
  check_matches_source(model.config, hf_config, source / "config.json")
  dtype = files.dtype_of(dtype) if dtype is not None else files.source_dtype(source)
  files.check_not_source(out_dir, source)
  with staging.staged(out_dir, overwrite=overwrite, patterns=files.MODEL_PATTERNS) as stage:
    _write(model, source, hf_config, stage, dtype, max_shard_bytes, pad_id)
    if chat_template:
      files.write_chat_template(stage.path, chat_template)
  return pathlib.Path(out_dir).expanduser().absolute()


def _write(
  model: CausalLM,
  source: pathlib.Path,
  hf_config: dict,
  stage: staging.Stage,
  dtype,
  max_shard_bytes: int,
  pad_id: int | None = None,
):
  out = stage.path
  files.write_sharded(out, hf_tensors(model, dtype), max_shard_bytes, stage.record)

  config = {k: v for k, v in hf_config.items() if k != "torch_dtype"}  # transformers 5: `dtype` replaces it
  if model.score is not None:
    if pad_id is None:
      raise ExportError("a reward model's export needs the pad token it pools by (pad_id).")
    config = scorer_config(config, model.score.shape[1], pad_id)
  config["dtype"] = dtype.name
  files.write_json(out / "config.json", config)
  files.write_json(out / "generation_config.json", generation_config(source, hf_config))
  if not files.copy_tokenizer_files(source, out):
    warnings.warn(
      f"{source} holds no tokenizer files, so the export has none: copy them there before serving.", stacklevel=3
    )
