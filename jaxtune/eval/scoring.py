"""Teacher-forced scoring of token sequences: log-likelihood, greedy agreement and token accuracy of targets.

Serves perplexity / token accuracy in `python -m jaxtune.eval` and lm-eval's loglikelihood requests.
Rows are right-padded to a multiple of 32 tokens, so a few shapes compile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_BUCKET = 32


@dataclasses.dataclass
class Scores:
  """Per sequence: the summed log-probability of its targets, their count, how many are the argmax."""

  logprob: np.ndarray  # float64 [N]
  targets: np.ndarray  # int [N]
  correct: np.ndarray  # int [N]

  @property
  def greedy(self) -> np.ndarray:
    """Whether every target is the model's argmax (lm-eval's is_greedy)."""
    return self.correct == self.targets


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, ids_BT, valid_BT, target_BT):
  model = nnx.merge(graphdef, state)
  positions = jnp.maximum(jnp.cumsum(valid_BT, axis=-1) - 1, 0)
  logits = model(ids_BT, segment_ids=valid_BT, positions=positions).astype(jnp.float32)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nxt = ids_BT[:, 1:]
  picked = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
  weight = target_BT[:, 1:].astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == nxt).astype(jnp.float32) * weight
  return (picked * weight).sum(-1), weight.sum(-1), correct.sum(-1)


def score_targets(
  model, sequences: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *, batch_size: int = 8
) -> Scores:
  """Scores of each sequence's tokens where its `targets` mask is 1 (each predicted from the tokens before it)."""
  graphdef, state = nnx.split(model)
  out = [], [], []
  for start in range(0, len(sequences), batch_size):
    rows = sequences[start : start + batch_size]
    masks = targets[start : start + batch_size]
    length = -(-max(len(r) for r in rows) // _BUCKET) * _BUCKET
    ids = np.zeros((batch_size, length), np.int32)
    valid = np.zeros((batch_size, length), np.int32)
    target = np.zeros((batch_size, length), np.int32)
    for i, (row, mask) in enumerate(zip(rows, masks)):
      ids[i, : len(row)], valid[i, : len(row)], target[i, : len(row)] = row, 1, mask
    for acc, value in zip(out, _score(graphdef, state, ids, valid, target)):
      acc.append(np.asarray(value, np.float64)[: len(rows)])
  logprob, count, correct = (np.concatenate(v) if v else np.zeros(0) for v in out)
  return Scores(logprob, count.astype(int), correct.astype(int))
