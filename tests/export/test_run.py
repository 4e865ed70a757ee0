"""Exporting a training run directory: the step's parameters, every format, and the errors a user can hit.

Run directories are written through the trainer's own pieces (config, TrainState, the
Checkpoints class) with random adapters, so no training is needed; the slow test at the end
trains for real with `jaxtune.train.loop.train`.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxtune.export import ExportError, export_run, load_run
from jaxtune.export.__main__ import main
from jaxtune.hf import mapping
from jaxtune.hf.load import load_model
from jaxtune.peft.lora import peft_state_dict
from jaxtune.train import builtin_models, checkpoint, optim
from jaxtune.train import config as config_lib
from jaxtune.train import step as step_lib

from export_helpers import assert_close_logits, lora_model, read_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[2]
IDS = np.array([[1, 40, 60, 75, 80, 2, 1, 33, 90, 100, 41, 2]])


def tiny_config(run_dir: pathlib.Path, cache: pathlib.Path, **overrides):
  """configs/tiny.py (the built-in tiny-random Llama) resolved for CPU, as the trainer saves it."""
  spec = importlib.util.spec_from_file_location("configs_tiny", REPO / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.output_dir, config.model.cache_dir = str(run_dir), str(cache)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.resolve(config, "cpu")


def write_run(run_dir, cache, method, steps, **overrides):
  """A run directory with one checkpoint per step (random trained params); returns {step: model at that step}."""
  config = tiny_config(run_dir, cache, **{"peft.method": method}, **overrides)
  config_lib.write(config, run_dir)
  source = builtin_models.resolve(config.model.path, config.model.cache_dir)
  lora = config.peft.lora
  if method == "lora":
    model = lora_model(source, rank=lora.rank, alpha=lora.alpha, use_dora=lora.use_dora)
  else:
    model = load_model(source)
  graphdef, frozen, state = step_lib.init_train_state(model, optim.make_optimizer(config.optim, 10), method=method)
  ckpts = checkpoint.Checkpoints(run_dir / "checkpoints", async_save=False)
  models = {}
  for step in steps:
    rng = np.random.default_rng(step)
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), state.params)
    state = state.replace(params=params, step=state.step + 1)
    ckpts.save(step, state, data_state=None, config=config.to_dict())
    models[step] = step_lib.model_from_state(graphdef, frozen, jax.tree.map(np.asarray, params))
  ckpts.close()
  return models


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache):
  run_dir = tmp_path_factory.mktemp("lora_run")
  return run_dir, write_run(run_dir, cache, "lora", steps=(2, 4))


def test_merged_export_of_the_latest_step(lora_run, tmp_path):
  run_dir, models = lora_run
  out = export_run(run_dir, tmp_path / "merged", "merged")
  assert_close_logits(np.asarray(load_model(out)(IDS)), np.asarray(models[4](IDS)), rel=1e-5, what="step 4")
  assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
  assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()


def test_adapter_export_of_an_earlier_step(lora_run, tmp_path):
  run_dir, models = lora_run
  out = export_run(run_dir, tmp_path / "adapter", "adapter", step=2)
  got, want = load_file(out / "adapter_model.safetensors"), peft_state_dict(models[2])
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  assert not np.array_equal(want[next(iter(want))], peft_state_dict(models[4])[next(iter(want))])
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["r"] == 8 and config["lora_alpha"] == 16.0
  assert pathlib.Path(config["base_model_name_or_path"]).is_dir()  # tiny-random: its built directory


def test_load_run_restores_the_step(lora_run):
  run_dir, models = lora_run
  run = load_run(run_dir, 2)
  assert run.step == 2 and run.method == "lora"
  np.testing.assert_array_equal(
    run.model.layers.attn.q.adapter.lora_b[...], models[2].layers.attn.q.adapter.lora_b[...]
  )


def test_dora_run_exports_its_magnitudes(tmp_path, cache):
  run_dir = tmp_path / "run"
  models = write_run(run_dir, cache, "lora", steps=(2,), **{"peft.lora.use_dora": True})
  out = export_run(run_dir, tmp_path / "adapter", "adapter")
  got, want = load_file(out / "adapter_model.safetensors"), peft_state_dict(models[2])
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  assert any(k.endswith(".lora_magnitude_vector") for k in got)
  assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True


def test_full_finetuning_run(tmp_path, cache):
  models = write_run(tmp_path / "run", cache, "full", steps=(3,))
  out = export_run(tmp_path / "run", tmp_path / "merged", "merged", dtype="bfloat16")
  tensors = read_checkpoint(out)
  by_name = {m.hf_name.format(i=0): m for m in mapping.tensor_maps(models[3].config)}
  q = by_name["model.layers.0.self_attn.q_proj.weight"]
  want = q.to_hf(np.asarray(models[3].layers.attn.q.kernel[...][0]))
  assert tensors[q.hf_name.format(i=0)].dtype.name == "bfloat16"
  np.testing.assert_array_equal(tensors[q.hf_name.format(i=0)], want.astype(tensors[q.hf_name.format(i=0)].dtype))
  with pytest.raises(ExportError, match=r"fine-tuned every weight \(peft.method=full\).*--format merged"):
    export_run(tmp_path / "run", tmp_path / "adapter", "adapter")


def test_bad_runs_and_steps(lora_run, tmp_path):
  run_dir, _ = lora_run
  (tmp_path / "empty_run").mkdir()
  with pytest.raises(ExportError, match=r"empty_run: no checkpoint found.*train first"):
    export_run(tmp_path / "empty_run", tmp_path / "out", "merged")
  with pytest.raises(ExportError, match=r"missing_run: not a directory"):
    export_run(tmp_path / "missing_run", tmp_path / "out", "merged")
  with pytest.raises(ExportError, match=r"checkpoints: no checkpoint for step 3; it holds steps 2, 4\. Pass one"):
    export_run(run_dir, tmp_path / "out", "merged", step=3)
  with pytest.raises(ExportError, match=r"format 'onnx' is unknown"):
    export_run(run_dir, tmp_path / "out", "onnx")
  with pytest.raises(ExportError, match=r"tokenizer.json: a WordLevel tokenizer.*byte-level BPE"):
    export_run(run_dir, tmp_path / "out", "gguf")  # tiny-random's character tokenizer has no GGUF form
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_output_paths(lora_run, tmp_path):
  run_dir, _ = lora_run
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ExportError, match=r"a_file/out: cannot write there .*choose a writable --out"):
    export_run(run_dir, tmp_path / "a_file" / "out", "adapter")
  with pytest.raises(ExportError, match=r"a_file: exists and is not a directory"):
    export_run(run_dir, tmp_path / "a_file", "adapter")
  out = export_run(run_dir, tmp_path / "out", "adapter")
  with pytest.raises(
    ExportError,
    match=r"out: already holds a model \(README.md, adapter_config.json, "
    r"adapter_model.safetensors\); pass --overwrite",
  ):
    export_run(run_dir, out, "adapter", step=2)
  export_run(run_dir, out, "adapter", step=2, overwrite=True)


def test_cli_errors_name_the_problem(lora_run, tmp_path, capsys):
  run_dir, _ = lora_run
  assert main(["--run", str(run_dir), "--step", "7", "--out", str(tmp_path / "o"), "--format", "adapter"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "no checkpoint for step 7" in err and str(run_dir) in err


def test_cli_exports_without_importing_torch(lora_run, tmp_path):
  run_dir, _ = lora_run
  script = (
    "import sys; from jaxtune.export.__main__ import main; rc = main(sys.argv[1:]); "
    "assert 'torch' not in sys.modules, 'the export imported torch'; sys.exit(rc)"
  )
  args = ["--run", str(run_dir), "--out", str(tmp_path / "m"), "--format", "merged", "--dtype", "bfloat16"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  proc = subprocess.run(
    [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "wrote" in proc.stdout and "model.safetensors" in proc.stdout
  assert read_checkpoint(tmp_path / "m")["model.embed_tokens.weight"].dtype.name == "bfloat16"


@pytest.mark.slow
def test_export_after_real_training(tmp_path, cache):
  from jaxtune.data import templates
  from jaxtune.hf.load import load_tokenizer
  from jaxtune.train import loop

  # Trained with a named template (ChatML, which the tiny tokenizer's special tokens fit), which the export keeps.
  settings = {"train.steps": 3, "train.eval": False, "train.eval_every": 0, "checkpoint.every": 2}
  config = tiny_config(tmp_path / "run", cache, **settings, **{"data.chat_template": "qwen2.5"})
  loop.train(config)
  run = load_run(tmp_path / "run")
  assert run.step == 3
  merged = export_run(tmp_path / "run", tmp_path / "merged", "merged", step=3)
  assert_close_logits(np.asarray(load_model(merged)(IDS)), np.asarray(run.model(IDS)), rel=1e-5)
  assert (
    load_tokenizer(merged).chat_template == templates.resolve("qwen2.5") != load_tokenizer(run.source_dir).chat_template
  )
  adapter = export_run(tmp_path / "run", tmp_path / "adapter", "adapter", step=2)
  assert set(load_file(adapter / "adapter_model.safetensors")) == set(
    peft_state_dict(load_run(tmp_path / "run", 2).model)
  )
