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
