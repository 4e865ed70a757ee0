"""One run per output_dir: an OS lock on OUTPUT_DIR/.lock, held for the run's lifetime.

`fcntl.flock` on an open file is dropped by the kernel when the process ends, however it ends
(exit, SIGKILL, out of memory, a crash), so the lock never outlives its run on the machine that
took it, and a run the TPU supervisor relaunches after the old one died takes it at once. The
file also records who holds it (host, pid, start time): a second run is refused naming the
holder, and a record left by a run that died is named in a notice when the next run takes over.
The file is emptied on release but never deleted: deleting it would let two runs lock two
different files under one name.

Multi-host runs take one lock, on process 0 (`acquire_for_run`). On a network filesystem whose
locks are not shared between machines (gcsfuse, NFS without lockd), a run on another machine
cannot be seen.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import socket
import sys
import time

from jaxtune.errors import UserError, WriteError, write_failure, write_fix

LOCK_FILE = ".lock"


class RunLockedError(UserError, RuntimeError):
  """Another run holds the output_dir."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds (or last held) a run directory's lock, as its lock file records it."""

  host: str
  pid: int
  started: str  # UTC, ISO 8601

  @classmethod
  def me(cls) -> "Holder":
    return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

  @classmethod
  def parse(cls, text: str) -> "Holder | None":
    try:
      record = json.loads(text)
      return cls(str(record["host"]), int(record["pid"]), str(record.get("started", "?")))
    except (ValueError, KeyError, TypeError):
      return None

  def describe(self) -> str:
    return f"pid {self.pid} on host {self.host}, started {self.started}"


class RunLock:
  """A held lock on a run directory; `release()` (or process exit) gives it up."""

  def __init__(self, path: pathlib.Path, fd: int, taken_over: str | None):
    self.path, self._fd = path, fd
    self.taken_over = taken_over  # the notice for a record left by a run that died, else None

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # an empty file: released cleanly, nothing to report to the next run
    except OSError:
      pass  # a full or read-only disk: the next run reports the record as left behind, which is harmless
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _open(run_dir: pathlib.Path) -> tuple[pathlib.Path, int]:
  path = run_dir / LOCK_FILE
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
    return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as e:
    raise _write_error(e, f"output_dir {run_dir}: cannot create its lock file {run_dir / LOCK_FILE}") from None


def _write_error(error: OSError, what: str) -> Exception:
  why = write_failure(error)
  if why is None:
    return error
  return WriteError(f"{what} ({why}); {write_fix(why)}, or set another output_dir.")


def acquire(run_dir: str | os.PathLike) -> RunLock:
  """Locks `run_dir` for this process; raises RunLockedError naming the holder when another run has it."""
  run_dir = pathlib.Path(run_dir)
  path, fd = _open(run_dir)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
    os.close(fd)
    who = holder.describe() if holder else "a process that has not recorded itself yet"
    raise RunLockedError(
      f"output_dir {run_dir} is in use by another run ({who}; lock file {path}); wait for it to finish, stop "
      f"it (kill {holder.pid if holder else 'PID'}), or set another output_dir."
    ) from None
  previous = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
  me = Holder.me()
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(dataclasses.asdict(me)) + "\n").encode(), 0)
  except OSError as e:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    raise _write_error(e, f"output_dir {run_dir}: cannot write its lock file {path}") from None
  return RunLock(path, fd, _takeover_notice(run_dir, previous, me))


def _takeover_notice(run_dir: pathlib.Path, previous: Holder | None, me: Holder) -> str | None:
  """The notice for a record left by a run that ended without releasing the lock (killed, crashed), or None."""
  if previous is None or (previous.host, previous.pid) == (me.host, me.pid):
    return None
  if previous.host != me.host:
    why = "recorded on another host; its lock was free, so that run has ended (or locks are not shared there)"
  elif _alive(previous.pid):
    why = "that pid now belongs to another process"
  else:
    why = "that process is gone"
  return f"output_dir {run_dir}: took over the lock of the run that died there ({previous.describe()}; {why})."


def acquire_for_run(run_dir: str | os.PathLike, process_index: int, process_count: int) -> RunLock | None:
  """The run's lock, taken by process 0 (None on the others); every process raises when process 0 is refused.

  With several processes, process 0's outcome is broadcast, so the others stop too instead of
  waiting for it at the first collective.
  """
  lock, error = None, None
  if process_index == 0:
    try:
      lock = acquire(run_dir)
    except (RunLockedError, WriteError) as e:
      error = e
  if process_count > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and process_index != 0:
      raise RunLockedError(f"output_dir {run_dir}: process 0 could not lock it; its log says why.")
  if error is not None:
    raise error
  if lock is not None and lock.taken_over:
    print(lock.taken_over, file=sys.stdout, flush=True)
  return lock


def read_holder(run_dir: str | os.PathLike) -> Holder | None:
  """The Holder recorded in run_dir's lock file (None when it is empty or absent)."""
  path = pathlib.Path(run_dir) / LOCK_FILE
  return Holder.parse(path.read_text()) if path.is_file() else None
