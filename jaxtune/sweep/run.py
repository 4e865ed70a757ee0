"""Run a sweep: an Optuna study in SWEEP_DIR/study.db, each trial a `jaxtune train` process of its own.

A trial's process writes SWEEP_DIR/trial_N (a normal run directory); this process follows its
metrics.jsonl, reports each evaluation of the objective to Optuna and, when the pruner says so, stops
the trial (SIGTERM: it saves and exits). Nothing is kept in memory across trials. A killed sweep
started again with the same directory loads the study: finished trials stay as they are, a trial the
kill interrupted is marked failed and its parameters run again.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from jaxtune.errors import UserError
from jaxtune.sweep.space import Sweep

STUDY = "study.db"
POLL_S = 0.2


class TrialFailed(Exception):
  """A trial whose process failed or logged no objective; the study records it as failed and goes on."""


@dataclasses.dataclass
class Settings:
  config_spec: str  # the --config value, made absolute when it is a file
  overrides: list[tuple[str, str]]  # the user's --config.KEY=VALUE, applied before a trial's parameters
  sweep: Sweep
  out: pathlib.Path


def _sampler(sweep: Sweep):
  import optuna

  if sweep.method == "grid":
    return optuna.samplers.GridSampler(sweep.grid_space(), seed=sweep.seed)
  if sweep.method == "random":
    return optuna.samplers.RandomSampler(seed=sweep.seed)
  return optuna.samplers.TPESampler(seed=sweep.seed)


def _pruner(sweep: Sweep):
  import optuna

  if sweep.pruner == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
  if sweep.pruner == "asha":
    return optuna.pruners.SuccessiveHalvingPruner()
  return optuna.pruners.NopPruner()


def open_study(settings: Settings):
  """The study in OUT/study.db (created, or loaded to resume), and how many trials are still to run."""
  import optuna

  optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says what happened
  settings.out.mkdir(parents=True, exist_ok=True)
  sweep = settings.sweep
  study = optuna.create_study(
    study_name="sweep",
    storage=f"sqlite:///{settings.out / STUDY}",
    sampler=_sampler(sweep),
    pruner=_pruner(sweep),
    direction=sweep.direction,
    load_if_exists=True,
  )
  State = optuna.trial.TrialState
  trials = study.get_trials(deepcopy=False)
  for trial in trials:
    interrupted = trial.state == State.RUNNING or (trial.state == State.FAIL and trial.user_attrs.get("interrupted"))
    if not interrupted or any(t.number > trial.number and t.params == trial.params for t in trials):
      continue
    if trial.state == State.RUNNING:  # its sweep was killed outright
      study._storage.set_trial_state_values(trial._trial_id, State.FAIL)
    study.enqueue_trial(trial.params, skip_if_exists=False)  # its parameters run again
  done = len(study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED)))
  budget = min(sweep.trials, sweep.grid_size()) if sweep.method == "grid" else sweep.trials
  return study, max(budget - done, 0)


def trial_command(settings: Settings, values: dict[str, Any], run_dir: pathlib.Path) -> list[str]:
  """`python -m jaxtune.train --config X [user overrides] [trial values] --config.output_dir=...`."""
  args = [sys.executable, "-m", "jaxtune.train", f"--config={settings.config_spec}"]
  args += [f"--config.{k}={v}" for k, v in settings.overrides]
  args += [f"--config.{k}={_text(v)}" for k, v in values.items()]
  return args + [f"--config.output_dir={run_dir}", "--config.logging.progress=False"]


def _text(value: Any) -> str:
  return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _objective_lines(path: pathlib.Path, key: str, seen: int) -> tuple[list[tuple[int, float]], int]:
  """(step, value) of the objective in metrics.jsonl lines after the first `seen` bytes, and the new offset."""
  if not path.exists():
    return [], seen
  with path.open() as f:
    f.seek(seen)
    text = f.read()
  complete = text[: text.rfind("\n") + 1]
  found = []
  for line in complete.splitlines():
    if line.strip():
      row = json.loads(line)
      if key in row:
        found.append((int(row["step"]), float(row[key])))
  return found, seen + len(complete.encode())


def run_trial(trial, settings: Settings, say=print) -> float:
  """One trial in its own process; reports each evaluation, prunes, returns the objective's last value."""
  import optuna

  values = {}
  for param in settings.sweep.params:
    values.update(param.suggest(trial))
  run_dir = settings.out / f"trial_{trial.number}"
  trial.set_user_attr("run_dir", str(run_dir))
  trial.set_user_attr("config", values)
  say(f"trial {trial.number}: {', '.join(f'{k}={v}' for k, v in values.items())}")
  log = run_dir.parent / f"trial_{trial.number}.log"
  run_dir.mkdir(parents=True, exist_ok=True)
  key, offset, last = settings.sweep.objective, 0, None
  with log.open("w") as out:
    proc = subprocess.Popen(
      trial_command(settings, values, run_dir), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
      while True:
        finished = proc.poll() is not None
        found, offset = _objective_lines(run_dir / "metrics.jsonl", key, offset)
        for step, value in found:
          last = value
          trial.report(value, step)
          if trial.should_prune():
            _stop(proc)
            say(f"trial {trial.number}: pruned at step {step} ({key} {value:.4g})")
            raise optuna.TrialPruned()
        if finished:
          break
        time.sleep(POLL_S)
    except KeyboardInterrupt:  # the sweep is stopping: a resumed sweep runs these parameters again
      trial.set_user_attr("interrupted", True)
      raise
    finally:
      _stop(proc)
  why = None
  if proc.returncode != 0:
    why = f"exited with code {proc.returncode}"
  elif last is None or not math.isfinite(last):
    why = f"logged no finite {key} (set train.eval and validation data)"
  if why:
    say(f"trial {trial.number}: failed: {why}; see {log}")
    raise TrialFailed(why)
  say(f"trial {trial.number}: {key} {last:.6g}")
  return last


def _stop(proc: subprocess.Popen) -> None:
  """SIGTERM to the trial's process group (the run saves and exits), then SIGKILL after 30 s."""
  if proc.poll() is not None:
    return
  try:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  except ProcessLookupError:
    pass


def sweep(settings: Settings, say=print) -> dict[str, Any]:
  """Runs the trials still to run, then writes the results table, the best config and the plots."""
  import optuna

  study, todo = open_study(settings)
  if todo:
    say(f"sweep: {todo} trial(s) to run ({settings.sweep.method}); study {settings.out / STUDY}")
    study.optimize(lambda t: run_trial(t, settings, say), n_trials=todo, catch=(TrialFailed,))
  else:
    say(f"sweep: every trial has run; study {settings.out / STUDY}")
  complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
  if not complete:
    raise UserError(f"{settings.out}: no trial finished; read the trial_N.log files there")
  write_results(study, settings)
  best = study.best_trial
  path = write_best_config(best, settings)
  plots = write_plots(study, settings.out, say)
  say(f"best: trial {best.number}, {settings.sweep.objective} {best.value:.6g}; config {path}")
  return {"best_trial": best.number, "best_value": best.value, "best_config": str(path), "plots": plots}


def _rows(study, sweep: Sweep) -> list[dict[str, Any]]:
  """One row per trial, sorted by the objective (best first; trials without a value last)."""
  rows = []
  for t in study.get_trials(deepcopy=False):
    row = {"trial": t.number, "state": t.state.name.lower(), sweep.objective: t.value}
    if t.value is None and t.intermediate_values:
      last = max(t.intermediate_values)
      row[f"{sweep.objective} (last)"] = t.intermediate_values[last]
    row.update(t.user_attrs.get("config", {}))
    row["run_dir"] = t.user_attrs.get("run_dir", "")
    rows.append(row)
  sign = 1 if sweep.direction == "minimize" else -1
  return sorted(rows, key=lambda r: (r[sweep.objective] is None, sign * (r[sweep.objective] or 0), r["trial"]))


def write_results(study, settings: Settings) -> None:
  """OUT/results.csv and OUT/results.md, sorted by the objective."""
  rows = _rows(study, settings.sweep)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with (settings.out / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  (settings.out / "results.md").write_text("\n".join(lines) + "\n")


def write_best_config(best, settings: Settings) -> pathlib.Path:
  """OUT/best_config.py: the base config with the user's overrides and the best trial's values; runnable."""
  overrides = [(k, v) for k, v in settings.overrides] + [
    (k, _text(v)) for k, v in best.user_attrs.get("config", {}).items()
  ]
  text = f'''"""The best trial of the sweep in {settings.out}:
trial {best.number}, {settings.sweep.objective} {best.value:.6g}.

    python -m jaxtune.train --config {settings.out / "best_config.py"}
"""

import ml_collections

from jaxtune import configs

BASE = {settings.config_spec!r}
OVERRIDES = {tuple(overrides)!r}


def get_config() -> ml_collections.ConfigDict:
  config = configs.load(BASE, OVERRIDES)
  config.output_dir = {str(settings.out / "best")!r}
  return config
'''
  path = settings.out / "best_config.py"
  path.write_text(text)
  return path


def write_plots(study, out: pathlib.Path, say=print) -> list[str]:
  """objective per trial and parameter importance as PNG files (Optuna's matplotlib backend)."""
  import matplotlib

  matplotlib.use("Agg")
  import warnings

  import matplotlib.pyplot as plt
  from optuna.visualization import matplotlib as optuna_plots

  written = []
  for name, plot in (("history.png", optuna_plots.plot_optimization_history), ("importance.png", _importance)):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
      try:
        ax = plot(study) if plot is not _importance else plot(study, optuna_plots)
      except (ValueError, RuntimeError) as e:  # e.g. importance with one finished trial
        say(f"plot {name}: skipped ({e})")
        continue
    ax.figure.savefig(out / name, dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
    written.append(str(out / name))
  return written


def _importance(study, optuna_plots):
  import optuna

  if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < 2:
    raise ValueError("parameter importance needs two finished trials")
  return optuna_plots.plot_param_importances(study)


def absolute_spec(spec: str) -> str:
  """A --config file as an absolute path (trials run from any directory); a shipped name as it is."""
  path = pathlib.Path(spec).expanduser()
  return str(path.absolute()) if path.is_file() else spec


def trial_overrides(overrides: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  return [(k, v) for k, v in overrides if k != "output_dir"]
