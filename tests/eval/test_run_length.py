"""Run length and stopping on the tiny config: train.steps=0 from epochs, early stopping, task metrics in the loop."""

import json

import pytest

from jaxtune.errors import ConfigError
from jaxtune.tasks import meeting_json
from jaxtune.train import loop

import tiny_runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def test_steps_from_epochs_with_task_metrics(tmp_path, cache, capsys):
  lines = (meeting_json.DATA / "train.jsonl").read_text().splitlines()
  (tmp_path / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")  # 5 batches of 8
  test_lines = (meeting_json.DATA / "test.jsonl").read_text().splitlines()[:4]
  (tmp_path / "test.jsonl").write_text("\n".join(test_lines) + "\n")
  config = tiny_runs.tiny(
    tmp_path / "run",
    cache,
    **{
      "data.train": (str(tmp_path / "train.jsonl"),),
      "data.num_epochs": 2,
      "train.steps": 0,
      "optim.warmup_steps": 1,
      "train.eval_every": 5,
      "train.eval_metrics": "json_fields",
      "checkpoint.every": 5,
      "task.test_file": str(tmp_path / "test.jsonl"),
      "task.scorer": "json",
      "task.metrics": "squad_f1,rougeL",
      "task.max_new_tokens": 4,
      "task.before": False,
    },
  )
  result = loop.train(config)
  out = capsys.readouterr().out
  assert "train.steps=0: 2 epoch(s) x 5 batches = 10 steps" in out
  assert result["step"] == 10 and result["stopped"] is None
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["train"]["steps"] == 10  # the schedule and the saved config use the derived length
  logged = {k: v for m in tiny_runs.metrics(tmp_path / "run") for k, v in m.items()}
  assert 0.0 <= logged["eval/json_fields"] <= 1.0  # at the eval steps
  lo, hi = result["eval/squad_f1_after_ci_low"], result["eval/squad_f1_after_ci_high"]
  assert lo <= result["eval/squad_f1_after"] <= hi and "eval/rougeL_after" in result
  assert result["eval/exact_match_after"] == result["eval/json_after"]


def test_early_stopping_stops_when_the_metric_stalls(tmp_path, cache, capsys):
  # eval/loss can only be "improved" by more than 100: the second evaluation stops the run.
  config = tiny_runs.tiny(
    tmp_path / "run",
    cache,
    **{
      "train.steps": 40,
      "train.eval_every": 2,
      "checkpoint.every": 2,
      "train.early_stop_patience": 1,
      "train.early_stop_min_delta": 100.0,
    },
  )
  result = loop.train(config)
  assert result["step"] == 4 and result["stopped"] == "early"
  assert "stopped early at step 4: eval/loss did not improve for 1 evaluations" in capsys.readouterr().out
  assert tiny_runs.complete_steps(tmp_path / "run")[-1] == 4


def test_run_length_settings_that_cannot_work(tmp_path, cache):
  with pytest.raises(
    ConfigError, match=r"train.steps: 0 trains data.num_epochs epochs, but that is 0; set .* or data.num_epochs >= 1"
  ):
    loop.prepare(tiny_runs.tiny(tmp_path, cache, **{"train.steps": 0}))
  with pytest.raises(ConfigError, match=r"train.early_stop_patience: needs evaluations"):
    loop.prepare(tiny_runs.tiny(tmp_path, cache, **{"train.early_stop_patience": 2, "train.eval_every": 0}))
  with pytest.raises(ConfigError, match=r"task.metrics: unknown metric 'blue'; did you mean 'bleu'"):
    loop.prepare(tiny_runs.tiny(tmp_path, cache, **{"task.test_file": __file__, "task.metrics": "blue"}))


def test_without_a_task_file_the_test_split_is_scored_before_and_after(tmp_path, cache, capsys):
  settings = {"train.steps": 2, "data.test_fraction": 0.05, "task.num_examples": 6, "task.max_new_tokens": 4}
  result = loop.train(tiny_runs.tiny(tmp_path, cache, **settings))
  out = capsys.readouterr().out
  assert "json before training: 0/6" in out and "json after training:" in out  # 6 records of the held-out split
  assert "eval/exact_match_after" in result and "eval/exact_match_before" in result
