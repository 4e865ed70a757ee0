"""A full disk or an unwritable run directory at each write site: one line naming the step and the newest complete
checkpoint, exit code 2, no thread's traceback, nothing saved damaged, and resume=auto continues."""

import errno
import os
import re
import shutil
import subprocess
import threading

import pytest
from orbax.checkpoint._src.path import async_path

from jaxtune.train import __main__ as train_main
from jaxtune.train import faults, loop, run_lock
from jaxtune.train import logging as log_lib

import tiny_runs

SETTINGS = {"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 5, "train.eval": False, "train.eval_every": 0}
FREE_SPACE = "free space there (or choose a disk with room), then rerun with --config.resume=auto to continue from it."


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def _config(run_dir, cache, **overrides):
  return tiny_runs.tiny(run_dir, cache, **{**SETTINGS, **overrides})


def _full(path) -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _resumes_from(run_dir, cache, step, capsys):
  """Reruns with resume=auto (the disk has room again): it continues from `step` and logs every step once."""
  capsys.readouterr()
  assert loop.train(_config(run_dir, cache))["step"] == 6
  assert f"resumed from {run_dir / 'checkpoints' / str(step)} (step {step})" in capsys.readouterr().out
  assert [m["step"] for m in tiny_runs.metrics(run_dir) if "train/loss" in m] == list(range(1, 7))


def test_a_disk_too_full_for_the_next_checkpoint_stops_before_writing_it(tmp_path, cache, monkeypatch, capsys):
  usage = shutil.disk_usage
  saves = []

  def disk_usage(path):  # room for the checkpoint of step 2, then 100 KiB free
    saves.append(path)
    return usage(path) if len(saves) == 1 else usage(path)._replace(free=100 << 10)

  monkeypatch.setattr(faults.shutil, "disk_usage", disk_usage)
  with pytest.raises(faults.RunWriteError) as stopped:
    loop.train(_config(tmp_path, cache))
  checkpoints = tmp_path / "checkpoints"
  assert re.fullmatch(
    rf"step 4: could not write checkpoint {checkpoints}/4 \(no space left on the device: it needs about "
    rf"1\.\d MiB, 0\.1 MiB are free\); stopped\. The newest complete checkpoint is {checkpoints}/2 \(step 2\): "
    + re.escape(FREE_SPACE),
    str(stopped.value),
  ), str(stopped.value)
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2"]  # nothing half-written
  assert run_lock.read_holder(tmp_path) is None  # the lock was released on the way out
  monkeypatch.undo()
  _resumes_from(tmp_path, cache, 2, capsys)


def test_a_failed_background_checkpoint_write_is_one_line_at_the_command_line(tmp_path, cache, monkeypatch, capfd):
  write_text = async_path.write_text

  async def full_at_step_4(path, text):  # the commit of step 4's arrays, in Orbax's background thread
    if "/4.orbax-checkpoint-tmp" in str(path):
      raise _full(path)
    return await write_text(path, text)

  monkeypatch.setattr(async_path, "write_text", full_at_step_4)
  args = tiny_runs.cli_args(tmp_path, cache, **SETTINGS)[3:]
  capfd.readouterr()
  assert train_main.main(args) == 2
  err = capfd.readouterr().err
  checkpoints = tmp_path / "checkpoints"
  assert err == (
    f"error: step 4: could not write checkpoint {checkpoints}/4 (no space left on the device); stopped. "
    f"The newest complete checkpoint is {checkpoints}/2 (step 2): {FREE_SPACE}\n"
  )  # and nothing else: no traceback from Orbax's threads
  assert "4" not in [p.name for p in checkpoints.iterdir()]
  # Resumed as a user would, by a new process: this one may still hold TensorStore writes the failed save abandoned.
  resumed = tiny_runs.run(tiny_runs.cli_args(tmp_path, cache, **SETTINGS), tmp_path / "resumed.log")
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert f"resumed from {checkpoints / '2'} (step 2)" in resumed.stdout
  assert [m["step"] for m in tiny_runs.metrics(tmp_path) if "train/loss" in m] == list(range(1, 7))


class _FullOnStep:
  """metrics.jsonl's file, on a disk that fills while the line of `step` is written (half of it gets there)."""

  def __init__(self, file, step: int):
    self._file, self._line = file, f'{{"step": {step},'.encode()

  def write(self, data: bytes) -> int:
    if data.startswith(self._line):
      self._file.write(data[: len(data) // 2])
      self._file.flush()
      raise _full("metrics.jsonl")
    return self._file.write(data)

  def __getattr__(self, name):
    return getattr(self._file, name)


@pytest.mark.parametrize("site", ["metrics.jsonl", "tensorboard"])
def test_a_full_disk_while_logging_stops_at_that_step(tmp_path, cache, monkeypatch, site):
  init, add_scalars = log_lib.MetricsLogger.__init__, log_lib._EventFile.add_scalars

  def logger_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if site == "metrics.jsonl":
      self._file = _FullOnStep(self._file, 3)

  def full_at_step_3(self, step, values):
    if step == 3:
      raise _full(self.path / "events")
    add_scalars(self, step, values)

  monkeypatch.setattr(log_lib.MetricsLogger, "__init__", logger_init)
  monkeypatch.setattr(log_lib._EventFile, "add_scalars", full_at_step_3)
  with pytest.raises(faults.RunWriteError) as stopped:
    loop.train(_config(tmp_path, cache))
  assert str(stopped.value) == (
    f"step 3: could not write {tmp_path / site} (no space left on the device); stopped. The newest complete "
    f"checkpoint is {tmp_path}/checkpoints/2 (step 2): {FREE_SPACE}"
  )
  assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")  # the cut line was taken back out
  assert [m["step"] for m in tiny_runs.metrics(tmp_path)][-1] == (2 if site == "metrics.jsonl" else 3)
  assert not [t for t in threading.enumerate() if "EventLogger" in type(t).__name__]  # TensorBoard has no thread


def test_an_unwritable_run_directory_stops_before_the_first_step(tmp_path, cache, monkeypatch):
  def read_only(config, run_dir):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(run_dir / "config.json.partial"))

  monkeypatch.setattr(loop.config_lib, "write", read_only)
  with pytest.raises(faults.RunWriteError) as stopped:
    loop.train(_config(tmp_path, cache))
  assert str(stopped.value) == (
    f"before the first step: could not write {tmp_path / 'config.json'} (read-only file system); stopped. No "
    "checkpoint is complete yet: make it writable (or choose a directory you can write), then rerun (it starts "
    "from step 0)."
  )
  run_lock.acquire(tmp_path).release()  # released


# A shell in its own user and mount namespaces mounts a 4 MiB tmpfs, fills most of it, and runs the training CLI
# there three times: the disk fills at a checkpoint; then with no room at all; then resumed once space is freed.
TMPFS_SCRIPT = """
set -u
mount -t tmpfs -o size=4m tmpfs "$MNT"
dd if=/dev/zero of="$MNT/ballast" bs=1k count=2500 2>/dev/null
"$@" > "$LOGS/1.out" 2> "$LOGS/1.err"; echo $? > "$LOGS/1.rc"
dd if=/dev/zero of="$MNT/ballast2" bs=1k count=4096 2>/dev/null
"$@" > "$LOGS/2.out" 2> "$LOGS/2.err"; echo $? > "$LOGS/2.rc"
rm "$MNT/ballast" "$MNT/ballast2"
"$@" > "$LOGS/3.out" 2> "$LOGS/3.err"; echo $? > "$LOGS/3.rc"
ls "$MNT/run/checkpoints" > "$LOGS/checkpoints"
"""


def _can_mount_tmpfs(where) -> bool:
  if shutil.which("unshare") is None:
    return False
  probe = ["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "tmpfs", str(where)]
  return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def test_a_real_disk_filling_up_on_a_small_tmpfs(tmp_path, cache):
  mnt, logs = tmp_path / "mnt", tmp_path / "logs"
  mnt.mkdir()
  logs.mkdir()
  if not _can_mount_tmpfs(mnt):
    pytest.skip("cannot mount a tmpfs here (no unprivileged user namespaces); the injected ENOSPC tests cover it")
  args = tiny_runs.cli_args(mnt / "run", cache, **{**SETTINGS, "train.steps": 12})
  env = {**tiny_runs.env(), "MNT": str(mnt), "LOGS": str(logs)}
  command = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", TMPFS_SCRIPT, "tmpfs", *args]
  subprocess.run(command, cwd=tiny_runs.REPO, env=env, check=True, timeout=300)
  rc = [int((logs / f"{i}.rc").read_text()) for i in (1, 2, 3)]
  err = [(logs / f"{i}.err").read_text() for i in (1, 2, 3)]
  run_dir = mnt / "run"
  assert rc == [2, 2, 0], (rc, err)
  full = re.fullmatch(
    rf"error: step (\d+): could not write checkpoint {run_dir}/checkpoints/\1 \(no space left on the device: it "
    rf"needs about .* MiB, .* MiB are free\); stopped\. The newest complete checkpoint is {run_dir}/checkpoints/(\d+) "
    rf"\(step \2\): " + re.escape(FREE_SPACE) + "\n",
    err[0],
  )
  assert full, err[0]
  assert err[1] == (
    f"error: output_dir {run_dir}: cannot write its lock file {run_dir}/.lock (no space left on the device); free "
    "space there (or choose a disk with room), or set another output_dir.\n"
  )
  assert f"resumed from {run_dir}/checkpoints/{full[2]} (step {full[2]})" in (logs / "3.out").read_text()
  assert max(int(step) for step in (logs / "checkpoints").read_text().split()) == 12
