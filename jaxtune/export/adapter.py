"""Adapter export: LoRA factors in PEFT's layout, for `peft.PeftModel.from_pretrained` and vLLM's LoRA loading.

    OUT/adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]
                                    (DoRA: also <module>.lora_magnitude_vector [out])
    OUT/adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, use_rslora, use_dora, base model
    OUT/README.md                   a model card: the base (front matter `base_model`), how to load it

The names and layouts come from `jaxtune.peft.lora.peft_state_dict` / `peft_config`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from safetensors.numpy import save_file

from jaxtune.export import files, staging
from jaxtune.export.files import ExportError
from jaxtune.models.transformer import CausalLM
from jaxtune.peft.lora import lora_weights, peft_config, peft_state_dict

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
  if not lora_weights(model):
    raise ExportError(
      "the model has no LoRA adapters to export; apply_lora (and train) first, or export "
      "--format merged for a fully fine-tuned model."
    )
  dtype = files.dtype_of(dtype)
  config = peft_config(model, str(base_model_name_or_path))
  tensors = {k: v.astype(dtype) for k, v in peft_state_dict(model).items()}
  with staging.staged(out_dir, overwrite=overwrite, patterns=ADAPTER_PATTERNS) as stage:
    save_file(tensors, str(stage.path / "adapter_model.safetensors"), metadata={"format": "pt"})
    files.write_json(stage.path / "adapter_config.json", config)
    (stage.path / "README.md").write_text(model_card(str(base_model_name_or_path), config, provenance))
  return pathlib.Path(out_dir).expanduser().absolute()


def model_card(base: str, config: dict, provenance: str = "") -> str:
  """The adapter's README: the hub's front matter (base_model, library_name) and how to load it."""
  modules = ", ".join(config.get("target_modules") or [])
  lines = [
    "---",
    f"base_model: {base}",
    "library_name: peft",
    "tags: [lora, jaxtune]",
    "---",
    "",
    f"# {'DoRA' if config.get('use_dora') else 'LoRA'} adapter for {base}",
    "",
    f"Trained with jaxtune: rank {config.get('r')}, alpha {config.get('lora_alpha')}, modules {modules}.",
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
