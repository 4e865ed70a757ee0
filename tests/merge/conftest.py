"""The merge tests' models, built once per session: a base, two fine-tunes of it, an adapter over it."""

import pathlib

import pytest

from merge_helpers import fine_tune, write_adapter, write_tiny_llama


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("merge-zoo")
  base = write_tiny_llama(root / "base", seed=0)
  return {
    "base": base,
    "a": fine_tune(base, root / "a", seed=1),
    "b": fine_tune(base, root / "b", seed=2),
    "lora": write_adapter(base, root / "lora", seed=3),
  }
