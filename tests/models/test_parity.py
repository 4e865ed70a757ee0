"""Every family: jaxtune logits and greedy generations equal transformers' (PyTorch, float32)."""

import numpy as np
import pytest
import torch

import jaxtune
from jaxtune.generation import generate_ids

import tiny_configs
import tiny_hf

BATCH, SEQ = 3, 20  # SEQ > the sliding window (8) of the sliding families


@pytest.fixture(scope="module", params=sorted(tiny_configs.FAMILIES))
def pair(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  return request.param, tiny_hf.build(request.param, directory), jaxtune.load_model(directory)


@pytest.mark.parametrize("seq", [SEQ, 256])  # 256: the attention runs as two causal blocks
def test_logits_match_transformers_with_right_padding(pair, seq):
  family, hf_model, model = pair
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 128, size=(BATCH, seq))
  mask = np.ones((BATCH, seq), np.int64)
  mask[1, 13:] = 0  # right padding
  mask[2, 5:] = 0
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  out = np.asarray(model(ids, mask))
  assert out.shape == (BATCH, seq, 128)
  valid = mask.astype(bool)
  scale = np.abs(ref[valid]).max()
  assert np.abs(out - ref)[valid].max() <= 1e-4 * scale, family


def test_greedy_generation_matches_transformers(pair):
  family, hf_model, model = pair
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 11)]  # different lengths: left padding
  ours = generate_ids(model, prompts, max_new_tokens=32)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )
    assert got == ref[0, len(prompt) :].tolist(), family


def test_batched_left_padded_generation_matches_transformers(pair):
  family, hf_model, model = pair
  rng = np.random.default_rng(2)
  prompts = [rng.integers(3, 128, size=n).tolist() for n in (4, 9)]
  ours = generate_ids(model, prompts, max_new_tokens=12)
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    ref = hf_model.generate(
      ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
  assert ours == ref[:, width:].tolist(), family
