"""The training command on a mesh of 8 fake CPU devices gives the single-device run's losses and checkpoint."""

import json
import subprocess

import numpy as np
import pytest

import tiny_runs


def _run(run_dir, cache, devices: int, preset: str, method: str) -> list[float]:
  env = tiny_runs.env()
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  args = tiny_runs.cli_args(run_dir, cache, **{"mesh.preset": preset, "peft.method": method, "train.steps": 4,
                                               "data.batch_size": 16,
                                               "checkpoint.every": 0, "train.eval": False, "task.test_file": ""})
  subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=600)
  lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [l["train/loss"] for l in lines if "train/loss" in l]


@pytest.mark.parametrize("preset,method", [("fsdp_tp", "lora"), ("fsdp", "full")])
def test_mesh_run_matches_one_device(tmp_path, preset, method):
  cache = tmp_path / "cache"
  one = _run(tmp_path / "one", cache, 1, "fsdp", method)
  eight = _run(tmp_path / "eight", cache, 8, preset, method)
  assert len(one) == len(eight) == 4
  np.testing.assert_allclose(eight, one, rtol=2e-4)
