"""One run per output_dir: a second run is refused naming the holder; a dead run's lock is taken over."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from jaxtune.errors import WriteError
from jaxtune.train import __main__ as train_main
from jaxtune.train import loop, run_lock

import tiny_runs

HOLD = (  # a process that takes the lock and keeps it until killed
  "import sys, time; from jaxtune.train import run_lock; run_lock.acquire(sys.argv[1]); "
  "print('locked', flush=True); time.sleep(120)"
)


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
  lock = run_lock.acquire(tmp_path / "run")
  assert lock.taken_over is None
  holder = run_lock.read_holder(tmp_path / "run")
  assert (holder.host, holder.pid) == (socket.gethostname(), os.getpid())
  with pytest.raises(run_lock.RunLockedError) as refused:
    run_lock.acquire(tmp_path / "run")  # a second open file: flock refuses it even within one process
  message = str(refused.value)
  assert "\n" not in message
  assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, started " in message
  assert f"kill {os.getpid()}" in message and "set another output_dir" in message
  lock.release()
  assert (tmp_path / "run" / ".lock").read_text() == ""  # released cleanly: nothing to take over
  again = run_lock.acquire(tmp_path / "run")
  assert again.taken_over is None
  again.release()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_notice(tmp_path):
  run_dir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": str(tiny_runs.REPO)}
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(run_lock.RunLockedError, match=f"pid {holder.pid} on host"):
      run_lock.acquire(run_dir)
    holder.send_signal(signal.SIGKILL)  # no clean release: the record stays, the kernel drops the flock
    holder.wait(10)
  finally:
    if holder.poll() is None:
      holder.kill()
  assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid
  lock = run_lock.acquire(run_dir)
  try:
    assert lock.taken_over is not None
    assert f"took over the lock of the run that died there (pid {holder.pid} on host" in lock.taken_over
    assert "that process is gone" in lock.taken_over
    assert run_lock.read_holder(run_dir).pid == os.getpid()
  finally:
    lock.release()


def test_training_on_a_locked_output_dir_stops_before_writing(tmp_path, capsys):
  run_dir = tmp_path / "run"
  lock = run_lock.acquire(run_dir)
  try:
    with pytest.raises(run_lock.RunLockedError, match="is in use by another run"):
      loop.train(tiny_runs.tiny(run_dir, tmp_path / "cache"))
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # no config.json, no checkpoints/
    # The command line: one line on stderr, exit code 2.
    code = train_main.main([f"--config={tiny_runs.CONFIGS / 'tiny.py'}", f"--config.output_dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith(f"error: output_dir {run_dir} is in use"), err
  finally:
    lock.release()


@pytest.mark.parametrize(
  "code, why, fix",
  [
    (errno.EACCES, "permission denied", "make it writable (or choose a directory you can write)"),
    (errno.EROFS, "read-only file system", "make it writable (or choose a directory you can write)"),
    (errno.ENOSPC, "no space left on the device", "free space there (or choose a disk with room)"),
  ],
)
def test_an_unwritable_or_full_output_dir_is_one_line_naming_it(tmp_path, monkeypatch, code, why, fix):
  def refuse(path, *args):
    raise OSError(code, os.strerror(code), str(path))

  monkeypatch.setattr(run_lock.os, "open", refuse)
  with pytest.raises(WriteError) as failed:
    run_lock.acquire(tmp_path / "run")
  assert str(failed.value) == (
    f"output_dir {tmp_path / 'run'}: cannot create its lock file {tmp_path / 'run' / '.lock'} ({why}); {fix}, "
    "or set another output_dir."
  )
