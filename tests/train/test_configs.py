"""Every file in configs/ builds and validates (no weights load); bad settings fail early, naming the key."""

import pytest

from jaxtune.models.config import from_hf_dict
from jaxtune.train import builtin_models, loop
from jaxtune.train import checkpoint as ckpt_lib
from jaxtune.train import config as config_lib

import tiny_runs

CONFIG_FILES = sorted(p.stem for p in tiny_runs.CONFIGS.glob("*.py") if not p.name.startswith("_"))
REQUIRED = (
  "model.path",
  "data.train",
  "output_dir",
  "train.steps",
  "peft.method",
  "peft.lora.rank",
  "peft.lora.alpha",
  "resume",
)


def _get(config, key):
  for part in key.split("."):
    config = config[part]
  return config


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_file_builds(name, tmp_path, monkeypatch):
  config = tiny_runs.load_config(name)
  source = (tiny_runs.CONFIGS / f"{name}.py").read_text()
  if "train" not in config:  # not a training config (e.g. the data stage's example)
    return
  assert f"python -m jaxtune.train --config configs/{name}.py" in source, "the docstring must hold the command"
  for key in REQUIRED:
    _get(config, key)
  if config.model.adapter:  # a stage after another run: that run's exported adapter, relative to the cwd
    (tmp_path / config.model.adapter).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
  config_lib.validate(config)
  resolved = config_lib.resolve(config, "tpu")
  assert resolved.model.dtype == "bfloat16"
  assert resolved.model.param_dtype == ("float32" if config.peft.method == "full" else "bfloat16")


def test_auto_attention_follows_the_checkpoint_on_gpu():
  config = tiny_runs.load_config("tiny")
  llama = from_hf_dict(builtin_models.TINY_CONFIG)  # head_dim 8, no soft-capping
  gemma2 = from_hf_dict({**builtin_models.TINY_CONFIG, "model_type": "gemma2"})  # soft-capped
  assert config_lib.resolve(config, "gpu", llama).model.attention_impl == "cudnn"
  assert config_lib.resolve(config, "gpu", gemma2).model.attention_impl == "chunked"
  assert config_lib.resolve(config, "cpu", llama).model.attention_impl == "chunked"
  assert config_lib.resolve(config, "gpu").model.attention_impl == "chunked"  # checkpoint unknown: portable
  config.data.max_seq_len = 255  # an odd row length: cuDNN's masked kernel needs even ones
  assert config_lib.resolve(config, "gpu", llama).model.attention_impl == "chunked"
  impl, why = config_lib.auto_attention(config_lib.resolve(config, "gpu"), "gpu", llama)
  assert impl == "chunked" and "[255]" in why
  config.data.max_seq_len = 256
  config.model.dtype = "float32"
  assert config_lib.resolve(config, "gpu", llama).model.attention_impl == "chunked"
  config.model.dtype, config.model.attention_impl = "auto", "xla"
  assert config_lib.resolve(config, "gpu", llama).model.attention_impl == "xla"  # a choice is kept


def test_auto_kernels_are_the_cpu_ones_on_cpu_only():
  config = tiny_runs.load_config("tiny")
  assert config_lib.resolve(config, "cpu").model.kernels == "cpu"
  assert config_lib.resolve(config, "tpu").model.kernels == "plain"
  assert config_lib.resolve(config, "gpu").model.kernels == "plain"
  config.model.kernels = "plain"
  assert config_lib.resolve(config, "cpu").model.kernels == "plain"  # a choice is kept
  options = config_lib.model_options(config_lib.resolve(config, "tpu"), "tpu")
  assert (options.kernels, options.dtype, options.attention_impl) == ("plain", "bfloat16", "chunked")


def test_training_configs_are_all_there():
  assert {"quickstart", "llama3_8b_lora", "qwen2_5_7b_lora", "gemma2_2b_full", "tiny"} <= set(CONFIG_FILES)
  assert {"dpo_tiny", "dpo_quickstart", "llama3_8b_dpo"} <= set(CONFIG_FILES)


def test_config_is_locked_against_typos():
  config = tiny_runs.load_config("tiny")
  config.lock()
  with pytest.raises(AttributeError, match="stpes"):
    config.train.stpes = 3


BAD = [
  ({"output_dir": ""}, "output_dir: empty"),
  ({"model.path": ""}, "model.path: empty"),
  ({"model.path": "./no/such/dir"}, "model.path: ./no/such/dir is neither a directory nor a hub id"),
  ({"peft.method": "qlora"}, "peft.method: 'qlora' is not one of lora, ia3, prompt, prefix, full"),
  (
    {"peft.method": "prompt", "peft.prompt.num_virtual_tokens": 128},
    "data.max_seq_len: 128 leaves no room for peft.prompt.num_virtual_tokens=128",
  ),
  ({"peft.method": "prefix", "objective": "dpo"}, "objective: dpo with peft.method=prefix"),
  ({"peft.method": "prompt", "peft.prompt.init": "text"}, "peft.prompt.init_text: empty with peft.prompt.init=text"),
  ({"peft.method": "prefix", "peft.prefix.num_virtual_tokens": 0}, "peft.prefix.num_virtual_tokens: 0 must be >= 1"),
  ({"peft.lora.rank": 0}, "peft.lora.rank: 0 must be >= 1"),
  ({"peft.lora.dropout": 1.0}, "peft.lora.dropout"),
  ({"peft.method": "full", "peft.lora.use_dora": True}, "peft.lora.use_dora: DoRA adapters need peft.method=lora"),
  ({"peft.method": "full", "model.param_dtype": "bfloat16"}, "model.param_dtype: bfloat16 with peft.method=full"),
  ({"train.steps": 0}, "train.steps: 0 trains data.num_epochs epochs, but that is 0"),
  ({"train.steps": -1}, "train.steps: -1 must be >= 1"),
  ({"train.grad_accum": 3}, "data.batch_size: 8 rows do not split into train.grad_accum=3"),
  ({"data.train": ()}, "data.train: no training data"),
  ({"data.bucket_lengths": (4096,)}, "data.bucket_lengths: [4096] outside 1..max_seq_len"),
  (
    {"model.attention_impl": "cudnn", "data.bucket_lengths": (63, 128)},
    "data.max_seq_len / data.bucket_lengths: rows of [63] tokens, but cuDNN attention",
  ),
  ({"data.train": ("missing.jsonl",)}, "data.train: missing.jsonl does not exist"),
  ({"data.validation": (), "train.eval_every": 5}, "train.eval_every: 5 but there is no validation data"),
  (
    {"checkpoint.keep_best": True, "checkpoint.every": 7},
    "checkpoint.every=7 is not a multiple of train.eval_every=20",
  ),
  ({"checkpoint.keep_best": True, "train.eval_every": 0}, "checkpoint.keep_best: needs a validation loss"),
  ({"resume": "latest"}, "resume: 'latest' is not one of auto, never"),
  ({"model.remat": "some"}, "model.remat"),
  ({"logging.wandb_project": "p"}, "wandb package is not installed"),
  ({"task.test_file": "nope.jsonl"}, "task.test_file: nope.jsonl is not a file"),
  ({"optim.name": "adam"}, "optim.name: unknown 'adam'"),
  ({"optim.warmup_steps": 100, "train.steps": 10}, "optim.warmup_steps=100"),
  ({"data.max_seq_len": 4096}, "data.max_seq_len: 4096 exceeds the model's max_position_embeddings (1024)"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_settings_fail_with_the_key_and_the_reason(overrides, message, tmp_path, monkeypatch):
  monkeypatch.chdir(tiny_runs.REPO)
  if "wandb" in message and _has_wandb():
    pytest.skip("wandb is installed here")
  config = tiny_runs.tiny(tmp_path / "run", tmp_path / "cache", **overrides)
  if "max_position_embeddings" in message:  # needs a local checkpoint directory to read config.json from
    from jaxtune.train import builtin_models

    config.model.path = str(builtin_models.write_tiny(tmp_path / "tiny"))
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value)


def _has_wandb() -> bool:
  import importlib.util

  return importlib.util.find_spec("wandb") is not None


def test_resume_never_refuses_to_overwrite_checkpoints(tmp_path):
  ckpt_lib.Checkpoints(tmp_path / "run" / "checkpoints").close()
  c = ckpt_lib.Checkpoints(tmp_path / "run" / "checkpoints")
  import jax.numpy as jnp

  c.save(1, {"x": jnp.zeros(2)}, data_state=None, config={})
  c.close()
  config = tiny_runs.tiny(tmp_path / "run", tmp_path / "cache", resume="never")
  with pytest.raises(config_lib.ConfigError, match="resume: 'never', but .* already holds checkpoints"):
    loop.train(config)
