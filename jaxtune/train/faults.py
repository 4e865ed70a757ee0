"""A run that cannot write (full disk, no permission, read-only file system) stops with one line that says what
could not be written, at which step, which checkpoint is the newest complete one, and how to resume.

Every write site of a run (checkpoint saves and their background commits, metrics.jsonl,
TensorBoard) runs inside `writing(...)`, which turns such an OSError into a `RunWriteError`.
Nothing is retried and nothing more is saved once a write fails: the complete checkpoints on
disk stay as they are, and `resume=auto` continues from the newest of them once there is room.
The libraries' own reports of the same failure (Orbax logs each failed background write with its
traceback) are dropped by `quiet_write_failures`: the run's one line replaces them.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil
import sys
import warnings
from typing import Iterator

from jaxtune.errors import WriteError, write_failure, write_fix


def complete_steps(checkpoints: pathlib.Path) -> list[int]:
  """Steps with a complete checkpoint in `checkpoints` (Orbax gives a step its name only once it is written)."""
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir())


class RunWriteError(WriteError):
  """A run stopped because a file could not be written.

  The newest complete checkpoint is looked up when the message is shown, so that it reflects any
  save that was still being written when the failure was raised.
  """

  def __init__(self, what: str, step: int | None, why: str, checkpoints: pathlib.Path):
    super().__init__(what, step, why, str(checkpoints))
    self.what, self.step, self.why, self.checkpoints = what, step, why, pathlib.Path(checkpoints)

  def __str__(self) -> str:
    steps = complete_steps(self.checkpoints)
    when = "before the first step" if self.step is None else f"step {self.step}"
    head = f"{when}: could not write {self.what} ({self.why}); stopped."
    if not steps:
      return f"{head} No checkpoint is complete yet: {write_fix(self.why)}, then rerun (it starts from step 0)."
    return (
      f"{head} The newest complete checkpoint is {self.checkpoints / str(steps[-1])} (step {steps[-1]}): "
      f"{write_fix(self.why)}, then rerun with --config.resume=auto to continue from it."
    )


@contextlib.contextmanager
def writing(what: str, step: int | None, checkpoints: pathlib.Path) -> Iterator[None]:
  """Turns a failed write inside the block into a RunWriteError naming `what` and `step` (None: before training)."""
  try:
    yield
  except RunWriteError:
    raise
  except Exception as e:
    why = write_failure(e)
    if why is None:
      raise
    raise RunWriteError(what, step, why, checkpoints) from e


def check_space(directory: pathlib.Path, needed: int, what: str, step: int, checkpoints: pathlib.Path) -> None:
  """Raises RunWriteError before a write of about `needed` bytes into `directory` that cannot fit.

  Checked before each checkpoint: one that runs out of room half-way fails inside TensorStore's
  writers, whose threads report it noisily; one refused up front leaves nothing behind.
  """
  free = shutil.disk_usage(directory).free
  if free < needed:
    why = f"no space left on the device: it needs about {_mb(needed)}, {_mb(free)} are free"
    raise RunWriteError(what, step, why, checkpoints)


def _mb(n: int) -> str:
  return f"{n / 2**20:,.1f} MiB"


class _DropWriteFailures(logging.Filter):
  """Drops log records about a failed write (the run reports it once, as its one-line error)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and write_failure(error) is not None:
      return False
    return write_failure(Exception(record.getMessage())) is None


_FILTER = _DropWriteFailures()


def quiet_write_failures() -> None:
  """Keeps Orbax (absl logging), asyncio and TensorStore from printing tracebacks of write failures the run reports."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)
  # The array writes a failed save abandoned, reported when they are garbage-collected.
  warnings.filterwarnings("ignore", message=r"coroutine 'async_serialize_from_host\.", category=RuntimeWarning)
  if not isinstance(sys.excepthook, _SkipClosedLoop):
    sys.excepthook = _SkipClosedLoop(sys.excepthook, lambda kind, value, tb: value)
  if not isinstance(sys.unraisablehook, _SkipClosedLoop):
    sys.unraisablehook = _SkipClosedLoop(sys.unraisablehook, lambda args: args.exc_value)


class _SkipClosedLoop:
  """An exception hook without the "Event loop is closed" errors of TensorStore callbacks after a failed save.

  When one array of a checkpoint fails to write, Orbax closes the save's event loop while
  TensorStore still completes the others; their callbacks then find the loop closed, and
  TensorStore reports each through sys.excepthook or sys.unraisablehook.
  """

  def __init__(self, previous, error_of):
    self._previous, self._error_of = previous, error_of

  def __call__(self, *args) -> None:
    error = self._error_of(*args)
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    self._previous(*args)
