"""Preference objectives through the whole loop (configs/dpo_tiny.py): TRL's metric names in metrics.jsonl,
exact resume, the precomputed reference (cached) against the live one, a reward model's export, and the
objective / data checks."""

import math

import numpy as np
import pytest

from jaxtune.errors import ConfigError
from jaxtune.export.run import export_run, load_run
from jaxtune.tasks import meeting_json
from jaxtune.train import loop

import tiny_runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def dpo_tiny(run_dir, cache, **overrides):
  config = tiny_runs.load_config("dpo_tiny")
  config.output_dir = str(run_dir)
  config.model.cache_dir = str(cache / "models")
  config.data.cache_dir = str(cache / "data")
  config.update_from_flattened_dict({"train.steps": 6, "train.eval_every": 3, "checkpoint.every": 3, **overrides})
  return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
  run_dir = tmp_path_factory.mktemp("dpo")
  return run_dir, loop.train(dpo_tiny(run_dir, cache))


def test_dpo_logs_trl_metrics_and_learns(straight):
  run_dir, result = straight
  metrics = tiny_runs.metrics(run_dir)
  train = [m for m in metrics if "train/loss" in m]
  assert train[0]["train/loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at step 1
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
    assert f"train/{key}" in train[-1] and f"eval/{key}" in result, key
  assert train[-1]["train/loss"] < train[0]["train/loss"] and train[-1]["train/rewards/margins"] > 0
  assert result["eval/rewards/accuracies"] > 0.5 and result["eval/examples"] == 4  # 2 batches of 2 pairs


def test_dpo_resumes_exactly(straight, tmp_path, cache):
  run_dir, result = straight
  loop.train(dpo_tiny(tmp_path, cache, **{"train.steps": 3}))
  resumed = loop.train(dpo_tiny(tmp_path, cache))
  assert resumed["step"] == 6
  for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen"):
    assert resumed[key] == result[key], key
  assert tiny_runs.train_curve(tmp_path, ("train/loss",)) == tiny_runs.train_curve(run_dir, ("train/loss",))


def test_precomputed_reference_matches_live_and_is_cached(straight, tmp_path, cache, capsys):
  run_dir, _ = straight
  overrides = {"reference": "precomputed", "train.steps": 3, "train.eval": False, "checkpoint.every": 0}
  loop.train(dpo_tiny(tmp_path / "a", cache, **overrides))
  assert "reference log-probs (train): 256 examples" in capsys.readouterr().out
  loop.train(dpo_tiny(tmp_path / "b", cache, **overrides))
  assert "reference log-probs (train): read from" in capsys.readouterr().out
  loop.train(dpo_tiny(tmp_path / "c", cache, **overrides, **{"data.max_prompt_length": 90}))  # other examples
  assert "reference log-probs (train): 256 examples" in capsys.readouterr().out
  keys = ("train/loss", "train/rewards/margins")
  live = tiny_runs.train_curve(run_dir, keys)
  precomputed = tiny_runs.train_curve(tmp_path / "b", keys)
  assert sorted(precomputed) == [1, 2, 3]
  np.testing.assert_allclose([precomputed[s] for s in (1, 2, 3)], [live[s] for s in (1, 2, 3)], rtol=2e-5, atol=1e-6)


def test_reward_model_trains_and_exports(tmp_path, cache):
  import torch
  import transformers

  overrides = {"objective": "reward", "train.steps": 4, "train.eval_every": 0, "checkpoint.every": 0}
  result = loop.train(dpo_tiny(tmp_path / "run", cache, **overrides))
  assert result["eval/accuracy"] >= 0 and "eval/margin" in result
  out = export_run(tmp_path / "run", tmp_path / "export", "merged")
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
  ids = np.asarray([[5, 9, 12, 40, 7], [8, 3, 30, 2, 11]])
  with torch.no_grad():
    theirs = hf(torch.as_tensor(ids)).logits[:, 0].numpy()
  model = load_run(tmp_path / "run").model
  hidden, _ = model.hidden_states(ids)
  np.testing.assert_allclose(np.asarray(model.scores(hidden))[:, -1, 0], theirs, rtol=1e-4, atol=1e-5)


def test_objective_and_data_must_agree(tmp_path, cache):
  with pytest.raises(ConfigError, match="objective=dpo"):
    loop.train(dpo_tiny(tmp_path / "a", cache, objective="sft"))
  chat = (str(meeting_json.DATA / "train.jsonl"),)
  config = dpo_tiny(tmp_path / "b", cache)
  config.data.train, config.data.validation, config.train.eval_every = chat, (), 0
  with pytest.raises(ConfigError, match="prompt/chosen/rejected"):
    loop.train(config)
