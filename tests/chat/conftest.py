"""Fixtures for the chat tests: the built-in tiny-random model (character tokenizer, ChatML), built and loaded once."""

import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "models"))  # tiny_hf
sys.path.insert(0, str(TESTS / "export"))  # export_helpers
sys.path.insert(0, str(TESTS / "train"))  # tiny_runs: tiny training runs, the persistent XLA cache

import tiny_runs  # noqa: E402, F401  importing it turns on the persistent XLA cache: warm reruns skip the compiles


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
  from jaxtune.train import builtin_models

  return builtin_models.write_tiny(tmp_path_factory.mktemp("tiny-random"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
  """(model, tokenizer) of the tiny-random checkpoint, float32."""
  from jaxtune.hf.load import load_model, load_tokenizer

  return load_model(tiny_dir), load_tokenizer(tiny_dir)
