"""Multi-host start-up: one `jax.distributed.initialize` per process, before any other JAX call.

  TPU VM / pod slice   automatic: JAX reads the peers from the TPU VM's metadata server (GKE: from
                       TPU_WORKER_HOSTNAMES); joined whenever that names more than one host.
  SLURM / Open MPI     automatic too: JAX reads SLURM_* / OMPI_* variables itself.
  anything else        coordinator address, process count and id from flags, or from
                       JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
  one machine          nothing to do.

`DistributedSpec.from_env(os.environ)` is called by entry points only; library code takes the spec.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

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
    cls,
    env: Mapping[str, str],
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    tpu_hosts: Callable[[], int] | None = None,
  ) -> "DistributedSpec":
    """Explicit arguments first, then JAX_* variables, then a cluster JAX detects (TPU slice, SLURM, MPI).

    `tpu_hosts` counts the hosts of this TPU slice (`tpu_slice_hosts`, JAX's own detection, by default).
    """
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
    hosts = (tpu_hosts or tpu_slice_hosts)()
    if hosts > 1:
      return cls("auto", why=f"a TPU slice of {hosts} hosts")
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
      return cls("auto", why=f"a SLURM job of {env['SLURM_NTASKS']} tasks")
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
      return cls("auto", why=f"an Open MPI job of {env['OMPI_COMM_WORLD_SIZE']} ranks")
    return cls()


def tpu_slice_hosts() -> int:
  """Processes of this Cloud TPU run (hosts times slices) as `jax.distributed.initialize()` counts them; 0 off TPUs.

  JAX's own detection, which has no public API: GKE's TPU_WORKER_HOSTNAMES, else the TPU VM's
  metadata server (plain TPU VMs, the ones `gcloud compute tpus tpu-vm create` makes, set no variable).
  Off a TPU VM it returns at once, asking no server.
  """
  from jax._src import clusters

  for cluster in clusters.ClusterEnv._cluster_types:  # in the order jax.distributed.initialize() tries them
    if cluster.__module__.endswith(".cloud_tpu_cluster") and cluster.is_env_present():
      return cluster.get_process_count()
  return 0


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
