"""Tiny Llama checkpoints for the merge tests: a base, fine-tunes of it, PEFT adapters over it.

The fine-tunes are the base plus a small change in the attention weights and a large one
elsewhere, so that SLERP meets both of its branches (nearly parallel tensors interpolate
linearly) and TIES's sign election has disagreements to settle.
"""

import json
import pathlib
import shutil
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "export"))

from export_helpers import write_tiny_llama

__all__ = ["fine_tune", "write_adapter", "write_tiny_llama"]
RANK, ALPHA = 4, 8.0


def _tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return load_file(directory / "model.safetensors")


def fine_tune(base: pathlib.Path, out: pathlib.Path, seed: int, change=None) -> pathlib.Path:
  """A copy of `base` with every tensor moved: by 1% of its scale in attention, by as much as its scale elsewhere."""
  from safetensors.numpy import save_file

  shutil.copytree(base, out)
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, w in _tensors(base).items():
    scale = 0.01 if "self_attn" in name else 1.0
    tensors[name] = (w + scale * float(np.std(w) or 1.0) * rng.standard_normal(w.shape)).astype(w.dtype)
  if change:
    tensors = change(tensors)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  return out


def write_adapter(base: pathlib.Path, out: pathlib.Path, seed: int, modules=("q_proj", "v_proj"), **config):
  """A PEFT LoRA adapter over `base` (r=4, alpha=8) on `modules` of every layer, random A and B."""
  from safetensors.numpy import save_file

  out.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, w in _tensors(base).items():
    if name.endswith(".weight") and name.split(".")[-2] in modules:
      prefix = "base_model.model." + name.removesuffix(".weight")
      tensors[prefix + ".lora_A.weight"] = (0.1 * rng.standard_normal((RANK, w.shape[1]))).astype(np.float32)
      tensors[prefix + ".lora_B.weight"] = (0.1 * rng.standard_normal((w.shape[0], RANK))).astype(np.float32)
  save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
  adapter_config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": str(base),
    "r": RANK,
    "lora_alpha": ALPHA,
    "lora_dropout": 0.0,
    "target_modules": list(modules),
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    **config,
  }
  (out / "adapter_config.json").write_text(json.dumps(adapter_config))
  return out
