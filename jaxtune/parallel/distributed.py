"""Multi-host start-up: one `jax.distributed.initialize` per process, before any other JAX call.

  TPU VM / pod slice   automatic: the TPU runtime tells every worker its peers.
  SLURM / Open MPI     automatic too: JAX reads SLURM_* / OMPI_* variables itself.
  anything else        coordinator address, process count and id from flags, or from
                       JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
  one machine          nothing to do.

`DistributedSpec.from_env(os.environ)` is called by entry points only; library code takes the spec.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax

from jaxtune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """How this process joins the others; `mode` is none | explicit | auto."""

  mode: str = "none"
  coordinator_address: str = ""  # host:port of process 0
  num_processes: int = 1
  process_id: int = 0
  why: str = "a single process"

  @classmethod
  def from_env(
    cls, env: Mapping[str, str], coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
  ) -> "DistributedSpec":
    """Explicit arguments first, then JAX_* variables, then a cluster JAX detects (TPU pod, SLURM, MPI)."""
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    count = num_processes or int(env.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = process_id if process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1") or -1)
    if address or count > 1:
      missing = [
        n
        for n, bad in (
          ("coordinator address (JAX_COORDINATOR_ADDRESS)", not address),
          ("process count (JAX_NUM_PROCESSES)", count < 1),
          ("process id (JAX_PROCESS_ID)", pid < 0),
        )
        if bad
      ]
      if missing:
        raise ConfigError(f"multi-process run: set the {', '.join(missing)} as well, on every process.")
      if pid >= count:
        raise ConfigError(f"process id {pid} is out of range for {count} processes (ids are 0..{count - 1}).")
      return cls("explicit", address, count, pid, f"process {pid} of {count}, coordinator {address}")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
      return cls("auto", why=f"a TPU pod slice ({len(hosts)} workers)")
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
      return cls("auto", why=f"a SLURM job of {env['SLURM_NTASKS']} tasks")
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
      return cls("auto", why=f"an Open MPI job of {env['OMPI_COMM_WORLD_SIZE']} ranks")
    return cls()


def initialize(spec: DistributedSpec) -> str:
  """Joins the processes of `spec` (no-op for one process or when already joined); returns what it did."""
  if spec.mode == "none":
    return spec.why
  if jax.distributed.is_initialized():
    return f"already initialized: process {jax.process_index()} of {jax.process_count()}"
  if spec.mode == "explicit":
    jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id)
  else:
    jax.distributed.initialize()
  return f"{spec.why}: process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices"
