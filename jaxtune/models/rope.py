"""Rotary position embeddings: the variants of HF checkpoints, in the rotate-half layout."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxtune.models.config import RopeSpec


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> tuple[np.ndarray, float]:
  """(inv_freq [head_dim // 2], attention_factor) for one rope variant, in float32."""
  dim = int(head_dim * spec.get("partial_rotary_factor", 1.0))
  if dim != head_dim:
    raise ValueError(f"partial_rotary_factor != 1 is not supported (head_dim {head_dim}, rotary dim {dim}).")
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  inv_freq = (1.0 / (spec.theta**exponents)).astype(np.float32)
  if spec.rope_type == "default":
    return inv_freq, 1.0
  if spec.rope_type == "linear":
    return inv_freq / np.float32(spec.get("factor")), 1.0
  if spec.rope_type == "llama3":
    return _llama3(inv_freq, spec), 1.0
  if spec.rope_type == "yarn":
    return _yarn(spec, dim)
  raise ValueError(f"rope_type {spec.rope_type!r} is not supported.")


def _llama3(inv_freq: np.ndarray, spec: RopeSpec) -> np.ndarray:
  """Llama 3.1 scaling: long wavelengths divided by `factor`, a smooth ramp in between."""
  factor = spec.get("factor")
  low, high = spec.get("low_freq_factor"), spec.get("high_freq_factor")
  old_len = spec.get("original_max_position_embeddings")
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(spec: RopeSpec, dim: int) -> tuple[np.ndarray, float]:
  """YaRN: interpolate low frequencies, keep high ones, and scale the attention logits."""
  factor = spec.get("factor")
  old_len = spec.get("original_max_position_embeddings")
  attention_factor = spec.get("attention_factor")
  mscale, mscale_all = spec.get("mscale"), spec.get("mscale_all_dim")

  def get_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if attention_factor is None:
    attention_factor = (
      get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)
    )
  beta_fast, beta_slow = spec.get("beta_fast") or 32, spec.get("beta_slow") or 1

  def correction_dim(rotations: float) -> float:
    return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(spec.theta))

  lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
  if spec.get("truncate", True):
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, dim - 1)
  if lo == hi:
    hi += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
  pos_freqs = spec.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
  extrapolation = 1 - ramp
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  return inv_freq.astype(np.float32), float(attention_factor)


def rope_tables(spec: RopeSpec, head_dim: int, positions_BT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin [B, T, head_dim] in float32 for integer positions."""
  inv_freq, attention_factor = inverse_frequencies(spec, head_dim)
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
  return jnp.cos(angles_BTH) * attention_factor, jnp.sin(angles_BTH) * attention_factor


def apply_rope(x_BTNH: jnp.ndarray, cos_BTH: jnp.ndarray, sin_BTH: jnp.ndarray) -> jnp.ndarray:
  """Rotates x by the position angles (HF's rotate_half convention), computed in float32."""
  x = x_BTNH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
  return out.astype(x_BTNH.dtype)
