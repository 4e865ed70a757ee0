import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
  """The tiny Llama and Qwen2 checkpoints of tiny_models.build, saved once per session: {family: directory}."""
  import tiny_models

  root = tmp_path_factory.mktemp("preference-models")
  return {family: tiny_models.build(family, root / family) for family in ("llama", "qwen2")}
