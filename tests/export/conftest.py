"""Fixtures for the export tests: tiny HF models (tests/models/tiny_hf.py) and SmolLM2 loaded once."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))


@pytest.fixture(scope="session")
def smollm2_lora(smollm2_dir):
  """SmolLM2-135M-Instruct in jaxtune (float32) with LoRA adapters at their init (B = 0): the base function."""
  from flax import nnx

  from jaxtune.hf.load import load_model
  from jaxtune.peft import apply_lora

  return apply_lora(load_model(smollm2_dir), rank=4, alpha=8.0, rngs=nnx.Rngs(0))
