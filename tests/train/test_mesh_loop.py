"""The training command on a mesh of 8 fake CPU devices gives the single-device run's losses and checkpoint."""

import json
import subprocess

import numpy as np
import pytest

import tiny_runs


def _start(run_dir, cache, devices: int, preset: str, method: str) -> subprocess.Popen:
  env = tiny_runs.env()
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  args = tiny_runs.cli_args(
    run_dir,
    cache,
    **{
      "mesh.preset": preset,
      "peft.method": method,
      "train.steps": 4,
      "data.batch_size": 16,
      "checkpoint.every": 0,
      "train.eval": False,
      "task.test_file": "",
    },
  )
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(proc: subprocess.Popen, run_dir) -> list[float]:
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [m["train/loss"] for m in lines if "train/loss" in m]


@pytest.mark.parametrize("preset,method", [("fsdp_tp", "lora"), ("fsdp", "full")])
def test_mesh_run_matches_one_device(tmp_path, preset, method):
  # Both runs at once: most of each is single-threaded start-up, which then overlaps. They may
  # share the model and data caches, which are written atomically.
  cache = tmp_path / "cache"
  procs = [_start(tmp_path / "one", cache, 1, "fsdp", method), _start(tmp_path / "eight", cache, 8, preset, method)]
  try:
    one, eight = _losses(procs[0], tmp_path / "one"), _losses(procs[1], tmp_path / "eight")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert len(one) == len(eight) == 4
  np.testing.assert_allclose(eight, one, rtol=2e-4)
