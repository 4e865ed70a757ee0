"""IA3 (PEFT's `IA3`): a learned vector per adapted Linear that rescales it, initialised to ones.

The vector sits in the Linear's adapter slot like LoRA's factors (one adapter mechanism). As PEFT does, a
feed-forward module (`feedforward`, by default each family's down projection) scales its input,
y = (x * l) W + b; any other scales its output, bias included, y = (x W + b) * l. For q,
"BTD,DNH->BTNH", l is [L, N, H] (the output letters); for down, "BTF,FD->BTD", l is [L, F]. The base is
read only through `Linear.base` (a quantised kernel is dequantised inside its product) and, for a
merge, through `Linear.kernel_value`, so IA3 trains on a quantised base as LoRA does.

PEFT stores each vector as `base_model.model.<hf module>.ia3_l`, (out, 1) or (1, in) for a feed-forward
module, with `adapter_config.json`'s `target_modules` and `feedforward_modules`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.hf import mapping
from jaxtune.models import einsum as einsum_lib
from jaxtune.models.transformer import CausalLM, Linear
from jaxtune.peft.lora import PEFT_PREFIX, AdapterParam, _linears, _select

# PEFT 0.21's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / _FEEDFORWARD_MODULES_MAPPING, our names.
DEFAULT_TARGETS = {
  "llama": ("k", "v", "down"),
  "mistral": ("k", "v", "down"),
  "gemma": ("q", "v", "down"),
  "gemma2": ("q", "v", "down"),
  "gemma3_text": ("q", "v", "down"),
  "qwen2": ("q", "v", "down"),
  "qwen3": ("q", "v", "down"),
}
DEFAULT_FEEDFORWARD = ("down",)


class IA3(nnx.Module):
  """Scales a Linear's input (feedforward) or output by a learned vector l, ones at init."""

  rescales = True  # Linear.__call__ hands the whole layer to `rescale`

  def __init__(
    self,
    einsum: str,
    kernel_shape: tuple[int, ...],
    kernel_axes: tuple[Any, ...] | None,
    *,
    feedforward: bool,
    param_dtype: Any = jnp.float32,
  ):
    spec = einsum_lib.parse(einsum)
    n_stack = len(kernel_shape) - len(spec.w)
    stack, dims = tuple(kernel_shape[:n_stack]), dict(zip(spec.w, kernel_shape[n_stack:]))
    axes = tuple(kernel_axes) if kernel_axes else (None,) * len(kernel_shape)
    stack_axes, letter_axes = axes[:n_stack], dict(zip(spec.w, axes[n_stack:]))
    letters = spec.ins if feedforward else spec.outs
    if not (spec.x if feedforward else spec.y).endswith(letters):
      raise ValueError(
        f"IA3 cannot adapt einsum {einsum!r}: its {'input' if feedforward else 'output'} must end with "
        f"the kernel's {'input' if feedforward else 'output'} letters."
      )
    self.spec, self.feedforward, self.letters = spec, feedforward, letters
    shape = stack + tuple(dims[c] for c in letters)
    self.ia3_l = AdapterParam(
      jnp.asarray(np.ones(shape, param_dtype)), axes=stack_axes + tuple(letter_axes[c] for c in letters)
    )

  def rescale(self, x: jax.Array, linear: Linear) -> jax.Array:
    scale = self.ia3_l[...].astype(linear.dtype)
    if self.feedforward:
      return linear.base(x * scale)
    return linear.base(x) * scale

  def merge(self, kernel: jax.Array, scale: jax.Array) -> jax.Array:
    """The kernel (all layers, one, or unstacked; `scale` alike) with the scale folded in, float32."""
    kernel = jnp.asarray(kernel, jnp.float32)
    n_stack = kernel.ndim - len(self.spec.w)
    scale = jnp.asarray(scale, jnp.float32)
    # scale's axes: the stack, then `letters`; put each at its kernel axis, 1 elsewhere.
    shape = list(kernel.shape[:n_stack]) + [
      kernel.shape[n_stack + i] if c in self.letters else 1 for i, c in enumerate(self.spec.w)
    ]
    order = [self.letters.index(c) for c in self.spec.w if c in self.letters]
    scale = jnp.transpose(scale, tuple(range(n_stack)) + tuple(n_stack + i for i in order))
    return kernel * scale.reshape(shape)

  def merge_bias(self, bias: jax.Array, scale: jax.Array) -> jax.Array:
    """The bias with an output scale folded in (PEFT scales the bias of a non-feed-forward module); float32."""
    bias = jnp.asarray(bias, jnp.float32)
    return bias if self.feedforward else bias * jnp.asarray(scale, jnp.float32)


def default_targets(model: CausalLM) -> tuple[str, ...]:
  model_type = model.config.model_type
  if model_type not in DEFAULT_TARGETS:
    raise ConfigError(
      f"peft.ia3.targets: PEFT has no default IA3 modules for {model_type!r}; set them, e.g. "
      "peft.ia3.targets='k,v,down' and peft.ia3.feedforward='down'."
    )
  return DEFAULT_TARGETS[model_type]


def _as_list(value: str | Sequence[str] | None) -> Any:
  if isinstance(value, str) and "," in value:
    return [v.strip() for v in value.split(",") if v.strip()]
  return value


def apply_ia3(
  model: CausalLM,
  *,
  targets: str | Sequence[str] | None = None,
  feedforward: str | Sequence[str] | None = None,
  param_dtype: Any = jnp.float32,
) -> CausalLM:
  """Adds IA3 vectors (ones) to the targeted Linears, in place; returns the model.

  targets: module names (ours "k" or HF's "k_proj", a list or comma-separated), a regex over whole dotted
  paths, or None/"default": PEFT's modules for the family. feedforward: those of the targets that scale
  their input (default PEFT's, the down projection); each must be a target.
  """
  targets = _as_list(targets)
  chosen = _select(model, default_targets(model) if targets in (None, "", "default") else targets, "peft.ia3.targets")
  feedforward = _as_list(feedforward)
  if feedforward in (None, "", "default"):
    feedforward = [n for n in DEFAULT_FEEDFORWARD if any(p[-1] == n for p, _ in chosen)]
  ff_paths = {p for p, _ in _select(model, feedforward, "peft.ia3.feedforward")} if feedforward else set()
  stray = sorted(".".join(p) for p in ff_paths - {p for p, _ in chosen})
  if stray:
    raise ConfigError(
      f"peft.ia3.feedforward: {stray} are not IA3 targets; a feed-forward module must also be in peft.ia3.targets."
    )
  for path, lin in chosen:
    if lin.adapter is not None:
      raise ValueError(f"{'.'.join(path)} already has an adapter; apply one PEFT method once.")
    lin.adapter = IA3(
      lin.einsum, lin.kernel_shape, lin.kernel_axes, feedforward=path in ff_paths, param_dtype=param_dtype
    )
  return model


def ia3_modules(model: nnx.Module) -> list[tuple[tuple[str, ...], Linear]]:
  return [(p, m) for p, m in _linears(model) if isinstance(m.adapter, IA3)]


def ia3_settings(model: CausalLM) -> dict[str, Any]:
  """The peft.ia3 settings that rebuild `model`'s IA3 vectors (targets and feed-forward modules as regexes)."""
  adapted = ia3_modules(model)
  if not adapted:
    raise ValueError("the model has no IA3 adapters.")
  regex = lambda paths: "|".join(sorted(re.escape(".".join(p)) for p in paths))
  ff = [p for p, m in adapted if m.adapter.feedforward]
  return {"targets": regex(p for p, _ in adapted), "feedforward": regex(ff) if ff else ""}


def _hf_modules(model: CausalLM) -> list[tuple[tuple[str, ...], Linear, mapping.TensorMap, list[str]]]:
  hf_module = {m.path[:-1]: m for m in mapping.tensor_maps(model.config) if m.path[-1] == "kernel"}
  out = []
  for p, linear in ia3_modules(model):
    tmap = hf_module.get(p)
    if tmap is None:
      raise ValueError(f"no Hugging Face name is known for adapted layer {'.'.join(p)}.")
    names = [PEFT_PREFIX + name.removesuffix(".weight") for name in tmap.hf_names(model.config.num_layers)]
    out.append((p, linear, tmap, names))
  return out


def peft_state_dict(model: CausalLM) -> dict[str, np.ndarray]:
  """IA3 vectors as PEFT saves them: `base_model.model.<hf module>.ia3_l`, (out, 1), or (1, in) when feed-forward."""
  out = {}
  for _, linear, tmap, names in _hf_modules(model):
    ad = linear.adapter
    value = np.asarray(ad.ia3_l[...], np.float32)
    for i, name in enumerate(names):
      vec = value[i] if tmap.stacked else value
      if ad.feedforward:
        out[name + ".ia3_l"] = np.ascontiguousarray(tmap.ins_to_hf(vec, ad.spec.w)[None, :])
      else:
        out[name + ".ia3_l"] = np.ascontiguousarray(tmap.rows_to_hf(vec, ad.spec.w)[:, None])
  return out


def peft_config(model: CausalLM, base_model_name_or_path: str = "") -> dict[str, Any]:
  """The `adapter_config.json` fields that match `peft_state_dict(model)`."""
  adapted = ia3_modules(model)
  if not adapted:
    raise ValueError("the model has no IA3 adapters; call apply_ia3 first.")
  to_hf = mapping.module_names(model.config)
  return {
    "peft_type": "IA3",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "target_modules": sorted({to_hf[p[-1]] for p, _ in adapted}),
    "feedforward_modules": sorted({to_hf[p[-1]] for p, m in adapted if m.adapter.feedforward}),
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "init_ia3_weights": True,
    "inference_mode": True,
  }
