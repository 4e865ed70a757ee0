"""A reward model exports as transformers' *ForSequenceClassification and scores there as it does here."""

import jax.numpy as jnp
import numpy as np

from jaxtune.export.merged import export_merged
from jaxtune.hf.load import load_model
from jaxtune.train import objectives

import export_helpers


def test_reward_model_scores_the_same_in_transformers(tmp_path):
  """Scores of sequences that end in the pad token's id (pooled one token earlier), padding, and neither."""
  import torch
  import transformers

  source = export_helpers.write_tiny_llama(tmp_path / "base")
  pad = transformers.AutoConfig.from_pretrained(source).pad_token_id
  model = load_model(source)
  model.add_score_head(seed=3, std=0.5)
  out = export_merged(model, source, tmp_path / "reward", pad_id=pad)

  rng = np.random.default_rng(0)
  rows = [rng.integers(5, 250, n).tolist() for n in (7, 4, 9)]
  rows[1] = rows[1] + [pad]  # an EOS that is the pad token: transformers scores the token before it
  width = max(map(len, rows))
  ids = np.full((len(rows), width), pad, np.int32)
  segments = np.zeros_like(ids)
  for r, row in enumerate(rows):
    ids[r, : len(row)], segments[r, : len(row)] = row, 1

  hidden, _ = model.hidden_states(jnp.asarray(ids), segment_ids=jnp.asarray(segments))
  pooled = objectives.last_scored(jnp.asarray(ids), jnp.asarray(segments), pad)
  ours = np.asarray(jnp.sum(model.scores(hidden)[..., 0] * pooled, axis=1))

  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
  assert hf.config.pad_token_id == pad and hf.config.num_labels == 1
  with torch.no_grad():
    theirs = hf(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(segments)).logits[:, 0].numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
  assert np.ptp(ours) > 0.1  # the scores differ: the test would see a wrong pooling position
