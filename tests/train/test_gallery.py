"""configs/gallery/: one config per sensible (family x method), each loaded strictly, validated and resolved."""

import pathlib
import re

import pytest

from jaxtune import configs
from jaxtune.train import config as config_lib

GALLERY = pathlib.Path(configs.HERE) / "gallery"
NAMES = sorted(p.stem for p in GALLERY.glob("*.py") if not p.name.startswith("_"))
FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"}
METHODS = {"lora", "qlora", "dora", "ia3", "prompt", "prefix", "full", "dpo", "grpo"}


def _method(config) -> str:
  """The method a config runs, in the gallery's naming."""
  if config.objective != "sft":
    return config.objective
  if config.peft.method == "lora":
    return "qlora" if config.model.quantize == "nf4" else "dora" if config.peft.lora.use_dora else "lora"
  return config.peft.method


@pytest.mark.parametrize("name", NAMES)
def test_gallery_config_loads_validates_and_resolves(name):
  path = GALLERY / f"{name}.py"
  config = configs.load(str(path), [])  # the strict loader `jaxtune train --config` uses
  source = path.read_text()
  assert f"jaxtune train --config configs/gallery/{name}.py" in source, "the docstring must hold the command"
  assert name.endswith("_" + _method(config)), f"{name} runs {_method(config)}"
  assert config.output_dir == f"runs/{name}"
  config_lib.validate(config)  # hub ids: nothing is fetched
  for platform in ("tpu", "gpu"):
    assert config_lib.resolve(config, platform).model.dtype == "bfloat16"


def test_the_gallery_covers_every_family_and_method():
  families = {re.search(r"\((\w+)\)", (GALLERY / f"{n}.py").read_text()).group(1) for n in NAMES}
  methods = {n.rsplit("_", 1)[1] for n in NAMES}
  assert families == FAMILIES and methods == METHODS


def test_a_gallery_config_runs_by_name_from_the_package():
  assert configs.find("gallery/gemma3_1b_lora") == GALLERY / "gemma3_1b_lora.py"
