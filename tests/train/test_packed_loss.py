"""Packing changes nothing the model learns: packed rows give the loss, gradients and logits of unpacked ones."""

import jax
import numpy as np
from flax import nnx

from jaxtune.data import packing
from jaxtune.hf.load import init_model
from jaxtune.models.config import from_hf_dict
from jaxtune.train.step import loss_fn

import tiny_configs

TINY = tiny_configs.GEMMA2_WINDOW6


def _examples(n: int, seed: int = 0) -> list[packing.Example]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(5, 20))
    mask = (rng.random(length) < 0.6).astype(np.int32)
    mask[0] = 0  # nothing predicts an example's first token
    out.append((rng.integers(1, 96, size=length).astype(np.int32), mask))
  return out


def test_packed_batch_loss_grads_and_logits_equal_unpacked():
  model = init_model(from_hf_dict(TINY), seed=0)
  examples = _examples(7)
  rows = packing.pack([len(ids) for ids, _ in examples], 40, "ffd")
  packed = packing.collate([[examples[i] for i in row] for row in rows], 40)
  assert len(rows) < len(examples)  # it really packed
  unpacked = packing.collate([[e] for e in examples], 24)

  @nnx.jit  # compiled: the same program op by op takes ~10 s longer
  def loss_and_grads(m, batch):
    def loss(m):
      total, tokens, _ = loss_fn(m, batch, chunk=16)
      return total / tokens

    return nnx.value_and_grad(loss)(m)

  (lp, gp), (lu, gu) = loss_and_grads(model, packed), loss_and_grads(model, unpacked)
  np.testing.assert_allclose(lp, lu, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(np.abs(b).max(), 1e-6), rtol=1e-4)

  logits = nnx.jit(lambda m, b: m(b["input_ids"], segment_ids=b["segment_ids"], positions=b["positions"]))
  logits_packed, logits_alone = np.asarray(logits(model, packed)), np.asarray(logits(model, unpacked))
  for r, row in enumerate(rows):
    start = 0
    for i in row:
      n = len(examples[i][0])
      np.testing.assert_allclose(logits_packed[r, start : start + n], logits_alone[i, :n], atol=1e-5)
      start += n
