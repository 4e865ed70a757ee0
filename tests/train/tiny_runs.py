"""Helpers for the loop and checkpoint tests: the tiny config in a temp dir, runs as subprocesses, reading results."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
# Runs of the same config compile the same programs: a persistent XLA cache compiles them once per machine.
XLA_CACHE = REPO / ".pytest_cache" / "jaxtune-xla"
XLA_CACHE_MIN_SECS = "0.5"
jax.config.update("jax_compilation_cache_dir", str(XLA_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(XLA_CACHE_MIN_SECS))


def load_config(name: str):
  """configs/NAME.py's get_config(), loaded by path (as config_flags does)."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny(run_dir: pathlib.Path, cache: pathlib.Path, **overrides):
  """configs/tiny.py with its run dir, model cache and data cache under the test's temp dirs."""
  config = load_config("tiny")
  config.output_dir = str(run_dir)
  config.model.cache_dir = str(cache / "models")
  config.data.cache_dir = str(cache / "data")
  config.update_from_flattened_dict(overrides)
  return config


def cli_args(run_dir: pathlib.Path, cache: pathlib.Path, **overrides) -> list[str]:
  """`python -m jaxtune.train --config configs/tiny.py ...` with the same settings as `tiny()`."""
  settings = {"output_dir": run_dir, "model.cache_dir": cache / "models", "data.cache_dir": cache / "data", **overrides}
  return [sys.executable, "-m", "jaxtune.train", f"--config={CONFIGS / 'tiny.py'}"] + [
    f"--config.{k}={v}" for k, v in settings.items()
  ]


def env() -> dict[str, str]:
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(REPO),
    "JAX_COMPILATION_CACHE_DIR": str(XLA_CACHE),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": XLA_CACHE_MIN_SECS,
  }


def start(args: list[str], log: pathlib.Path) -> subprocess.Popen:
  log.parent.mkdir(parents=True, exist_ok=True)
  return subprocess.Popen(args, cwd=REPO, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def run(args: list[str], log: pathlib.Path, timeout: float = 240) -> subprocess.CompletedProcess:
  proc = start(args, log)
  try:
    proc.wait(timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  return subprocess.CompletedProcess(args, proc.returncode, log.read_text(), "")


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180, poll: float = 0.02) -> bool:
  """Polls until `predicate()` holds (True) or the process exits / time runs out (False)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return predicate()
    time.sleep(poll)
  return False


def complete_steps(run_dir: pathlib.Path) -> list[int]:
  """Step numbers of finished checkpoints (Orbax renames a step's temp dir when it is complete)."""
  d = run_dir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def metrics(run_dir: pathlib.Path) -> list[dict]:
  path = run_dir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def logged_step(run_dir: pathlib.Path) -> int:
  return max((m["step"] for m in metrics(run_dir)), default=0)


def train_curve(run_dir: pathlib.Path, keys=("train/loss", "train/grad_norm", "train/lr", "train/accuracy")):
  """{step: (values of keys)} of the train lines (the last line of a step wins)."""
  return {m["step"]: tuple(m[k] for k in keys) for m in metrics(run_dir) if "train/loss" in m}


def saved_state(run_dir: pathlib.Path, step: int) -> dict:
  """The TrainState tree of checkpoint `step` as numpy arrays (no model needed)."""
  import orbax.checkpoint as ocp

  tree = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v) for path, v in flat}
