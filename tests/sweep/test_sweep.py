"""Sweeps on the tiny config: a grid over train.steps picks 20 by validation loss and resumes after a kill
without rerunning a finished trial; the median pruner stops a trial that falls behind; bad sweep files."""

import json
import os
import signal
import sys

import pytest

from jaxtune.errors import ConfigError
from jaxtune.sweep import __main__ as sweep_main
from jaxtune.sweep import space

import tiny_runs

# Every trial: checkpoints only at the end, the persistent XLA cache, warmup short enough for one step.
BASE = ["--config.checkpoint.every=0", "--config.optim.warmup_steps=1", "--config.train.eval_batches=1"]


@pytest.fixture
def trial_env(tmp_path, monkeypatch):
  """Trial processes see the tiny runs' environment; the sweep's config caches live under tmp_path."""
  for key, value in tiny_runs.env().items():
    monkeypatch.setenv(key, value)
  return [f"--config.model.cache_dir={tmp_path / 'models'}", f"--config.data.cache_dir={tmp_path / 'data'}"]


def _sweep_file(tmp_path, **fields):
  path = tmp_path / "sweep.py"
  path.write_text(f"def get_sweep():\n  return {fields!r}\n")
  return path


def _trials(out):
  import optuna

  study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
  return study.get_trials(deepcopy=False)


@pytest.mark.slow  # 50 s on 2 cores: three trial processes and a restart
def test_grid_picks_most_steps_and_resumes_after_a_kill(tmp_path, trial_env, capsys):
  out = tmp_path / "sweep"
  args = ["--config", str(tiny_runs.CONFIGS / "tiny.py"), "--sweep", str(tiny_runs.CONFIGS / "sweeps/tiny_steps.py")]
  args += ["--out", str(out), *BASE, "--config.train.eval_every=0", *trial_env]
  # The sweep as its own process, stopped (SIGTERM) while its second trial runs.
  proc = tiny_runs.start([sys.executable, "-m", "jaxtune.sweep", *args], tmp_path / "first.log")
  started = lambda: (out / "trial_1" / "config.json").exists()
  assert tiny_runs.wait_for(started, proc, timeout=120), (tmp_path / "first.log").read_text()
  os.kill(proc.pid, signal.SIGTERM)
  proc.wait(60)
  first = {t.number: t for t in _trials(out)}
  assert first[0].state.name == "COMPLETE" and first[1].state.name == "FAIL"
  assert first[1].user_attrs["interrupted"]
  finished_log = (out / "trial_0" / "metrics.jsonl").read_text()

  assert sweep_main.main(args) == 0  # resume in this process
  trials = _trials(out)
  assert (out / "trial_0" / "metrics.jsonl").read_text() == finished_log  # not rerun
  complete = sorted(t.params["train.steps"] for t in trials if t.state.name == "COMPLETE")
  assert complete == [3, 5, 20]  # the interrupted trial's parameters ran again, once
  rows = (out / "results.csv").read_text().splitlines()
  assert rows[0].startswith("trial,state,eval/loss,train.steps") and rows[1].split(",")[3] == "20"
  assert (out / "results.md").read_text().count("| complete |") == 3
  best = tiny_runs.importlib.util.spec_from_file_location("best", out / "best_config.py")
  module = tiny_runs.importlib.util.module_from_spec(best)
  best.loader.exec_module(module)
  assert module.get_config().train.steps == 20
  assert (out / "history.png").stat().st_size > 1000 and (out / "importance.png").stat().st_size > 1000
  assert "best: trial" in capsys.readouterr().out


def test_median_pruner_stops_a_trial_that_falls_behind(tmp_path, trial_env):
  # Grid seed 1 runs lr 1e-2 for 20 steps first, then lr 0 (no learning) for 2,000: the second is pruned at its
  # first evaluation and stopped long before its end (a trial that short could finish before the sweep looks).
  params = {"optim.lr,train.steps": {"values": [[1e-2, 20], [0.0, 2000]]}}
  sweep = _sweep_file(tmp_path, method="grid", pruner="median", seed=1, params=params)
  out = tmp_path / "sweep"
  args = ["--config", str(tiny_runs.CONFIGS / "tiny.py"), "--sweep", str(sweep), "--out", str(out)]
  args += [*BASE, "--config.train.eval_every=5", *trial_env]
  assert sweep_main.main(args) == 0
  trials = {t.user_attrs["config"]["optim.lr"]: t for t in _trials(out)}
  assert trials[1e-2].state.name == "COMPLETE" and trials[0.0].state.name == "PRUNED"
  assert list(trials[0.0].intermediate_values) == [5]
  logged = [json.loads(line)["step"] for line in (out / "trial_1" / "metrics.jsonl").read_text().splitlines()]
  assert max(logged) < 1000  # stopped early


def test_bad_sweep_files(tmp_path):
  config = tiny_runs.load_config("tiny")
  with pytest.raises(ConfigError, match=r"'optim.learning_rate' is not a config key; did you mean optim.lr\?"):
    space.load(_sweep_file(tmp_path, params={"optim.learning_rate": {"low": 1e-4, "high": 1e-2}}), config)
  with pytest.raises(ConfigError, match="the search space is empty"):
    space.load(_sweep_file(tmp_path, method="random", params={}), config)
  with pytest.raises(ConfigError, match="a grid needs values"):
    space.load(_sweep_file(tmp_path, method="grid", params={"optim.lr": {"low": 1e-4, "high": 1e-2}}), config)
  with pytest.raises(ConfigError, match="each value must list 2 settings"):
    space.load(_sweep_file(tmp_path, params={"peft.lora.rank,peft.lora.alpha": {"values": [[8, 16.0], [4]]}}), config)
