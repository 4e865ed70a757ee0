"""Runs tpu_scripts/*.sh with the fake gcloud and sleep (fake_gcloud/) first on PATH; reads back what they did."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS_DIR = ROOT / "tpu_scripts"
FAKE_BIN = pathlib.Path(__file__).resolve().parent / "fake_gcloud"
# Every variable the scripts read, from the flag table, so the caller's environment cannot leak in.
SCRIPT_VARS = re.findall(r'echo "(\w+)\|(?:value|bool)\|', (SCRIPTS_DIR / "common.sh").read_text())
CONFIG = "configs/quickstart.py"
LOC = ["--zone=us-west4-a", "--project=proj"]
BASE = ["--name", "tune", "--zone", "us-west4-a", "--project", "proj"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
GIT = "git+https://example.com/jaxtune.git@main"
SSH_OPTS = ["--strict-host-key-checking=no"]


class Fake:
  """Runs a script against the fake gcloud; `calls()` are the gcloud argv lists it recorded, `slept()` its sleeps."""

  def __init__(self, tmp_path: pathlib.Path):
    self.log = tmp_path / "gcloud_calls.log"

  def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    keep = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith(("FAKE_", "CLOUDSDK_"))}
    keep.update(PATH=f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(self.log))
    keep.update(FAKE_PYTHON=sys.executable, **env)
    return subprocess.run(
      [str(SCRIPTS_DIR / script), *args], cwd=ROOT, env=keep, capture_output=True, text=True, timeout=60
    )

  def _lines(self) -> list[list[str]]:
    return [shlex.split(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

  def calls(self) -> list[list[str]]:
    return [c for c in self._lines() if c[0] == "gcloud"]

  def slept(self) -> list[int]:
    return [int(c[1]) for c in self._lines() if c[0] == "sleep"]


def printed(result: subprocess.CompletedProcess) -> list[list[str]]:
  """The commands a --dry-run printed (comment lines left out)."""
  return [shlex.split(line) for line in result.stdout.splitlines() if line and not line.startswith("#")]


def command_of(call: list[str]) -> str:
  (arg,) = [a for a in call if a.startswith("--command=")]
  return arg.removeprefix("--command=")


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, result.stderr
  return result


def word(call: list[str]) -> str:
  """A gcloud call as one word: list-tpu, list-qr, types, bucket, create-tpu, delete-qr, check, install, launch..."""
  if call[1] == "storage":
    return "bucket" if call[2:4] == ["buckets", "describe"] else call[2]
  group, verb = call[3], call[4]
  if verb == "ssh":
    remote = command_of(call)
    for marker, name in (("JT_STATUS", "check"), ("jaxtune.train", "launch"), ("pip install", "install")):
      if marker in remote:
        return name
    return remote.split()[0]  # mkdir, tail
  if verb == "scp":
    return "scp"
  if verb == "accelerator-types":
    return "types"
  return f"{verb}-{'qr' if group == 'queued-resources' else 'tpu'}"


def words(calls: list[list[str]]) -> list[str]:
  return [word(c) for c in calls]


def assert_unattended(calls: list[list[str]]) -> None:
  """Every gcloud call answers no prompt; every ssh and scp accepts a recreated TPU's new host keys."""
  for call in calls:
    assert "--quiet" in call, call
    if call[1:4] == ["compute", "tpus", "tpu-vm"] and call[4] in ("ssh", "scp"):
      assert "--strict-host-key-checking=no" in call, call
