"""How one run executes a model: dtypes, attention and remat choice, kernels, activation sharding.

`ModelConfig` (models/config.py) is the architecture read from `config.json`; everything here is
chosen per run and never written to a checkpoint. The training loop, the dry run and `load_model`
resolve these choices once, from the config and the target platform, and log why; model code only
reads the resolved values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

ATTENTION_IMPLS = ("xla", "chunked", "cudnn", "dot_product", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
KERNELS = ("plain", "cpu")
QUANTIZE = ("none", "nf4", "int8")

# Logical axes of the [B, T, D] activations entering each layer; parallel/ maps them to mesh axes.
ACTIVATION_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Per-run execution choices of a CausalLM (static under jit: hashable)."""

  dtype: str = "float32"  # activation / compute dtype
  param_dtype: str = "float32"
  # xla: the plain softmax program, differentiated by JAX. chunked: a custom backward that keeps only
  # each row's max and sum instead of the [T, S] probabilities. cudnn / dot_product: jax.nn's fused
  # attention (cuDNN on GPU / XLA's, for tests). splash: Pallas splash attention on TPU.
  attention_impl: str = "xla"
  remat: str = "none"
  # plain: einsum products differentiated by JAX, the program every backend runs. cpu: products,
  # residuals and attention block sizes tuned for XLA's CPU backend (models/cpu.py).
  kernels: str = "plain"
  # Run Pallas kernels (splash) in interpret mode: on a backend other than the one they target (tests).
  interpret: bool = False
  # Pins each layer's [B, T, D] input to the sharding its logical axes (ACTIVATION_AXES) name;
  # parallel/ builds it from the mesh and the rules table (`parallel.ActivationSharding`). None: no
  # constraint. It must compare by value: the options are part of the jitted program's static key.
  constrain: Callable[[Any, Sequence[str]], Any] | None = None
  # none | nf4 | int8: the decoder layers' Linear kernels stored quantised, frozen (models/quantize.py);
  # quant_block: NF4 weights per absmax; double_quant: the absmax values themselves stored 8-bit.
  quantize: str = "none"
  quant_block: int = 64
  double_quant: bool = False

  def __post_init__(self):
    choices = (
      ("attention_impl", ATTENTION_IMPLS),
      ("remat", REMAT_POLICIES),
      ("kernels", KERNELS),
      ("quantize", QUANTIZE),
    )
    for field, allowed in choices:
      if getattr(self, field) not in allowed:
        raise ValueError(f"{field} {getattr(self, field)!r} is unknown; choose one of {', '.join(allowed)}.")

  def replace(self, **changes: Any) -> "ModelOptions":
    return dataclasses.replace(self, **changes)


def auto_kernels(platform: str) -> tuple[str, str]:
  """(kernels, reason) for kernels="auto" on `platform` ("cpu", "gpu", "tpu")."""
  if platform == "cpu":
    return "cpu", "CPU: products and residuals laid out for XLA's CPU backend"
  return "plain", f"{platform}: the plain program, differentiated by JAX"


def for_platform(platform: str, *, kernels: str = "auto", **choices: Any) -> ModelOptions:
  """ModelOptions for a run on `platform`: kernels="auto" resolved by `auto_kernels`, Pallas kernels
  interpreted off their TPU; `choices` sets the other fields."""
  if kernels == "auto":
    kernels, _ = auto_kernels(platform)
  interpret = choices.pop("interpret", choices.get("attention_impl") == "splash" and platform != "tpu")
  return ModelOptions(kernels=kernels, interpret=interpret, **choices)
