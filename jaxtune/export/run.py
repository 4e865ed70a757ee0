"""A training run's model at a checkpoint step, and its export in one call.

RUN_DIR/checkpoints/STEP/{state, meta, config} (jaxtune.train.checkpoint). Only the
trained parameters (`state.params`) are read, not the optimizer state: for LoRA the
adapters (the base comes from the run's `model.path`), for full fine-tuning every weight
(restored straight into an abstract model, so the base is never loaded). They are checked
against the checksums the trainer saved.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxtune.data import templates
from jaxtune.export import files, staging
from jaxtune.export import gguf as gguf_export
from jaxtune.export.adapter import ADAPTER_PATTERNS, export_adapter
from jaxtune.export.files import ExportError
from jaxtune.export.merged import DEFAULT_MAX_SHARD_BYTES, export_merged
from jaxtune.hf import load as hf_load
from jaxtune.hf import tokens as tokens_lib
from jaxtune.models import options as options_lib
from jaxtune.models.config import ModelConfig, load_config
from jaxtune.models.options import ModelOptions
from jaxtune.models.transformer import CausalLM, HeadParam
from jaxtune.peft import methods as peft_methods
from jaxtune.peft.lora import AdapterParam, LoRADropoutKey
from jaxtune.train import builtin_models
from jaxtune.train import checkpoint as ckpt_lib

FORMATS = ("merged", "adapter", "gguf")
ADAPTER_METHODS = ("lora", "ia3", "prompt", "prefix")


@dataclasses.dataclass
class RunModel:
  """A run's model at one step and where it came from."""

  model: CausalLM
  step: int
  method: str  # "lora" | "ia3" | "prompt" | "prefix" | "full"
  source_dir: pathlib.Path  # the HF checkpoint the run started from (config, tokenizer, chat template)
  base_model: str  # the base as PEFT / vLLM should name it in an adapter config
  config: dict  # the run's resolved config, as saved with the checkpoint


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
  """Steps with a complete checkpoint in RUN_DIR/checkpoints (Orbax names a step's directory when it is done)."""
  directory = pathlib.Path(run_dir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def _step_dir(run_dir: pathlib.Path, step: int | None) -> pathlib.Path:
  if not run_dir.is_dir():
    raise ExportError(f"{run_dir}: not a directory; pass --run the output_dir of a training run.")
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise ExportError(
      f"{run_dir}: no checkpoint found (nothing complete under {run_dir / 'checkpoints'}); train "
      "first (python -m jaxtune.train --config ... --config.output_dir=RUN_DIR), or pass the run "
      "directory that holds checkpoints/."
    )
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise ExportError(
      f"{run_dir / 'checkpoints'}: no checkpoint for step {step}; it holds steps "
      f"{', '.join(map(str, steps))}. Pass one of them to --step, or leave --step out for the "
      "latest."
    )
  return run_dir / "checkpoints" / str(step)


def _json_item(path: pathlib.Path) -> dict:
  try:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)
  except Exception as e:  # any unreadable item gets the same advice
    raise ExportError(
      f"{path}: cannot be read ({type(e).__name__}: {e}); the checkpoint is incomplete or "
      "corrupt: export another step with --step."
    ) from None


def _restore_params(step_dir: pathlib.Path, like: Any) -> Any:
  """The checkpoint's `params` subtree, shaped like `like` (a pure dict of arrays or shape structs), verified."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(global_shape=x.shape, dtype=x.dtype, sharding=device), abstract)
  try:
    got = ocp.PyTreeCheckpointer().restore(
      step_dir / "state",
      args=ocp.args.PyTreeRestore(item={"params": abstract}, restore_args={"params": args}, partial_restore=True),
    )["params"]
  except Exception as e:
    raise ExportError(
      f"{step_dir / 'state'}: its parameters do not match the model built from the run's config "
      f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); was the run directory reused for a "
      "different model or LoRA setting?"
    ) from None
  expected = _json_item(step_dir / "meta").get("checksums", {})
  actual = ckpt_lib.checksums({"params": got})
  bad = sorted(k for k, v in actual.items() if k in expected and expected[k] != v)
  if bad:
    raise ExportError(
      f"{step_dir}: checksum mismatch in {', '.join(bad[:3])}: the checkpoint is corrupt; export "
      "an earlier step with --step."
    )
  return got


def _fill(state: nnx.State, restored: Any) -> nnx.State:
  nnx.replace_by_pure_dict(state, restored)
  return state


def _run_source(step_dir: pathlib.Path) -> tuple[dict, pathlib.Path, str]:
  """(the run's saved config, the base checkpoint directory, the base's name for an adapter config)."""
  config = _json_item(step_dir / "config")
  path = config.get("model", {}).get("path")
  if not path:
    raise ExportError(f"{step_dir / 'config'}: model.path is missing; this is not a jaxtune training checkpoint.")
  source = hf_load.resolve(builtin_models.resolve(path, config["model"].get("cache_dir", "")))
  model = config["model"]
  return config, source, builtin_models.base_name(path, model.get("hub_id", ""), source)


def _with_adapters(
  cfg: ModelConfig, options: ModelOptions, peft: dict, base: CausalLM | None, scorer: bool = False
) -> CausalLM:
  """The model with the adapters of the run's PEFT method and shapes, their values still to be restored.

  Built abstractly (no random init, which costs a compile per shape) and then given the
  base's weights, or left abstract where `base` is None.
  """

  def build():
    return peft_methods.apply(_causal_lm(cfg, options, scorer), peft, rngs=nnx.Rngs(0))

  graphdef, adapters, keys, rest = nnx.split(nnx.eval_shape(build), _TRAINED, LoRADropoutKey, ...)
  keys = jax.tree.map(lambda s: jnp.asarray(np.zeros(s.shape, s.dtype)), keys)  # dropout is off outside training
  return nnx.merge(graphdef, adapters, keys, rest if base is None else nnx.state(base))


_TRAINED = nnx.Any(AdapterParam, HeadParam)  # what an adapter run's checkpoint holds: adapters and a new head


def _causal_lm(cfg: ModelConfig, options: ModelOptions, scorer: bool) -> CausalLM:
  model = CausalLM(cfg, options, rngs=nnx.Rngs(0))
  if scorer:  # a reward model: its score head's values come from the checkpoint
    model.add_score_head()
  return model


def load_run(run_dir: str | os.PathLike, step: int | None = None, *, base_weights: bool = True) -> RunModel:
  """The run's model at `step` (default: the latest checkpoint).

  base_weights=False skips loading the base of a LoRA run: its weights stay abstract (shapes
  only), which is all an adapter export needs.
  """
  run_dir = pathlib.Path(run_dir).expanduser().absolute()
  step_dir = _step_dir(run_dir, step)
  config, source, base_model = _run_source(step_dir)
  model_cfg, peft = config.get("model", {}), config.get("peft", {})
  method = peft.get("method", "lora")
  scorer = config.get("objective") == "reward"
  compute = model_cfg.get("dtype", "float32")
  platform = jax.default_backend()

  if method == "full":  # every weight is in the checkpoint: restore it into an abstract model
    cfg = load_config(source)
    options = options_lib.for_platform(platform, dtype=compute, param_dtype=model_cfg.get("param_dtype", "float32"))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _causal_lm(cfg, options, scorer)))
    model = nnx.merge(graphdef, _fill(state, _restore_params(step_dir, nnx.to_pure_dict(state))))
  elif method in ADAPTER_METHODS:
    base = None
    if base_weights:  # the base in the dtype it is stored in: exact, and no bigger than it has to be
      # A quantised base is rebuilt exactly as the run trained on it (quantisation is deterministic).
      quantize = {k: model_cfg[k] for k in ("quantize", "quantize_block", "double_quant") if k in model_cfg}
      base = hf_load.load_model(
        source,
        dtype=compute,
        param_dtype=files.source_dtype(source).name,
        quantize=quantize.get("quantize", "none"),
        quant_block=quantize.get("quantize_block", 64),
        double_quant=quantize.get("double_quant", False),
      )
    cfg = base.config if base is not None else load_config(source)
    options = base.options if base is not None else options_lib.for_platform(platform, dtype=compute)
    model = _with_adapters(cfg, options, {**peft, "method": method}, base, scorer)
    adapters = nnx.state(model, _TRAINED)
    nnx.update(model, _fill(adapters, _restore_params(step_dir, nnx.to_pure_dict(adapters))))
  else:
    raise ExportError(
      f"{step_dir / 'config'}: peft.method {method!r} is not one jaxtune can export "
      f"({', '.join(ADAPTER_METHODS)}, full)."
    )
  return RunModel(model, int(step_dir.name), method, source, base_model, config)


def export_run(
  run_dir: str | os.PathLike,
  out_dir: str | os.PathLike,
  format: str = "merged",
  step: int | None = None,
  *,
  dtype: str | None = None,
  overwrite: bool = False,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> pathlib.Path:
  """Exports a run's model at `step` (default: latest) as merged HF safetensors, a PEFT adapter or GGUF.

  Returns the output directory (merged, adapter) or the .gguf file. dtype: of the written
  weights; default the base checkpoint's (merged), float32 (adapter), f16 (gguf). Every format
  appears at `out_dir` only once complete and checked; an earlier export there is replaced then
  (export/staging.py).
  """
  if format not in FORMATS:
    raise ExportError(f"format {format!r} is unknown; choose one of {', '.join(FORMATS)}.")
  if format == "gguf":
    dtype = gguf_export.gguf_dtype(dtype or "f16")
  elif dtype is not None:
    dtype = files.dtype_of(dtype).name
  run_dir = pathlib.Path(run_dir).expanduser().absolute()
  step_dir = _step_dir(run_dir, step)  # bad run directories, steps and outputs fail before anything is loaded
  patterns = {"adapter": ADAPTER_PATTERNS, "gguf": gguf_export.GGUF_PATTERNS}.get(format, files.MODEL_PATTERNS)
  staging.check_destination(out_dir, overwrite=overwrite, patterns=patterns)
  config, source, _ = _run_source(step_dir)
  files.check_not_source(out_dir, source)
  if format == "gguf":
    gguf_export.check_source(load_config(source), source)
  method = config.get("peft", {}).get("method", "lora")
  if config.get("objective") == "reward" and format != "merged":
    raise ExportError(
      f"{run_dir}: a reward model exports as a transformers *ForSequenceClassification checkpoint; use --format merged."
    )
  if format in ("merged", "gguf") and method in ("prompt", "prefix"):
    raise ExportError(
      f"{run_dir}: peft.method={method} trains virtual tokens, which no weight of the base can hold; export "
      "--format adapter (PEFT's PeftModel loads it)."
    )
  if format == "adapter" and method == "full":
    raise ExportError(
      f"{run_dir}: the run fine-tuned every weight (peft.method={method}), so there is no adapter; "
      "export --format merged or gguf instead."
    )

  if format == "adapter":
    run = load_run(run_dir, step, base_weights=False)
    note = builtin_models.PROVENANCE.get(config.get("model", {}).get("path", ""), "")
    return export_adapter(
      run.model, out_dir, run.base_model, dtype=dtype or "float32", overwrite=overwrite, provenance=note
    )
  run = load_run(run_dir, step)
  # A template named in the run's config (data.chat_template) goes with the model: inference formats as training did.
  template = templates.resolve(config.get("data", {}).get("chat_template", ""))
  if format == "merged":
    pad_id = tokens_lib.pad_id(hf_load.load_tokenizer(run.source_dir)) if run.model.score is not None else None
    return export_merged(
      run.model,
      run.source_dir,
      out_dir,
      dtype=dtype,
      max_shard_bytes=max_shard_bytes,
      overwrite=overwrite,
      chat_template=template or None,
      pad_id=pad_id,
    )
  return gguf_export.export_gguf_dir(
    run.model,
    run.source_dir,
    out_dir,
    dtype=dtype,
    overwrite=overwrite,
    name=f"{run_dir.name}-step{run.step}",
    chat_template=template,
  )


def describe(path: pathlib.Path) -> list[str]:
  """One line per written file: name and size (for the command line's report)."""
  entries = sorted(path.iterdir()) if path.is_dir() else [path]
  return [f"  {p.name}  {p.stat().st_size:,} bytes" for p in entries if p.is_file()]
