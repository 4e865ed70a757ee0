"""Where a run's numbers go: RUN_DIR/metrics.jsonl, TensorBoard, Weights & Biases, a progress bar.

Only process 0 writes anything; the others get a logger that drops everything. Every value
sent to TensorBoard or W&B is also a line of metrics.jsonl: {"step": N, "train/loss": ..., ...}.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Mapping

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
  """Every line of RUN_DIR/metrics.jsonl, in order."""
  path = pathlib.Path(run_dir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS_FILE
    if path.exists():  # keep what the resumed checkpoint's run had logged, up to its step
      kept = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= start_step
      ]
      path.write_text("".join(line + "\n" for line in kept))
    self._file = path.open("a")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
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
    if not self.enabled:
      return
    values = {k: _number(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": int(step), **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        if v is not None:
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(dict(values), step=int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


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
