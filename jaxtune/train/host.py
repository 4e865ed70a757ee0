"""Host-process setup: transparent huge pages for XLA's per-step CPU buffers.

XLA's CPU runtime allocates every execution's temporary buffer with posix_memalign from a
worker thread: 1.5-1.7 GB for the SmolLM2-135M train step at batch 4 x 256. glibc serves a
block that large with a fresh mmap and unmaps it on free, so each step first-touches about
400,000 new 4 KiB pages; the kernel spends 0.7 s of CPU per step faulting and zeroing them.
The glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes
malloc madvise such blocks for transparent huge pages, which cuts the faults 400-fold; the
LoRA step measured 4.47 -> 4.08 s and full fine-tuning 5.9 -> 5.5 s, peak RSS unchanged.

glibc reads tunables only when a process starts, so `python -m jaxtune.train` re-executes
itself once with the tunable added (`reexec_with_huge_pages`); the process keeps its pid,
arguments and environment otherwise. JAXTUNE_HUGEPAGES=0 turns this off. Library users set
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 themselves. Only kernels whose THP mode is `madvise`
need it: with `always` every large mapping gets huge pages already, with `never` none can.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "JAXTUNE_HUGEPAGES"  # "0": leave malloc as it is
_MARKER = "JAXTUNE_REEXECUTED"  # set in the re-executed process: never re-execute twice
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library when it is glibc, else None (musl, macOS, Windows)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):
    return None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode (always | madvise | never), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else None


def huge_page_environ(
  environ: Mapping[str, str], *, glibc: tuple[int, int] | None, thp: str | None
) -> dict[str, str] | None:
  """`environ` with the hugetlb tunable added, or None when there is nothing to add.

  Nothing to add when: the user opted out (JAXTUNE_HUGEPAGES=0), GLIBC_TUNABLES already
  names the tunable (the user's value wins), this already is the re-executed process, the
  C library is not glibc >= 2.35, or the THP mode is not `madvise`.
  """
  tunables = environ.get("GLIBC_TUNABLES", "")
  if environ.get(OPT_OUT, "1") == "0" or _MARKER in environ or TUNABLE in tunables:
    return None
  if glibc is None or glibc < (2, 35) or thp != "madvise":
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
  env[_MARKER] = "1"
  return env


def launched_as(module: str, orig_argv: list[str]) -> bool:
  """Whether the interpreter's command line is `python [options] -m module ...` or the script named `module`.

  The second is a console script: `jaxtune train ...` runs `python /venv/bin/jaxtune train ...`.
  """
  if any(a == "-m" and b == module for a, b in zip(orig_argv, orig_argv[1:])) or f"-m{module}" in orig_argv:
    return True
  return len(orig_argv) > 1 and os.path.basename(orig_argv[1]) == module


def reexec_with_huge_pages(module: str) -> None:
  """Re-executes this process (same argv) with glibc.malloc.hugetlb=1 when that helps; else returns.

  Call it first thing in the `__main__` of `module`, before threads or files are opened. Only a
  process started as `python -m module` is re-executed: run any other way (`runpy` or `%run` in
  a notebook kernel, an embedding program) its command line is not ours to repeat.
  """
  if not sys.platform.startswith("linux") or not launched_as(module, sys.orig_argv):
    return
  env = huge_page_environ(os.environ, glibc=glibc_version(), thp=thp_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
