"""GRPO runs of configs/grpo_tiny.py: metrics, exact resume (sampling included), 8 fake devices equal one."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxtune.train import loop

import tiny_runs

HERE = pathlib.Path(__file__).resolve().parent
KEYS = ("train/loss", "train/grad_norm", "train/reward", "train/completions/mean_length", "train/entropy")


def _config(run_dir, cache, **overrides):
  config = tiny_runs.load_config("grpo_tiny")
  config.output_dir = str(run_dir)
  config.model.cache_dir = str(cache / "models")
  config.update_from_flattened_dict(overrides)
  return config


def _curve(run_dir):
  return {m["step"]: tuple(m[k] for k in KEYS) for m in tiny_runs.metrics(run_dir) if "train/loss" in m}


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
  """num_iterations=2 and a checkpoint at step 3, inside a sampled batch's two steps: the resumed run re-uses the
  saved batch, then samples what the uninterrupted run sampled (same prompts, same keys)."""
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  settings = {"grpo.num_iterations": 2, "checkpoint.every": 3, "train.eval_every": 0}
  result = loop.train(_config(whole, tmp_path, **settings))
  assert result["step"] == 6
  shutil.copytree(whole, cut)
  shutil.rmtree(cut / "checkpoints" / "6")
  lines = (cut / "metrics.jsonl").read_text().splitlines()
  (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 3))
  loop.train(_config(cut, tmp_path, **settings))
  want, got = _curve(whole), _curve(cut)
  assert sorted(got) == list(range(1, 7))
  for step in range(4, 7):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-6, err_msg=f"step {step}")
  a, b = tiny_runs.saved_state(whole, 6), tiny_runs.saved_state(cut, 6)
  assert len(_leaves(a)) > 3
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)
  metrics = tiny_runs.metrics(whole)[-1]
  for key in ("train/clip_ratio/region_mean", "train/wasted_tokens", "train/time/generation_share"):
    assert key in metrics and np.isfinite(metrics[key])
  steps = {m["step"]: m for m in tiny_runs.metrics(whole) if "train/reward" in m}
  assert steps[3]["train/reward"] == steps[4]["train/reward"]  # one sampled batch, two steps
  assert steps[4]["train/clip_ratio/region_mean"] >= 0 and steps[3]["train/loss"] != steps[4]["train/loss"]


def _leaves(tree):
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _leaves(tree[k])]
  return [np.asarray(tree)]


def _devices(losses: str, meshes: str) -> dict:
  env = {**tiny_runs.env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run(
    [sys.executable, str(HERE / "grpo_devices.py"), losses, meshes],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    cwd=tiny_runs.REPO,
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return json.loads(out.stdout.split("RESULTS ", 1)[1])


def _check_devices(results: dict) -> None:
  for loss, runs in results.items():
    single = runs.pop("single")
    assert max(abs(np.asarray(g)).max() for g in single["grads"].values()) > 1e-3
    for mesh, got in runs.items():
      for key in ("loss", "kl", "entropy", "clip_ratio/region_mean"):
        assert abs(got["metrics"][key] - single["metrics"][key]) < 1e-5, (loss, mesh, key)
      for name, grad in single["grads"].items():
        np.testing.assert_allclose(got["grads"][name], grad, atol=1e-5, rtol=0, err_msg=f"{loss} {mesh} {name}")


def test_eight_devices_give_the_one_device_loss_and_gradients():
  _check_devices(_devices("dapo", "fsdp"))


@pytest.mark.slow
def test_eight_devices_every_mesh_and_loss():
  _check_devices(_devices("dapo,grpo,bnpo,dr_grpo", "dp,fsdp,fsdp_tp"))
