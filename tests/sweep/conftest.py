"""Sweep tests run tiny training trials: tiny_runs (the tiny config, the persistent XLA cache) on the path."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "train"))
