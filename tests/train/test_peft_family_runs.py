"""IA3 (on an int8 base), prompt tuning and prefix tuning through the whole loop (configs/tiny.py): resume after a
cut is exact, checkpoints hold the adapters only, and the run exports as a PEFT adapter of its method."""

import json

import pytest

from jaxtune.export.run import export_run
from jaxtune.train import loop

import tiny_runs

SETTINGS = {"train.steps": 6, "train.eval_every": 3, "checkpoint.every": 3}
SETTINGS |= {"optim.schedule": "constant", "optim.warmup_steps": 0, "optim.lr": 3e-2}
METHODS = {
  "ia3": {"peft.method": "ia3", "model.quantize": "int8"},
  "prompt": {"peft.method": "prompt", "peft.prompt.num_virtual_tokens": 4},
  "prefix": {"peft.method": "prefix", "peft.prefix.num_virtual_tokens": 4},
}
PEFT_TYPES = {"ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.mark.slow  # 3 x 3 tiny runs, ~40 s on 2 cores
@pytest.mark.parametrize("method", list(METHODS))
def test_resumes_exactly_and_exports_its_adapter(method, tmp_path, cache):
  settings = {**SETTINGS, **METHODS[method]}
  straight = loop.train(tiny_runs.tiny(tmp_path / "straight", cache, **settings))
  loop.train(tiny_runs.tiny(tmp_path / "cut", cache, **{**settings, "train.steps": 3}))
  resumed = loop.train(tiny_runs.tiny(tmp_path / "cut", cache, **settings))
  assert resumed["step"] == 6 and resumed["eval/loss"] == straight["eval/loss"]
  assert tiny_runs.train_curve(tmp_path / "cut") == tiny_runs.train_curve(tmp_path / "straight")
  saved = tiny_runs.saved_state(tmp_path / "straight", 6)
  params = [k for k in saved if k.startswith("params/")]
  assert params and all(("adapter" in k) or ("virtual" in k) for k in params), params
  curve = tiny_runs.train_curve(tmp_path / "straight")
  assert curve[6][0] < curve[1][0]
  out = export_run(tmp_path / "straight", tmp_path / "adapter", "adapter")
  assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == PEFT_TYPES[method]
