"""LoRA on a quantised base through the whole loop (configs/tiny.py with model.quantize=int8; its d=32 Llama's
head_dim of 8 is too small for NF4 blocks, whose own runs are tests/parallel's and the export tests'): the
checkpoints hold the adapters only, resume is exact, and the run learns."""

import numpy as np
import pytest

from jaxtune.train import loop

import tiny_runs

# A constant learning rate: the cut run, told to stop at step 4, then follows the same schedule as the straight one.
SETTINGS = {"model.quantize": "int8", "train.steps": 8, "train.eval_every": 4, "checkpoint.every": 4}
SETTINGS |= {"optim.schedule": "constant", "optim.warmup_steps": 0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def test_quantised_base_resumes_exactly_from_adapter_only_checkpoints(tmp_path, cache, capsys):
  straight = loop.train(tiny_runs.tiny(tmp_path / "straight", cache, **SETTINGS))
  assert "training 8,192 of 30,880 parameters" in capsys.readouterr().out  # the weights, not the bytes, counted
  loop.train(tiny_runs.tiny(tmp_path / "cut", cache, **{**SETTINGS, "train.steps": 4}))
  resumed = loop.train(tiny_runs.tiny(tmp_path / "cut", cache, **SETTINGS))
  assert resumed["step"] == 8 and resumed["eval/loss"] == straight["eval/loss"]
  assert tiny_runs.train_curve(tmp_path / "cut") == tiny_runs.train_curve(tmp_path / "straight")
  saved = tiny_runs.saved_state(tmp_path / "straight", 8)
  params = [k for k in saved if k.startswith("params/")]
  assert params and all("adapter" in k for k in params)  # the quantised base is rebuilt, never saved
  for key, value in tiny_runs.saved_state(tmp_path / "cut", 8).items():
    np.testing.assert_array_equal(value, saved[key], err_msg=key)
  curve = tiny_runs.train_curve(tmp_path / "straight")
  assert curve[8][0] < curve[1][0]
