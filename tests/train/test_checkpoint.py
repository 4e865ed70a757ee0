"""Checkpoints: exact resume after SIGKILL, SIGTERM saves and exits cleanly, corrupt checkpoints are skipped."""

import os
import signal
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.train import checkpoint as ckpt_lib
from jaxtune.train import loop

import tiny_runs

STEPS = 40
# Checkpoints every 5 steps; evaluation in the middle too, so the resumed run must also evaluate identically.
SETTINGS = {"train.steps": STEPS, "checkpoint.every": 5, "checkpoint.keep": 3, "train.eval_every": 20}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def _fake_state(scale: float) -> dict:
  return {
    "params": {"a": jnp.arange(64.0) * scale, "b": jnp.ones((3, 2), jnp.bfloat16) * scale},
    "step": jnp.int32(scale),
    "rng": jnp.array([1, 2], jnp.uint32),
  }


@pytest.mark.parametrize(
  "adapter",
  [
    pytest.param({}, id="lora"),
    # DoRA with dropout: magnitudes in the checkpoint, and the dropped-out base product in every step
    pytest.param({"peft.lora.use_dora": True, "peft.lora.dropout": 0.1}, marks=pytest.mark.slow, id="dora"),
  ],
)
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, cache, adapter):
  settings = {**SETTINGS, **adapter}
  ref_dir, cut_dir = tmp_path / "reference", tmp_path / "interrupted"
  # The reference runs beside the victim (their start-ups overlap); the resumed run comes after
  # both and finds the step in the persistent XLA cache. The model and data caches are written
  # atomically, so the two may build them at once.
  reference = tiny_runs.start(tiny_runs.cli_args(ref_dir, cache, **settings), tmp_path / "reference.log")
  victim = tiny_runs.start(tiny_runs.cli_args(cut_dir, cache, **settings), tmp_path / "victim.log")
  try:
    # Kill once step 15's checkpoint is complete and training has gone past it (steps 16.. are lost).
    reached = tiny_runs.wait_for(
      lambda: 15 in tiny_runs.complete_steps(cut_dir) and tiny_runs.logged_step(cut_dir) >= 17, victim
    )
    alive = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
  finally:
    if victim.poll() is None:
      victim.kill()
    try:
      reference.wait(240)
    finally:
      if reference.poll() is None:
        reference.kill()
  assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]
  assert reached and alive, (tmp_path / "victim.log").read_text()[-3000:]
  killed_at = tiny_runs.logged_step(cut_dir)
  assert killed_at < STEPS

  resumed = tiny_runs.run(tiny_runs.cli_args(cut_dir, cache, **settings, resume="auto"), tmp_path / "resumed.log")
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert "resumed from" in resumed.stdout

  ref_state, cut_state = tiny_runs.saved_state(ref_dir, STEPS), tiny_runs.saved_state(cut_dir, STEPS)
  assert ref_state.keys() == cut_state.keys()
  assert any("lora_magnitude" in key for key in ref_state) == bool(adapter)
  for key in ref_state:
    np.testing.assert_array_equal(cut_state[key], ref_state[key], err_msg=key)
  # The same loss curve, step for step, bit for bit (lines after the restored step were replaced).
  assert tiny_runs.train_curve(cut_dir) == tiny_runs.train_curve(ref_dir)
  evals = lambda d: [(m["step"], m["eval/loss"]) for m in tiny_runs.metrics(d) if "eval/loss" in m]
  assert evals(cut_dir) == evals(ref_dir)
  assert [m["step"] for m in tiny_runs.metrics(cut_dir) if "train/loss" in m] == list(range(1, STEPS + 1))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache):
  run_dir = tmp_path / "run"
  settings = {**SETTINGS, "train.steps": 500, "checkpoint.every": 0}
  proc = tiny_runs.start(tiny_runs.cli_args(run_dir, cache, **settings), tmp_path / "run.log")
  try:
    reached = tiny_runs.wait_for(lambda: tiny_runs.logged_step(run_dir) >= 3, proc)
    assert reached and proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
  log = (tmp_path / "run.log").read_text()
  steps = tiny_runs.complete_steps(run_dir)
  assert len(steps) == 1 and 3 <= steps[0] < 500, log[-2000:]
  assert f"checkpoints/{steps[0]}" in log and "resume with --config.resume=auto" in log
  assert int(tiny_runs.saved_state(run_dir, steps[0])["step"]) == steps[0]


# Orbax leaves un-awaited read coroutines behind when an array file is truncated; they are harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, cache):
  config = tiny_runs.tiny(
    tmp_path, cache, **{"train.steps": 12, "checkpoint.every": 5, "train.eval": False, "train.eval_every": 0}
  )
  loop.train(config)
  assert tiny_runs.complete_steps(tmp_path) == [10, 12]
  data_files = sorted((tmp_path / "checkpoints" / "12" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  with open(data_files[-1], "r+b") as f:  # truncate the newest checkpoint's largest array file
    f.truncate(f.seek(0, os.SEEK_END) // 2)

  with pytest.warns(RuntimeWarning, match="checkpoints/12 is corrupt or incomplete"):
    result = loop.train(config)
  assert result["step"] == 12
  assert tiny_runs.complete_steps(tmp_path) == [10, 12]
  assert list((tmp_path / "checkpoints_corrupt").iterdir())  # kept aside for inspection
  lines = [m["step"] for m in tiny_runs.metrics(tmp_path) if "train/loss" in m]
  assert lines == list(range(1, 13))  # steps 11 and 12 were redone and logged once


def test_checksums_catch_silent_corruption(tmp_path):
  ckpts = ckpt_lib.Checkpoints(tmp_path / "ckpt", keep=3)
  for step in (1, 2):
    ckpts.save(step, _fake_state(step), data_state={"epoch": 0, "batch": step}, config={"model": {"path": "m"}})
  ckpts.wait()
  # A value changed behind Orbax's back (as bit rot would): re-save step 2's arrays with one number altered
  # but keep the recorded checksums.
  import orbax.checkpoint as ocp

  state_dir = tmp_path / "ckpt" / "2" / "state"
  tree = ocp.StandardCheckpointer().restore(state_dir)
  tree["params"]["a"] = np.asarray(tree["params"]["a"]).copy()
  tree["params"]["a"][7] += 1.0
  import shutil

  shutil.rmtree(state_dir)
  with ocp.StandardCheckpointer() as c:
    c.save(state_dir, tree)
  fresh = ckpt_lib.Checkpoints(tmp_path / "ckpt", keep=3)
  with pytest.warns(RuntimeWarning, match="checksum mismatch in params/a"):
    restored = fresh.restore(_fake_state(0), {"model": {"path": "m"}})
  assert restored.step == 1 and restored.data_state == {"epoch": 0, "batch": 1}
  np.testing.assert_array_equal(restored.state["params"]["a"], np.arange(64.0))


def test_keep_last_k_and_best_by_validation_loss(tmp_path):
  ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2, keep_best=True)
  for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0)]:
    ckpts.save(step, _fake_state(step), data_state=None, config={}, metrics={"eval/loss": loss})
  ckpts.wait()
  assert ckpts.steps() == [2, 4, 5]


def test_resuming_a_differently_configured_run_fails_clearly(tmp_path):
  ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
  ckpts.save(1, _fake_state(1), data_state=None, config={"peft": {"method": "lora", "lora": {"rank": 8}}})
  ckpts.wait()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing may be quarantined for a config mismatch
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="peft.lora.rank: 8 there, 16 now"):
      ckpts.restore(_fake_state(0), {"peft": {"method": "lora", "lora": {"rank": 16}}})
  assert ckpts.steps() == [1]
