"""The merge methods, one tensor at a time, in numpy: the arithmetic of mergekit's methods of the same names.

Each function takes the inputs' values of one tensor (float32, the same shape) and that tensor's
resolved parameters, and returns the merged value. Nothing here reads files or configs, so the
tests compare these against mergekit's own kernels tensor by tensor.

The constants and the order of operations are mergekit's (merge_methods/linear.py, slerp.py,
generalized_task_arithmetic.py, sparsify.py), because a merge recipe shared as a mergekit YAML
must give the same model here: SLERP interpolates linearly where the two tensors are nearly
parallel (|cos| > 0.9995), and DARE's rescaling restores each task vector's L1 norm rather than
dividing by the density.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: the angle is too small for sin() to divide by
SLERP_EPS = 1e-8  # a norm below this is taken as 1 (a zero tensor stays zero)
RESCALE_EPS = 1e-7  # a norm below this before or after dropping: no rescaling
TASK_DIVISOR_EPS = 1e-8  # task arithmetic's normalize: a weight sum this close to 0 divides by 1


def linear(values: Sequence[np.ndarray], weights: Sequence[float], normalize: bool = True) -> np.ndarray:
  """Σ w θ, divided by Σ w when normalize."""
  out = np.zeros_like(values[0], dtype=np.float32)
  for v, w in zip(values, weights):
    out += np.float32(w) * v
  if normalize:
    out /= np.float32(sum(np.float32(w) for w in weights))
  return out


def slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
  """Spherical interpolation from v0 (t=0) to v1 (t=1) over the whole tensor; linear where they are nearly parallel."""
  a, b = v0.reshape(-1).astype(np.float32), v1.reshape(-1).astype(np.float32)
  t = np.float32(t)
  if a.size == 0:
    return ((1 - t) * a + t * b).reshape(v0.shape)
  norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
  norm_a = norm_a if norm_a > SLERP_EPS else np.float32(1)
  norm_b = norm_b if norm_b > SLERP_EPS else np.float32(1)
  dot = float(np.clip(np.dot(a / norm_a, b / norm_b), -1, 1))
  if abs(dot) > SLERP_DOT_THRESHOLD:
    coef_a, coef_b = 1 - t, t
  else:
    theta = np.float32(np.arccos(np.float32(dot)))
    sin_theta = np.sin(theta)
    coef_a, coef_b = np.sin((1 - t) * theta) / sin_theta, np.sin(t * theta) / sin_theta
  return (np.float32(coef_a) * a + np.float32(coef_b) * b).reshape(v0.shape)


def rescaled(delta: np.ndarray, mask: np.ndarray, rescale: bool) -> np.ndarray:
  """delta * mask, scaled back to delta's L1 norm when rescale (as mergekit's RescaleNorm.l1)."""
  masked = delta * mask
  if not rescale:
    return masked
  before, after = np.abs(delta).sum(dtype=np.float32), np.abs(masked).sum(dtype=np.float32)
  if before < RESCALE_EPS or after < RESCALE_EPS:
    return masked
  return masked * (before / after)


def magnitude(delta: np.ndarray, density: float, rescale: bool = False) -> np.ndarray:
  """TIES trimming: keeps the `density` fraction of entries largest in magnitude (at least one)."""
  if density >= 1:
    return delta
  if density <= 0 or delta.size == 0:
    return np.zeros_like(delta)
  k = max(1, int(density * delta.size))
  mask = np.zeros(delta.size, np.float32)
  mask[np.argsort(-np.abs(delta).reshape(-1), kind="stable")[:k]] = 1
  return rescaled(delta, mask.reshape(delta.shape), rescale)


def bernoulli(delta: np.ndarray, density: float, rng: np.random.Generator, rescale: bool = True) -> np.ndarray:
  """DARE dropping: keeps each entry with probability `density`."""
  if density >= 1:
    return delta
  mask = (rng.random(delta.shape, dtype=np.float32) < np.float32(density)).astype(np.float32)
  return rescaled(delta, mask, rescale)


def sign_consensus(weighted: np.ndarray) -> np.ndarray:
  """TIES sign election over axis 0: True where an entry's sign is the sign of the entries' sum (0 counts as +)."""
  majority = np.where(weighted.sum(axis=0) >= 0, 1, -1).astype(np.float32)
  return np.sign(weighted) == majority


def task_arithmetic(
  base: np.ndarray,
  values: Sequence[np.ndarray],
  weights: Sequence[float],
  densities: Sequence[float],
  *,
  sparsify: str | None = None,
  consensus: bool = False,
  normalize: bool = False,
  rescale: bool = False,
  lam: float = 1.0,
  rng: np.random.Generator | None = None,
) -> np.ndarray:
  """base + λ Σ w δ over the task vectors δ = θ - base, the family of task_arithmetic, ties and dare_*.

  sparsify: None, "magnitude" (TIES) or "random" (DARE), each δ trimmed to its density first.
  consensus: TIES sign election; the sum then runs over the entries that agree with the elected sign.
  normalize: divide by the sum of the weights (of the agreeing entries, with consensus).
  """
  if not values:
    return base
  deltas = np.empty((len(values), *base.shape), np.float32)
  for i, (value, density) in enumerate(zip(values, densities)):
    delta = value - base
    if sparsify == "magnitude":
      delta = magnitude(delta, density, rescale)
    elif sparsify == "random":
      delta = bernoulli(delta, density, rng, rescale)
    deltas[i] = delta
  w = np.asarray(weights, np.float32).reshape((-1,) + (1,) * base.ndim)
  deltas *= w
  if consensus:
    mask = sign_consensus(deltas)
    mixed = (deltas * mask).sum(axis=0)
    divisor = (w * mask).sum(axis=0)
    divisor[divisor == 0] = 1
  else:
    mixed = deltas.sum(axis=0)
    divisor = w.sum(axis=0)
    divisor[np.abs(divisor) < TASK_DIVISOR_EPS] = 1
  if normalize:
    mixed /= divisor
  if lam != 1:
    mixed *= np.float32(lam)
  return base + mixed
