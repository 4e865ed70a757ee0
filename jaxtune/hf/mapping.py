"""Names and layouts: jaxtune parameter paths <-> Hugging Face tensor names, the one table.

Each entry names its layout kind; the kind says how HF's axes group our axes ("(nh)d" vs "dnh"
for q: HF [n*H, D], ours [D, n, H]), and from that alone follow the HF shape, both conversions
and the HF slice that holds a block of our array. Every loader, exporter and test reads this
table instead of knowing a layout itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from jaxtune.models.config import ModelConfig

Path = tuple[str, ...]
Block = tuple[slice, ...]

# Layout kinds: (HF axes, our axes). Parenthesised letters are one flattened HF axis, row-major.
LAYOUTS = {
  "identity": None,  # the same axes in the same order, any rank
  "transpose": ("oi", "io"),  # linear weight: HF [out, in], ours [in, out]
  "heads_in": ("(nh)d", "dnh"),  # q/k/v: HF [n*H, D], ours [D, n, H]
  "heads_bias": ("(nh)", "nh"),  # q/k/v bias: HF [n*H], ours [n, H]
  "o_proj": ("d(nh)", "nhd"),  # HF [D, N*H], ours [N, H, D]
}

# Tensors some checkpoints carry that carry no weights of the model.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _groups(kind: str, ndim: int) -> tuple[list[str], str]:
  """(HF axes as groups of our letters, our letters) of a layout kind."""
  if LAYOUTS[kind] is None:
    letters = "abcdefgh"[:ndim]
    return list(letters), letters
  hf, ours = LAYOUTS[kind]
  groups, i = [], 0
  while i < len(hf):
    j = hf.index(")", i) + 1 if hf[i] == "(" else i + 1
    groups.append(hf[i:j].strip("()"))
    i = j
  return groups, ours


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One jaxtune parameter, the HF tensor(s) it comes from and their layout."""

  path: Path  # nnx state path, e.g. ("layers", "attn", "q", "kernel")
  hf_name: str  # with "{i}" for the layer index when stacked
  stacked: bool
  layout: str  # a key of LAYOUTS
  shape: tuple[int, ...]  # ours, of one layer when stacked
  # q/k weights and biases: how many heads their HF rows hold, each head's rotary pairs half-split
  # (the first half of a head's rows pairs with its second half); 0 for every other tensor.
  rotary_heads: int = 0

  @property
  def is_norm(self) -> bool:
    """An RMSNorm scale (stored as w; the model multiplies by `offset + w`, ModelConfig.norm_offset)."""
    return self.path[-1] == "scale"

  def hf_names(self, num_layers: int) -> list[str]:
    """The HF tensor names, one per layer when stacked."""
    return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """The HF tensor's shape (of one layer when stacked)."""
    groups, ours = _groups(self.layout, len(self.shape))
    size = dict(zip(ours, self.shape))
    return tuple(math.prod(size[c] for c in g) for g in groups)

  def to_jax(self, x: np.ndarray) -> np.ndarray:
    """One HF tensor -> our (per-layer) array; ValueError when its shape is not `hf_shape`."""
    if tuple(x.shape) != self.hf_shape:
      raise ValueError(f"{self.hf_name}: shape {tuple(x.shape)}, expected {self.hf_shape}")
    return self.hf_block(tuple(slice(0, n) for n in self.shape))[1](x)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    """Our (per-layer) array -> the HF tensor."""
    groups, ours = _groups(self.layout, x.ndim)
    flat = "".join(groups)
    size = dict(zip(ours, x.shape))
    out = x.transpose([ours.index(c) for c in flat])
    return out.reshape(tuple(math.prod(size[c] for c in g) for g in groups))

  def hf_block(self, block: Block) -> tuple[Block, Callable[[np.ndarray], np.ndarray]]:
    """(the HF slice that holds `block` of our array, how to turn that slice into the block).

    A flattened HF axis is read in whole rows of its inner letters (whole heads), which are then
    cut to the block; `block` holds normalised slices (start and stop set, step 1).
    """
    groups, ours = _groups(self.layout, len(self.shape))
    size, want = dict(zip(ours, self.shape)), dict(zip(ours, block))
    hf_index, read_sizes, cut = [], {}, {}
    for g in groups:
      head, inner = want[g[0]], math.prod(size[c] for c in g[1:])
      hf_index.append(slice(head.start * inner, head.stop * inner))
      read_sizes[g[0]] = head.stop - head.start
      for c in g[1:]:
        read_sizes[c], cut[c] = size[c], want[c]
    flat = "".join(groups)

    def to_ours(x: np.ndarray) -> np.ndarray:
      y = x.reshape([read_sizes[c] for c in flat]).transpose([flat.index(c) for c in ours])
      return y[tuple(cut.get(c, slice(None)) for c in ours)]

    return tuple(hf_index), to_ours

  def _lora_axes(self, kernel_letters: str, n_in: int) -> tuple[str, str, list[str], list[str]]:
    """(input letters, output letters, the inputs in the order of HF's [in] axis, the outputs in that of its [out])."""
    groups, ours = _groups(self.layout, len(kernel_letters))
    ins, outs = kernel_letters[:n_in], kernel_letters[n_in:]
    as_ours = dict(zip(kernel_letters, ours))
    if len(groups) != 2 or set(groups[0]) != {as_ours[c] for c in outs} or set(groups[1]) != {as_ours[c] for c in ins}:
      raise ValueError(
        f"{self.hf_name}: a {self.layout} weight has no [out, in] form for a LoRA adapter with "
        f"inputs {ins!r} and outputs {outs!r}."
      )
    of = {v: k for k, v in as_ours.items()}
    return ins, outs, [of[c] for c in groups[1]], [of[c] for c in groups[0]]

  def lora_to_hf(self, a: np.ndarray, b: np.ndarray, kernel_letters: str) -> tuple[np.ndarray, np.ndarray]:
    """One layer's LoRA factors A [in..., r], B [r, out...] -> PEFT's lora_A [r, in] and lora_B [out, r].

    `kernel_letters` names the kernel's axes (the Linear's einsum); the HF weight is [out, in].
    """
    ins, outs, hf_ins, hf_outs = self._lora_axes(kernel_letters, a.ndim - 1)
    a_hf = a.transpose([a.ndim - 1] + [ins.index(c) for c in hf_ins]).reshape(a.shape[-1], -1)
    b_hf = b.transpose([1 + outs.index(c) for c in hf_outs] + [0]).reshape(-1, b.shape[0])
    return a_hf, b_hf

  def rows_to_hf(self, rows: np.ndarray, kernel_letters: str) -> np.ndarray:
    """One layer's vector over the weight's output letters [out...] (DoRA's magnitude) -> HF's [out]."""
    _, outs, _, hf_outs = self._lora_axes(kernel_letters, len(kernel_letters) - rows.ndim)
    return rows.transpose([outs.index(c) for c in hf_outs]).reshape(-1)

  def rows_from_hf(self, rows_hf: np.ndarray, kernel_letters: str, shape: tuple[int, ...]) -> np.ndarray:
    """HF's [out] vector -> one layer's [out...] of `shape`; ValueError naming the expected shape."""
    _, outs, _, hf_outs = self._lora_axes(kernel_letters, len(kernel_letters) - len(shape))
    size = dict(zip(outs, shape))
    if tuple(rows_hf.shape) != (math.prod(shape),):
      raise ValueError(f"lora_magnitude_vector has shape {tuple(rows_hf.shape)}, expected {(math.prod(shape),)}")
    return rows_hf.reshape([size[c] for c in hf_outs]).transpose([hf_outs.index(c) for c in outs])

  def ins_to_hf(self, vec: np.ndarray, kernel_letters: str) -> np.ndarray:
    """One layer's vector over the weight's input letters [in...] (IA3's feed-forward scale) -> HF's [in]."""
    ins, _, hf_ins, _ = self._lora_axes(kernel_letters, vec.ndim)
    return vec.transpose([ins.index(c) for c in hf_ins]).reshape(-1)

  def ins_from_hf(self, vec_hf: np.ndarray, kernel_letters: str, shape: tuple[int, ...]) -> np.ndarray:
    """HF's [in] vector -> one layer's [in...] of `shape`; ValueError naming the expected size."""
    ins, _, hf_ins, _ = self._lora_axes(kernel_letters, len(shape))
    size = dict(zip(ins, shape))
    if vec_hf.size != math.prod(shape):
      raise ValueError(f"ia3_l has shape {tuple(vec_hf.shape)}, expected (1, {math.prod(shape)})")
    return vec_hf.reshape([size[c] for c in hf_ins]).transpose([hf_ins.index(c) for c in ins])

  def lora_from_hf(
    self, a_hf: np.ndarray, b_hf: np.ndarray, kernel_letters: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
  ) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's lora_A [r, in] and lora_B [out, r] -> one layer's A of `a_shape` [in..., r], B of `b_shape` [r, out...].

    The inverse of `lora_to_hf`; ValueError naming the expected [r, in] / [out, r] shape when a
    factor has another.
    """
    ins, outs, hf_ins, hf_outs = self._lora_axes(kernel_letters, len(a_shape) - 1)
    r, size = a_shape[-1], {**dict(zip(ins, a_shape[:-1])), **dict(zip(outs, b_shape[1:]))}
    for name, got, want in (
      ("lora_A.weight", a_hf.shape, (r, math.prod(size[c] for c in hf_ins))),
      ("lora_B.weight", b_hf.shape, (math.prod(size[c] for c in hf_outs), r)),
    ):
      if tuple(got) != want:
        raise ValueError(f"{name} has shape {tuple(got)}, expected {want}")
    a = a_hf.reshape((r,) + tuple(size[c] for c in hf_ins)).transpose([1 + hf_ins.index(c) for c in ins] + [0])
    b = b_hf.reshape(tuple(size[c] for c in hf_outs) + (r,)).transpose(
      [len(hf_outs)] + [hf_outs.index(c) for c in outs]
    )
    return a, b


def module_names(cfg: ModelConfig) -> dict[str, str]:
  """{our Linear's name: its HF module name} ("q": "q_proj", ..., "lm_head": "lm_head"), from the table."""
  return {m.path[-2]: m.hf_name.split(".")[-2] for m in tensor_maps(cfg) if m.path[-1] == "kernel"}


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
  """The full table for one model config, in checkpoint order."""
  D, N, K, H, F, V = (
    cfg.hidden_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.intermediate_size,
    cfg.vocab_size,
  )
  maps = [TensorMap(("embed",), "model.embed_tokens.weight", False, "identity", (V, D))]

  def add(path: Path, hf: str, layout: str, shape: tuple[int, ...], rotary_heads: int = 0) -> None:
    maps.append(TensorMap(("layers",) + path, "model.layers.{i}." + hf, True, layout, shape, rotary_heads))

  add(("pre_attn_norm", "scale"), "input_layernorm.weight", "identity", (D,))
  for name, n in (("q", N), ("k", K), ("v", K)):
    rotary = n if name != "v" else 0
    add(("attn", name, "kernel"), f"self_attn.{name}_proj.weight", "heads_in", (D, n, H), rotary)
    if cfg.qkv_bias:
      add(("attn", name, "bias"), f"self_attn.{name}_proj.bias", "heads_bias", (n, H), rotary)
  add(("attn", "o", "kernel"), "self_attn.o_proj.weight", "o_proj", (N, H, D))
  if cfg.o_bias:
    add(("attn", "o", "bias"), "self_attn.o_proj.bias", "identity", (D,))
  if cfg.qk_norm:
    add(("attn", "q_norm", "scale"), "self_attn.q_norm.weight", "identity", (H,))
    add(("attn", "k_norm", "scale"), "self_attn.k_norm.weight", "identity", (H,))
  if cfg.sandwich_norms:
    add(("post_attn_norm", "scale"), "post_attention_layernorm.weight", "identity", (D,))
    add(("pre_mlp_norm", "scale"), "pre_feedforward_layernorm.weight", "identity", (D,))
    add(("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight", "identity", (D,))
  else:
    add(("pre_mlp_norm", "scale"), "post_attention_layernorm.weight", "identity", (D,))
  for name, (fan_in, fan_out) in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D))):
    add(("mlp", name, "kernel"), f"mlp.{name}_proj.weight", "transpose", (fan_in, fan_out))
    if cfg.mlp_bias:
      add(("mlp", name, "bias"), f"mlp.{name}_proj.bias", "identity", (fan_out,))
  maps.append(TensorMap(("final_norm", "scale"), "model.norm.weight", False, "identity", (D,)))
  if not cfg.tie_embeddings:
    maps.append(TensorMap(("lm_head", "kernel"), "lm_head.weight", False, "transpose", (D, V)))
  return maps
