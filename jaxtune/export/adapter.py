"""Adapter export: a PEFT adapter directory, for `peft.PeftModel.from_pretrained` (and vLLM's LoRA loading).

    OUT/adapter_model.safetensors   LoRA: base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]
                                    (DoRA: also <module>.lora_magnitude_vector [out]);
                                    IA3: base_model.model.<module>.ia3_l, (out, 1) or (1, in) (feed-forward);
                                    prompt / prefix tuning: prompt_embeddings [virtual tokens, dim]
    OUT/adapter_config.json         peft_type (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING) and its fields, base model
    OUT/README.md                   a model card: the base (front matter `base_model`), how to load it

The names and layouts come from each method's `peft_state_dict` / `peft_config` (jaxtune.peft.lora, .ia3,
.virtual).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from safetensors.numpy import save_file

from jaxtune.export import files, staging
from jaxtune.export.files import ExportError
from jaxtune.models.transformer import CausalLM
from jaxtune.peft import ia3 as ia3_lib
from jaxtune.peft import lora as lora_lib
from jaxtune.peft import virtual as virtual_lib

ADAPTER_PATTERNS = ("adapter_model.safetensors", "adapter_config.json", "README.md")


def export_adapter(
  model: CausalLM,
  out_dir: str | os.PathLike,
  base_model_name_or_path: str,
  *,
  dtype: Any = "float32",
  overwrite: bool = False,
  provenance: str = "",
) -> pathlib.Path:
  """Writes the model's LoRA adapters as a PEFT adapter directory, whole or not at all (export/staging.py); returns it.

  base_model_name_or_path: what PEFT and vLLM load the adapter onto (a hub id or a path).
  provenance: a paragraph for the README when the trained-on weights are not exactly that base's.
  """
  dtype = files.dtype_of(dtype)
  config, tensors = adapter_files(model, str(base_model_name_or_path))
  tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  with staging.staged(out_dir, overwrite=overwrite, patterns=ADAPTER_PATTERNS) as stage:
    save_file(tensors, str(stage.path / "adapter_model.safetensors"), metadata={"format": "pt"})
    files.write_json(stage.path / "adapter_config.json", config)
    (stage.path / "README.md").write_text(model_card(str(base_model_name_or_path), config, provenance))
  return pathlib.Path(out_dir).expanduser().absolute()


def adapter_method(model: CausalLM) -> str | None:
  """The PEFT method of the model's adapters (lora, ia3, prompt, prefix), None without any."""
  if lora_lib.lora_weights(model):
    return "lora"
  if ia3_lib.ia3_modules(model):
    return "ia3"
  return virtual_lib.method(model)


def adapter_files(model: CausalLM, base: str) -> tuple[dict, dict]:
  """(adapter_config.json, the tensors of adapter_model.safetensors) of the model's adapters."""
  method = adapter_method(model)
  if method is None:
    raise ExportError(
      "the model has no adapters to export; apply a PEFT method (peft.method lora, ia3, prompt or prefix) and "
      "train first, or export --format merged for a fully fine-tuned model."
    )
  lib = {"lora": lora_lib, "ia3": ia3_lib}.get(method, virtual_lib)
  return lib.peft_config(model, base), lib.peft_state_dict(model)


TITLES = {"LORA": "LoRA", "IA3": "IA3", "PROMPT_TUNING": "Prompt tuning", "PREFIX_TUNING": "Prefix tuning"}


def model_card(base: str, config: dict, provenance: str = "") -> str:
  """The adapter's README: the hub's front matter (base_model, library_name) and how to load it."""
  modules = ", ".join(config.get("target_modules") or [])
  lines = [
    "---",
    f"base_model: {base}",
    "library_name: peft",
    f"tags: [{config['peft_type'].lower()}, jaxtune]",
    "---",
    "",
    f"# {'DoRA' if config.get('use_dora') else TITLES[config['peft_type']]} adapter for {base}",
    "",
    "Trained with jaxtune: " + _summary(config, modules) + ".",
    "",
    "```python",
    "from peft import PeftModel",
    "from transformers import AutoModelForCausalLM",
    "",
    f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "path/to/this/directory")',
    "```",
  ]
  if provenance:
    lines += ["", provenance]
  return "\n".join(lines) + "\n"


def _summary(config: dict, modules: str) -> str:
  kind = config["peft_type"]
  if kind == "LORA":
    return f"rank {config.get('r')}, alpha {config.get('lora_alpha')}, modules {modules}"
  if kind == "IA3":
    return f"modules {modules}, feed-forward {', '.join(config.get('feedforward_modules') or [])}"
  return f"{config.get('num_virtual_tokens')} virtual tokens"
