"""Names and layouts: jaxtune parameter paths <-> Hugging Face tensor names.

One table serves import (HF -> jaxtune) and export (jaxtune -> HF). HF stores
linear weights as [out, in] with heads flattened; jaxtune keeps explicit axes
([D, N, H] for q, [N, H, D] for o, [D, F] for the MLP).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxtune.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One jaxtune parameter and the HF tensor(s) it comes from."""

  path: Path  # nnx state path, e.g. ("layers", "attn", "q", "kernel")
  hf_name: str  # with "{i}" for the layer index when stacked
  stacked: bool
  to_jax: Callable[[np.ndarray], np.ndarray]  # one HF tensor -> one (per-layer) jaxtune array
  to_hf: Callable[[np.ndarray], np.ndarray]

  def hf_names(self, num_layers: int) -> list[str]:
    return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _transpose(x: np.ndarray) -> np.ndarray:
  return x.T


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
  """The full table for one model config, in checkpoint order."""
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layer = "model.layers.{i}."

  def heads_in(n: int):  # HF [n*H, D] <-> ours [D, n, H]
    return (lambda w: w.reshape(n, H, D).transpose(2, 0, 1), lambda w: w.transpose(1, 2, 0).reshape(n * H, D))

  def heads_bias(n: int):  # HF [n*H] <-> ours [n, H]
    return (lambda b: b.reshape(n, H), lambda b: b.reshape(n * H))

  o_proj = (lambda w: w.reshape(D, N, H).transpose(1, 2, 0), lambda w: w.transpose(2, 0, 1).reshape(D, N * H))
  maps = [TensorMap(("embed",), "model.embed_tokens.weight", False, _identity, _identity)]

  def add(path: tuple[str, ...], hf: str, fns=(_identity, _identity)):
    maps.append(TensorMap(("layers",) + path, layer + hf, True, *fns))

  add(("pre_attn_norm", "scale"), "input_layernorm.weight")
  for name, n in (("q", N), ("k", K), ("v", K)):
    add(("attn", name, "kernel"), f"self_attn.{name}_proj.weight", heads_in(n))
    if cfg.qkv_bias:
      add(("attn", name, "bias"), f"self_attn.{name}_proj.bias", heads_bias(n))
  add(("attn", "o", "kernel"), "self_attn.o_proj.weight", o_proj)
  if cfg.o_bias:
    add(("attn", "o", "bias"), "self_attn.o_proj.bias")
  if cfg.qk_norm:
    add(("attn", "q_norm", "scale"), "self_attn.q_norm.weight")
    add(("attn", "k_norm", "scale"), "self_attn.k_norm.weight")
  if cfg.sandwich_norms:
    add(("post_attn_norm", "scale"), "post_attention_layernorm.weight")
    add(("pre_mlp_norm", "scale"), "pre_feedforward_layernorm.weight")
    add(("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight")
  else:
    add(("pre_mlp_norm", "scale"), "post_attention_layernorm.weight")
  for name in ("gate", "up", "down"):
    add(("mlp", name, "kernel"), f"mlp.{name}_proj.weight", (_transpose, _transpose))
    if cfg.mlp_bias:
      add(("mlp", name, "bias"), f"mlp.{name}_proj.bias")
  maps.append(TensorMap(("final_norm", "scale"), "model.norm.weight", False, _identity, _identity))
  if not cfg.tie_embeddings:
    maps.append(TensorMap(("lm_head", "kernel"), "lm_head.weight", False, _transpose, _transpose))
  return maps


# Tensors some checkpoints carry that carry no weights of the model.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
