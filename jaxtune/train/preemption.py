"""Preemption notices, asked after every step: stop and save when the machine is about to go.

A notice is a bonus, not a guarantee. Periodic checkpoints (`checkpoint.every`) are what a run can
count on: Google's TPU documentation promises no warning before maintenance or a Spot preemption;
only its preview Autocheckpoint feature sends SIGTERM first, and a machine that disappears says
nothing at all. When a SIGTERM does arrive (Autocheckpoint, a supervisor relaunching, a scheduler,
a user's `kill`), the run saves the step it is on and stops cleanly.

Under `jax.distributed` (every multi-host run) JAX's preemption service owns SIGTERM: the process
that gets one tells the others, and `reached_preemption_sync_point` turns true on every process at
the same step, so all of them save that step together. A handler of our own would replace the one
JAX installs, and the other hosts would never hear of the notice. A single process, or a run with
the service turned off (`jax_enable_preemption_service`), catches SIGTERM itself.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Notice:
  """`with Notice() as notice: ... if notice.reached(step): save and stop` (from the main thread)."""

  def __init__(self):
    self.synced = False  # JAX's preemption service decides, the same step on every process
    self._signalled = False
    self._previous = None

  def __enter__(self) -> "Notice":
    self.synced = jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)
    if not self.synced and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    """True at the step to save and stop at; with JAX's service, call it at every step on every process."""
    if self.synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
