"""Before the first step: what the compiled train step needs per device, against what the device has free.

An out-of-memory error an hour into a run (or after a long compile, with an allocator trace
and no advice) is the worst way to learn that a setting does not fit. XLA knows the step's
buffers once it is compiled, so the loop compiles the step for the longest rows first, reads
`memory_analysis()`, and stops with the numbers and what to change when the step cannot fit.
The compilation is the one the first step would do anyway (jit and `.lower().compile()` share
their cache), so the check costs nothing.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from jaxtune.errors import ConfigError

GIB = 2**30


class DoesNotFitError(ConfigError):
  """The compiled train step needs more memory than the device has free."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """XLA's buffers of one device for one compiled step, in bytes."""

  arguments: int  # state, frozen weights, batch: already resident when the step starts
  outputs: int
  aliased: int  # outputs written into donated arguments (the new state): no new memory
  temporaries: int  # activations, gradients, gathered weights, scratch
  code: int

  @property
  def extra(self) -> int:
    """Bytes the step allocates beyond its arguments."""
    return self.outputs - self.aliased + self.temporaries + self.code

  def describe(self) -> str:
    return (
      f"{self.extra / GIB:.2f} GiB per device beyond its {self.arguments / GIB:.2f} GiB of arguments "
      f"(temporaries {self.temporaries / GIB:.2f}, new outputs {(self.outputs - self.aliased) / GIB:.2f})"
    )


def of_compiled(compiled: jax.stages.Compiled) -> StepMemory | None:
  """The compiled step's memory, or None where the backend does not report it."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return StepMemory(
    arguments=stats.argument_size_in_bytes,
    outputs=stats.output_size_in_bytes,
    aliased=stats.alias_size_in_bytes,
    temporaries=stats.temp_size_in_bytes,
    code=stats.generated_code_size_in_bytes,
  )


@dataclasses.dataclass(frozen=True)
class Free:
  """What one device can still allocate, and what to call it in a message."""

  bytes: int
  limit: int
  where: str
  sharers: int = 1  # devices drawing on the same memory (CPU devices share the host's)


def device_free(device: jax.Device, local_devices: int, meminfo: str = "/proc/meminfo") -> Free | None:
  """Free memory of an accelerator (its allocator's limit minus what is in use), or the host's for CPU devices.

  None where neither is known (an accelerator without memory_stats, a CPU host without /proc/meminfo).
  """
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    limit = int(stats["bytes_limit"])
    return Free(limit - int(stats.get("bytes_in_use", 0)), limit, f"{device.device_kind} ({device.platform})")
  if device.platform == "cpu":
    info = _meminfo(meminfo)
    if "MemAvailable" in info and "MemTotal" in info:
      return Free(info["MemAvailable"], info["MemTotal"], "this host's RAM", sharers=local_devices)
  return None


def _meminfo(path: str) -> dict[str, int]:
  try:
    lines = pathlib.Path(path).read_text().splitlines()
  except OSError:
    return {}
  out = {}
  for line in lines:
    key, _, value = line.partition(":")
    parts = value.split()
    if parts and parts[0].isdigit():
      out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
  return out


def check(memory: StepMemory, free: Free, *, shape: tuple[int, ...], method: str) -> None:
  """Raises DoesNotFitError (with what to change) when the step cannot fit in what the device has free."""
  need = memory.extra * free.sharers
  if need <= free.bytes:
    return
  who = f"{free.sharers} devices x " if free.sharers > 1 else ""
  advice = [
    "lower data.batch_size (raise train.grad_accum to keep the effective batch)",
    "shorten data.max_seq_len",
    "set model.remat=full (recompute activations in the backward)",
  ]
  if method == "full":
    advice.append("train LoRA adapters instead (peft.method=lora)")
  advice.append("or split over more devices (mesh.preset=fsdp)")
  raise DoesNotFitError(
    f"the train step for batches of shape {list(shape)} (micro-batches, rows, tokens) needs {who}"
    f"{memory.describe()}, but {free.where} has {free.bytes / GIB:.2f} GiB free of {free.limit / GIB:.2f}. "
    f"To fit: {'; '.join(advice)}. `python -m jaxtune.parallel.dry_run --config ...` prints the per-device "
    f"memory of other settings without loading weights."
  )
