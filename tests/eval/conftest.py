"""The evaluation tests run tiny training runs and tiny HF models: their helpers on the path."""

import pathlib
import sys

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "models"))  # tiny_hf
sys.path.insert(0, str(TESTS / "train"))  # tiny_runs: tiny training runs, the persistent XLA cache

import tiny_runs  # noqa: E402, F401  importing it turns on the persistent XLA cache: warm reruns skip the compiles
