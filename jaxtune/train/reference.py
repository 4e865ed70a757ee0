"""Reference log-probs computed once, before training, and cached with the tokenised data.

DPO and KTO compare the policy with a frozen reference: the initial model. Under full
fine-tuning no copy of those weights is kept, so their per-token log-probs are computed in
one pass over every split before the first step, stored next to the tokenised examples
(`Examples.ref_logps`, one float per token) and carried by each batch (`ref_logps`). Under
LoRA the same pass saves the reference forward of every step. The cache file is keyed on the
data (the split's fingerprint) and the model (its files, dtype and kernels): a change to either
recomputes it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.data import packing
from jaxtune.train import objectives

_ROWS = 8  # examples per forward pass


def model_fingerprint(model_path: str, *settings: Any) -> str:
  """A digest of the checkpoint's files (names, sizes, modification times) and the settings that change numerics."""
  path = pathlib.Path(model_path)
  weights = (".safetensors", ".json", ".bin", ".gguf")
  files = sorted(p for p in path.iterdir() if p.suffix in weights) if path.is_dir() else []
  stats = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
  text = json.dumps([str(path.resolve()), stats, [str(s) for s in settings]])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def attach(
  examples: Any,
  model: nnx.Module,
  *,
  cache: pathlib.Path | None,
  buckets: tuple[int, ...],
  say: Callable[[str], None] = print,
  label: str = "",
) -> Any:
  """`examples` with `ref_logps` of `model`: read from `cache` when there, else computed (and written there)."""
  if cache is not None and cache.exists():
    ref = np.load(cache)
    if ref.shape == examples.input_ids.shape:
      say(f"reference log-probs{label}: read from {cache}")
      return dataclasses.replace(examples, ref_logps=ref)
  start = time.perf_counter()
  ref = compute(examples, model, buckets)
  say(f"reference log-probs{label}: {len(examples):,} examples in {time.perf_counter() - start:.1f} s")
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, ref)
    tmp.replace(cache)
  return dataclasses.replace(examples, ref_logps=ref)


def compute(examples: Any, model: nnx.Module, buckets: tuple[int, ...]) -> np.ndarray:
  """float32 [tokens]: log p(token | the tokens before it in its sequence) for every token of `examples`."""
  graphdef, state = nnx.split(model)
  out = np.zeros(examples.input_ids.shape, np.float32)
  lengths = examples.lengths
  order = np.argsort(lengths, kind="stable")  # similar lengths together: less padding, fewer shapes
  for group in np.array_split(order, range(_ROWS, len(order), _ROWS)):
    length = packing.bucket_for(int(lengths[group].max()), buckets)
    batch = _rows(examples, group, length)
    logps = np.asarray(_forward(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()}))
    for row, i in enumerate(group):
      start, end = examples.offsets[i], examples.offsets[i + 1]
      out[start:end] = logps[row, : end - start]
  return out


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """One compile per row length for every split of a run (the train and validation passes share it)."""
  return objectives.reference_log_probs(nnx.merge(graphdef, state), batch)


def _rows(examples: Any, group: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """One example per row, padded to `_ROWS` rows of `length` (a fixed shape per bucket)."""
  batch = {k: np.zeros((_ROWS, length), np.int32) for k in packing.BATCH_KEYS}
  for row, i in enumerate(group):
    start, end = examples.offsets[i], examples.offsets[i + 1]
    n, first = end - start, int(examples.parts[i]) or end - start
    batch["input_ids"][row, :n] = examples.input_ids[start:end]
    batch["loss_mask"][row, :n] = examples.loss_mask[start:end]
    batch["segment_ids"][row, :first], batch["segment_ids"][row, first:n] = 1, 2
    batch["positions"][row, :first], batch["positions"][row, first:n] = np.arange(first), np.arange(n - first)
  return batch
