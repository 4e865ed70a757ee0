"""Where a run's numbers go: RUN_DIR/metrics.jsonl, TensorBoard, Weights & Biases, a progress bar.

Only process 0 writes anything; the others get a logger that drops everything. Every value
sent to TensorBoard or W&B is also a line of metrics.jsonl: {"step": N, "train/loss": ..., ...}.
Both files are written in the caller's thread, so a full disk stops the run with one line
(`faults.RunWriteError`) at the step whose metrics it could not take, and the line cut short is
taken back out of metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Mapping

from jaxtune.train import faults

METRICS_FILE = "metrics.jsonl"


def info(message: str, enabled: bool = True) -> None:
  """A line for the user on stdout (process 0 only)."""
  if enabled:
    print(message, flush=True)


def _number(value: Any) -> float | int | None:
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int):
    return value
  value = float(value)
  return value if math.isfinite(value) else None  # JSON has no NaN/inf: written as null


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Every line of RUN_DIR/metrics.jsonl, in order (a last line cut short by a crash is left out)."""
  path = pathlib.Path(run_dir) / METRICS_FILE
  return _parse(path.read_text()) if path.exists() else []


def _parse(text: str) -> list[dict[str, Any]]:
  lines = [line for line in text.splitlines() if line.strip()]
  out = [json.loads(line) for line in lines[:-1]]
  if lines:
    try:
      out.append(json.loads(lines[-1]))
    except json.JSONDecodeError:  # the process died while writing it
      pass
  return out


class MetricsLogger:
  """Writes metrics to metrics.jsonl, TensorBoard (tensorboardX) and W&B (when a project is set)."""

  def __init__(
    self,
    run_dir: str | pathlib.Path,
    *,
    enabled: bool = True,
    tensorboard: bool = True,
    wandb_project: str = "",
    wandb_entity: str = "",
    wandb_run_name: str = "",
    config: Mapping[str, Any] | None = None,
    start_step: int = 0,
  ):
    """start_step > 0 (a resumed run): lines of later steps, written before the interruption, are dropped."""
    self.enabled = enabled
    self._tb = self._wandb = self._file = None
    if not enabled:
      return
    run_dir = pathlib.Path(run_dir)
    self._path, self._checkpoints = run_dir / METRICS_FILE, run_dir / "checkpoints"
    with faults.writing(str(self._path), start_step, self._checkpoints):
      run_dir.mkdir(parents=True, exist_ok=True)
      if self._path.exists():  # keep what the resumed checkpoint's run had logged, up to its step
        kept = [m for m in _parse(self._path.read_text()) if m.get("step", 0) <= start_step]
        partial = self._path.with_name(self._path.name + ".partial")
        try:
          partial.write_text("".join(json.dumps(m) + "\n" for m in kept))
          os.replace(partial, self._path)  # a full disk here leaves the old file whole
        finally:
          partial.unlink(missing_ok=True)
      self._file = self._path.open("ab")
    if tensorboard:
      with faults.writing(str(run_dir / "tensorboard"), start_step, self._checkpoints):
        self._tb = _EventFile(run_dir / "tensorboard", purge_step=start_step + 1 if start_step else None)
    if wandb_project:
      import wandb

      self._wandb = wandb.init(
        project=wandb_project,
        entity=wandb_entity or None,
        name=wandb_run_name or None,
        dir=str(run_dir),
        config=dict(config or {}),
        resume="allow",
        id=_wandb_id(run_dir),
      )

  def log(self, step: int, metrics: Mapping[str, Any]) -> None:
    """One line {"step": step, **metrics} and the same scalars to TensorBoard / W&B."""
    if not self.enabled or self._file is None:  # None: a write failed, and the run is stopping
      return
    values = {k: _number(v) for k, v in metrics.items()}
    end = self._file.tell()
    try:
      with faults.writing(str(self._path), int(step), self._checkpoints):
        self._file.write((json.dumps({"step": int(step), **values}) + "\n").encode())
        self._file.flush()
    except faults.RunWriteError:
      self._rewind(end)
      raise
    if self._tb is not None:
      with faults.writing(str(self._tb.path), int(step), self._checkpoints):
        self._tb.add_scalars(int(step), {k: v for k, v in values.items() if v is not None})
    if self._wandb is not None:
      self._wandb.log(dict(values), step=int(step))

  def _rewind(self, end: int) -> None:
    """Takes a line the disk cut short back out of metrics.jsonl, so that it ends with the last whole line."""
    handle, self._file = self._file, None
    with contextlib.suppress(OSError):
      handle.close()  # flushing the rest of the cut line fails again: nothing is left buffered after this
    with contextlib.suppress(OSError):
      os.truncate(self._path, end)

  def close(self) -> None:
    """Closes the files; after a failed write, without writing anything more."""
    for handle in (self._file, self._tb):
      if handle is not None:
        with contextlib.suppress(OSError):  # every line and event was flushed when it was logged
          handle.close()
    self._file = self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


class _EventFile:
  """TensorBoard scalars, written and flushed in the caller's thread.

  tensorboardX's SummaryWriter writes from a thread of its own: a full disk kills that thread with
  a traceback, and the next log call blocks on its full queue. Its EventsWriter, used here
  directly, writes the same event file synchronously.
  """

  def __init__(self, logdir: pathlib.Path, purge_step: int | None):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2

    logdir.mkdir(parents=True, exist_ok=True)
    self.path = logdir
    self._writer, self._event = EventsWriter(str(logdir / "events")), event_pb2
    if purge_step is not None:  # TensorBoard hides the events of steps >= purge_step written before the resume
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._writer.write_event(event_pb2.Event(step=purge_step, wall_time=time.time(), session_log=start))
    self._writer.flush()

  def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
    from tensorboardX.summary import scalar

    for name, value in values.items():
      self._writer.write_event(self._event.Event(step=step, wall_time=time.time(), summary=scalar(name, value)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _wandb_id(run_dir: pathlib.Path) -> str:
  """A W&B run id stored in the run directory, so a resumed run continues the same W&B run."""
  path = run_dir / "wandb_id.txt"
  if not path.exists():
    import secrets

    path.write_text(secrets.token_hex(8))
  return path.read_text().strip()


class Progress:
  """A tqdm bar over the training steps showing loss, learning rate, tokens/s and the ETA."""

  def __init__(self, total: int, initial: int = 0, *, bar: bool = True, enabled: bool = True):
    """bar=False: messages only; enabled=False (processes other than 0): nothing at all."""
    self._bar = None
    self._enabled = enabled
    self._tokens = 0.0
    self._since = None
    if bar and enabled:
      from tqdm import tqdm

      self._bar = tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
        smoothing=0.1,
      )

  def tokens_per_second(self, tokens: float) -> float | None:
    """Counts `tokens` processed by the step just finished; None until a first step has set the clock."""
    now = time.perf_counter()
    if self._since is None:  # the first step includes compilation: start the clock after it
      self._since = now
      return None
    self._tokens += tokens
    return self._tokens / max(now - self._since, 1e-9)

  def update(
    self,
    step: int,
    loss: float | None,
    lr: float | None,
    tokens_per_s: float | None,
    extra: dict[str, float] | None = None,
  ) -> None:
    """extra: an objective's headline metrics (e.g. DPO's reward accuracy and margin), shown after the loss."""
    if self._bar is None:
      return
    shown = {}
    if loss is not None:
      shown["loss"] = f"{loss:.4f}"
    for key, value in (extra or {}).items():
      shown[key] = f"{value:.3f}"
    if lr is not None and math.isfinite(lr):
      shown["lr"] = f"{lr:.2e}"
    if tokens_per_s is not None:
      shown["tok/s"] = f"{tokens_per_s:,.0f}"
    self._bar.set_postfix(shown, refresh=False)
    self._bar.update(step - self._bar.n)

  def write(self, message: str) -> None:
    """A line printed above the bar."""
    if self._bar is not None:
      self._bar.write(message, file=sys.stdout)
    elif self._enabled:
      print(message, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
