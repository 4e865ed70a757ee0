"""The tree passes the linter and the formatter as configured in pyproject.toml ([tool.ruff])."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
  out = subprocess.run(
    [sys.executable, "-m", "ruff", *command, "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, f"ruff {' '.join(command)} .:\n{out.stdout[-4000:]}{out.stderr[-2000:]}"


def test_test_modules_have_unique_names():
  """The test directories are not packages, so pytest imports each module by its file name: two tests/*/test_x.py
  collide ("import file mismatch") as soon as both are collected in one process."""
  import collections
  import pathlib

  names = collections.Counter(p.name for p in pathlib.Path(__file__).parent.rglob("test_*.py"))
  assert not [name for name, count in names.items() if count > 1]
