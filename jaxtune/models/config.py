"""Model hyper-parameters, read straight from a Hugging Face `config.json`.

One frozen dataclass covers every supported family; the family differences are
flags (norm offset, q/k norm, sandwich norms, soft-caps, ...) rather than
separate model classes. Both the transformers-5 layout (`rope_parameters`,
`layer_types`) and the older one (`rope_theta`, `rope_scaling`) are read.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

from jaxtune.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

# Rope variants whose inverse frequencies do not depend on the sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ModelConfigError(UserError, ValueError):
  """A config.json that jaxtune cannot run."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Rotary embedding settings for one kind of layer."""

  theta: float
  rope_type: str = "default"
  # Extra parameters of the variant (factor, low_freq_factor, ...), as sorted pairs so the
  # dataclass stays hashable (it is a static argument under jit).
  params: tuple[tuple[str, Any], ...] = ()

  def get(self, key: str, default: Any = None) -> Any:
    return dict(self.params).get(key, default)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer: what config.json says, nothing chosen per run (models/options.py)."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 8192
  tie_embeddings: bool = False
  activation: str = "silu"  # "silu" | "gelu_tanh"
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  norm_offset: float = 0.0  # Gemma norms scale by (1 + w)
  sandwich_norms: bool = False  # Gemma 2/3: norms before and after attention and MLP
  scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  query_scale: float = 0.0  # 0 means head_dim ** -0.5
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()  # "full_attention" | "sliding_attention", one per layer
  rope_full: RopeSpec = RopeSpec(theta=10000.0)
  rope_sliding: RopeSpec = RopeSpec(theta=10000.0)

  @property
  def scale(self) -> float:
    return self.query_scale or self.head_dim**-0.5

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    return tuple(t == "sliding_attention" for t in self.layer_types)

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}

# transformers' defaults for keys a minimal config.json may leave out.
_FAMILY_DEFAULTS = {
  "gemma": {"head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
  "gemma2": {
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
  },
  "gemma3_text": {
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
  },
  "mistral": {"sliding_window": 4096},
}


def _rope_spec(params: Mapping[str, Any] | None, fallback_theta: float, where: str) -> RopeSpec:
  params = dict(params or {})
  rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
  theta = float(params.pop("rope_theta", fallback_theta))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ModelConfigError(
      f"{where}: rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
    )
  return RopeSpec(theta=theta, rope_type=rope_type, params=tuple(sorted(params.items())))


def _rope_specs(hf: Mapping[str, Any], model_type: str, where: str) -> tuple[RopeSpec, RopeSpec]:
  """(full-attention rope, sliding-attention rope) from either config layout."""
  default_theta = {"gemma3_text": 1_000_000.0}.get(model_type, 10_000.0)
  rp = hf.get("rope_parameters")
  if rp and ("full_attention" in rp or "sliding_attention" in rp):  # per layer type (Gemma 3, new layout)
    full = _rope_spec(rp.get("full_attention"), default_theta, where)
    sliding = _rope_spec(rp.get("sliding_attention"), 10_000.0, where)
    return full, sliding
  if rp:  # one dict for all layers (new layout)
    spec = _rope_spec(rp, hf.get("rope_theta", default_theta), where)
  else:  # old layout: rope_theta + rope_scaling
    spec = _rope_spec(hf.get("rope_scaling"), hf.get("rope_theta", default_theta), where)
  if model_type == "gemma3_text":  # old layout: local layers use rope_local_base_freq, never scaled
    return spec, RopeSpec(theta=float(hf.get("rope_local_base_freq", 10_000.0)))
  return spec, spec


def _layer_types(hf: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[str, ...]:
  if hf.get("layer_types"):
    return tuple(hf["layer_types"])
  window = hf.get("sliding_window")
  if model_type == "mistral":
    kind = "sliding_attention" if window else "full_attention"
    return (kind,) * num_layers
  if model_type in ("qwen2", "qwen3"):
    on = hf.get("use_sliding_window", False) and window
    first = hf.get("max_window_layers", num_layers)
    return tuple("sliding_attention" if on and i >= first else "full_attention" for i in range(num_layers))
  if model_type == "gemma2":
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers))
  if model_type == "gemma3_text":
    pattern = hf.get("sliding_window_pattern", 6)
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))
  return ("full_attention",) * num_layers


def from_hf_dict(hf: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from the dict of an HF config.json."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ModelConfigError(
      f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )
  hf = {**_FAMILY_DEFAULTS.get(model_type, {}), **hf}
  try:
    hidden, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    vocab, inter = hf["vocab_size"], hf["intermediate_size"]
  except KeyError as e:
    raise ModelConfigError(f"{where}: required key {e.args[0]!r} is missing.") from None
  gemma = model_type.startswith("gemma")
  # Gemma reads `hidden_activation` only; its legacy `hidden_act: gelu` is ignored by transformers too.
  act_name = hf["hidden_activation"] if gemma else hf.get("hidden_act", "silu")
  if act_name not in _ACTIVATIONS:
    raise ModelConfigError(f"{where}: activation {act_name!r} is not supported; supported: {sorted(_ACTIVATIONS)}.")
  layer_types = _layer_types(hf, model_type, layers)
  if len(layer_types) != layers:
    raise ModelConfigError(f"{where}: layer_types has {len(layer_types)} entries for {layers} layers.")
  uses_window = any(t == "sliding_attention" for t in layer_types)
  rope_full, rope_sliding = _rope_specs(hf, model_type, where)
  attention_bias = bool(hf.get("attention_bias", False))
  qps = hf.get("query_pre_attn_scalar") if model_type in ("gemma2", "gemma3_text") else None
  return ModelConfig(
    model_type=model_type,
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=inter,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hidden // heads,
    rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    max_position_embeddings=hf.get("max_position_embeddings", 8192),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    activation=_ACTIVATIONS[act_name],
    qkv_bias=model_type == "qwen2" or attention_bias,
    o_bias=attention_bias and model_type != "qwen2",
    mlp_bias=bool(hf.get("mlp_bias", False)),
    qk_norm=model_type in ("qwen3", "gemma3_text"),
    norm_offset=1.0 if gemma else 0.0,
    sandwich_norms=model_type in ("gemma2", "gemma3_text"),
    scale_embeddings=gemma,
    query_scale=float(qps) ** -0.5 if qps else 0.0,
    attn_softcap=hf.get("attn_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
    final_softcap=hf.get("final_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
    sliding_window=hf.get("sliding_window") if uses_window else None,
    layer_types=layer_types,
    rope_full=rope_full,
    rope_sliding=rope_sliding,
  )


def load_config(path: str | pathlib.Path) -> ModelConfig:
  """Reads `config.json` from a checkpoint directory (or the file itself)."""
  path = pathlib.Path(path)
  file = path / "config.json" if path.is_dir() else path
  if not file.exists():
    raise ModelConfigError(f"{file}: not found; a Hugging Face checkpoint directory holds a config.json.")
  try:
    hf = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ModelConfigError(f"{file}:{e.lineno}: invalid JSON: {e.msg}.") from None
  quantized = hf.get("quantization_config")
  if isinstance(quantized, dict):  # e.g. the hub's *-bnb-4bit checkpoints: packed codes where weights should be
    method = quantized.get("quant_method", "an unknown method")
    kind = quantized.get("bnb_4bit_quant_type") if quantized.get("load_in_4bit") else None
    raise ModelConfigError(
      f"{file}: the checkpoint is stored pre-quantised ({method}{', ' + kind if kind else ''}); jaxtune reads "
      "16-bit checkpoints and quantises them as they load: point model.path at the original model and set "
      "model.quantize=nf4 (bitsandbytes' codes, the same as this checkpoint's when it was made from it) or int8."
    )
  return from_hf_dict(hf, where=str(file))
