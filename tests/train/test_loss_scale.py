"""float16 training: without loss scaling the gradients underflow to zero; with dynamic scaling the run trains,
the scale grows and backs off, and a resumed run continues bit for bit."""

import json
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune.train import builtin_models, loop
from jaxtune.train import checkpoint as ckpt_lib
from jaxtune.train import config as config_lib
from jaxtune.train.loss_scale import LossScale

import tiny_runs

# The tiny model with its final norm weight times K and its head divided by K: the same function, but the
# gradient reaching the last hidden state is K times smaller. With 64 rows (about 3,500 trained tokens, each
# weighted 1 / tokens) it falls below float16's smallest subnormal (6e-8), as an LLM's does in a large batch.
K = 8192.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def small_grads_model(tmp_path_factory):
  out = builtin_models.write_tiny(tmp_path_factory.mktemp("small_grads"))
  tensors = load_file(out / "model.safetensors")
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] / K
  tensors["model.norm.weight"] = tensors["model.norm.weight"] * K
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
  return out


def _fp16(run_dir, cache, model, **overrides):
  """6 float16 steps of 64 rows, checkpoints after 3 and 6; the scale doubles after every finite step."""
  return tiny_runs.tiny(
    run_dir,
    cache,
    **{
      "model.path": str(model),
      "model.dtype": "float16",
      "data.batch_size": 64,
      "train.steps": 6,
      "train.eval": False,
      "train.eval_every": 0,
      "train.loss_scale_growth_interval": 1,
      "checkpoint.every": 3,
      "checkpoint.keep": 5,
      "optim.schedule": "constant",
      "optim.warmup_steps": 0,
      **overrides,
    },
  )


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory, cache, small_grads_model):
  run_dir = tmp_path_factory.mktemp("dynamic")
  # max_nan_streak=1: an overflow that the scale can still back off from must not count as a streak.
  config = _fp16(run_dir, cache, small_grads_model, **{"train.max_nan_streak": 1})
  return config, run_dir, loop.train(config)


def _lines(run_dir):
  return [{k: v for k, v in m.items() if k != "train/tokens_per_s"} for m in tiny_runs.metrics(run_dir)]


def test_float16_underflows_without_loss_scaling_and_trains_with_it(tmp_path, cache, small_grads_model, scaled_run):
  loop.train(_fp16(tmp_path, cache, small_grads_model, **{"train.loss_scale": "none"}))
  plain = [m for m in tiny_runs.metrics(tmp_path) if "train/loss" in m]
  assert [m["train/grad_norm"] for m in plain] == [0.0] * 6  # every gradient underflowed to zero
  assert all(m["train/loss"] > 5.2 for m in plain), plain  # so nothing is learnt
  assert "train/loss_scale" not in plain[0]
  state = tiny_runs.saved_state(tmp_path, 6)
  assert all(not v.any() for k, v in state.items() if k.endswith("lora_b"))  # the adapters never moved

  _, run_dir, result = scaled_run
  scaled = [m for m in tiny_runs.metrics(run_dir) if "train/loss" in m]
  assert scaled[0]["train/loss"] == pytest.approx(plain[0]["train/loss"])  # the same first batch and weights
  assert scaled[4]["train/loss"] < 0.7 * scaled[0]["train/loss"], scaled
  loop.train(_fp16(tmp_path / "f32", cache, small_grads_model, **{"model.dtype": "float32"}))
  reference = [m["train/loss"] for m in tiny_runs.metrics(tmp_path / "f32") if "train/loss" in m]
  assert [m["train/loss"] for m in scaled[:5]] == pytest.approx(reference[:5], abs=2e-3)  # trains as float32 does
  assert scaled[0]["train/grad_norm"] > 1.0
  # Doubled after each finite step; step 6's gradients overflow 2**20: skipped, counted, and the scale halves.
  assert [m["train/loss_scale"] for m in scaled] == [2.0**e for e in range(15, 21)]
  assert [m["train/skipped_total"] for m in scaled] == [0, 0, 0, 0, 0, 1] and scaled[5]["train/loss"] is None
  assert result["step"] == 6 and result["train/skipped"] == 1
  state = tiny_runs.saved_state(run_dir, 6)
  assert float(state["loss_scale/scale"]) == 2.0**19 and int(state["loss_scale/good_steps"]) == 0
  assert int(state["nonfinite_streak"]) == 0


def test_float16_resume_continues_bit_for_bit(tmp_path, scaled_run):
  config, run_dir, _ = scaled_run
  (tmp_path / "checkpoints").mkdir()
  shutil.copytree(run_dir / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
  config.output_dir = str(tmp_path)
  assert loop.train(config)["step"] == 6
  assert tiny_runs.saved_state(tmp_path, 3)["loss_scale/scale"] == 2.0**18  # the scale was restored, not reset
  a, b = tiny_runs.saved_state(run_dir, 6), tiny_runs.saved_state(tmp_path, 6)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert _lines(tmp_path) == [m for m in _lines(run_dir) if m["step"] > 3]


def test_the_scale_grows_after_n_finite_steps_and_halves_on_overflow():
  scale = LossScale.create(growth_interval=2, scale=4.0)
  seen = []
  for finite in (True, True, True, False, True, True, False, False, False, False):
    scale = scale.adjust(jnp.asarray(finite))
    seen.append((float(scale.scale), int(scale.good_steps)))
  assert seen == [(4, 1), (8, 0), (8, 1), (4, 0), (4, 1), (8, 0), (4, 0), (2, 0), (1, 0), (1, 0)]  # never below 1
  assert float(LossScale.create().scale) == 2.0**15


def test_loss_scale_auto_means_dynamic_for_float16_only(tmp_path):
  for dtype, expected in (("float16", "dynamic"), ("bfloat16", "none"), ("float32", "none")):
    config = config_lib.default_config()
    config.model.dtype = dtype
    assert config_lib.resolve(config, "gpu").train.loss_scale == expected
  config = tiny_runs.tiny(tmp_path, tmp_path, **{"train.loss_scale": "static"})
  with pytest.raises(config_lib.ConfigError, match=r"train.loss_scale: 'static' is not one of auto, dynamic, none"):
    config_lib.validate(config)


def test_checkpoints_without_the_loss_scale_restore_and_with_it_restore_elsewhere(tmp_path):
  """A checkpoint saved before float16 (no loss scale) resumes a float16 run, and the other way round."""
  params = {"a": jnp.arange(8.0)}
  old = {"params": params, "step": jnp.int32(7)}
  with_scale = {**old, "loss_scale": LossScale.create(scale=64.0)}
  ckpts = ckpt_lib.Checkpoints(tmp_path / "old", keep=2)
  ckpts.save(7, old, data_state=None, config={})
  ckpts.wait()
  like = {"params": {"a": jnp.zeros(8)}, "step": jnp.int32(0), "loss_scale": LossScale.create()}
  with pytest.warns(RuntimeWarning, match=r"old/7 has no 'loss_scale' .* starts from its initial value"):
    got = ckpts.restore(like)
  assert got.step == 7 and int(got.state["step"]) == 7 and np.array_equal(got.state["params"]["a"], np.arange(8.0))
  assert float(got.state["loss_scale"].scale) == 2.0**15
  ckpts.close()

  ckpts = ckpt_lib.Checkpoints(tmp_path / "new", keep=2)
  ckpts.save(3, with_scale, data_state=None, config={})
  ckpts.wait()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # dropping the scale (float16 -> bfloat16) is silent
    got = ckpts.restore({"params": {"a": jnp.zeros(8)}, "step": jnp.int32(0)})
  assert got.step == 3 and set(got.state) == {"params", "step"}
  assert float(ckpts.restore(with_scale).state["loss_scale"].scale) == 64.0
  ckpts.close()
