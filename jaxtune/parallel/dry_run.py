"""Compile the train step for a model shape on a mesh, without weights, and print per-device memory.

    python -m jaxtune.parallel.dry_run --config configs/llama3_8b_lora.py --num_devices 8,16
    python -m jaxtune.parallel.dry_run --model llama3.1-70b --method full --num_devices 64 --seq 2048

The model is built with `nnx.eval_shape` (shapes only), so nothing is downloaded but config.json
(or a preset below). The mesh is made of N fake CPU devices and XLA's own memory analysis of the
compiled per-device program gives the numbers. `--platform` (default tpu) picks the program: the
dtypes, attention and kernels that the training CLI resolves for that platform, so a TPU estimate
traces the plain program a TPU runs, not the CPU kernels. A CPU compile approximates the TPU or GPU
one (different fusion and layout choices), so leave ~10-15% headroom; fused kernels that only
compile on their device (cuDNN, splash) are stood in for by the chunked attention, which like them
keeps no [T, S] probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxtune import cli, configs
from jaxtune.errors import ConfigError
from jaxtune.models.config import ModelConfig, from_hf_dict
from jaxtune.models.options import ModelOptions
from jaxtune.models.transformer import CausalLM
from jaxtune.parallel import mesh as mesh_lib
from jaxtune.parallel import sharding as sharding_lib
from jaxtune.peft import apply_lora
from jaxtune.peft.lora import base_graphdef, split_trainable
from jaxtune.train import builtin_models, objectives, optim
from jaxtune.train import step as step_lib

# The config.json fields that set memory, for the models of docs/scaling.md (rope and norms do not matter here).
PRESETS = {
  "llama3.1-8b": dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
  ),
  "llama3.1-70b": dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
  ),
  "qwen2.5-7b": dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
  ),
  "qwen2.5-72b": dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=8192,
    intermediate_size=29568,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
  ),
  "gemma2-9b": dict(
    model_type="gemma2",
    vocab_size=256000,
    hidden_size=3584,
    intermediate_size=14336,
    num_hidden_layers=42,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
  ),
  "gemma2-27b": dict(
    model_type="gemma2",
    vocab_size=256000,
    hidden_size=4608,
    intermediate_size=36864,
    num_hidden_layers=46,
    num_attention_heads=32,
    num_key_value_heads=16,
    head_dim=128,
    query_pre_attn_scalar=144,
  ),
}
HUB_IDS = {
  "meta-llama/Llama-3.1-8B": "llama3.1-8b",
  "meta-llama/Llama-3.1-8B-Instruct": "llama3.1-8b",
  "meta-llama/Llama-3.1-70B": "llama3.1-70b",
  "meta-llama/Llama-3.1-70B-Instruct": "llama3.1-70b",
  "Qwen/Qwen2.5-7B": "qwen2.5-7b",
  "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
  "Qwen/Qwen2.5-72B": "qwen2.5-72b",
  "Qwen/Qwen2.5-72B-Instruct": "qwen2.5-72b",
  "google/gemma-2-9b": "gemma2-9b",
  "google/gemma-2-9b-it": "gemma2-9b",
  "google/gemma-2-27b": "gemma2-27b",
  "google/gemma-2-27b-it": "gemma2-27b",
}
GIB = 1024**3


@dataclasses.dataclass
class Report:
  """Per-device bytes of one compiled train step."""

  devices: int
  mesh: dict[str, int]
  params: int  # frozen + trainable weights (from the shardings)
  trainable: int
  optimizer: int
  batch: int
  temp: int  # XLA temporaries: activations, gradients in flight, all-gathered weights
  argument: int  # XLA: inputs (state, frozen, batch)
  output: int
  alias: int  # outputs written into donated inputs
  code: int

  @property
  def peak(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code

  def line(self) -> str:
    g = lambda b: f"{b / GIB:7.2f}"
    mesh = "x".join(str(self.mesh[a]) for a in mesh_lib.AXES)
    return (
      f"{self.devices:5d} {mesh:>9} {g(self.params)} {g(self.trainable)} {g(self.optimizer)} {g(self.temp)} "
      f"{g(self.peak)}"
    )


HEADER = "devices  d x f x t  params  trained  optim.  act/tmp  peak (GiB per device)"


def model_config(
  model: str = "", model_config_path: str = "", config_model_path: str = "", cache_dir: str = ""
) -> ModelConfig:
  """ModelConfig from a preset name, a config.json path, or a run config's model.path (dir, hub id, built-in)."""
  if config_model_path in builtin_models.BUILTIN_MODELS:
    config_model_path = builtin_models.resolve(config_model_path, cache_dir or builtin_models.DEFAULT_CACHE)
  if model_config_path:
    return from_hf_dict(json.loads(pathlib.Path(model_config_path).read_text()), model_config_path)
  name = model or HUB_IDS.get(config_model_path, "")
  if name:
    if name not in PRESETS:
      raise ConfigError(f"--model: unknown {name!r}; presets: {', '.join(PRESETS)}.")
    return from_hf_dict(PRESETS[name], name)
  local = pathlib.Path(config_model_path).expanduser() / "config.json"
  if config_model_path and local.is_file():
    return from_hf_dict(json.loads(local.read_text()), str(local))
  raise ConfigError(
    f"no model shape for {config_model_path!r}: pass --model ({', '.join(PRESETS)}) or "
    "--model_config path/to/config.json."
  )


def compile_report(
  cfg: ModelConfig,
  options: ModelOptions,
  mesh: jax.sharding.Mesh,
  rules: Any,
  *,
  method: str,
  lora_rank: int,
  use_dora: bool = False,
  optimizer: Any,
  rows: int,
  seq: int,
  accum: int = 1,
  constrain: bool = True,
  objective: str = "sft",
  objective_settings: Any = None,
) -> Report:
  """Compiles one train step of an abstract model on `mesh`; returns XLA's per-device memory.

  objective: a preference objective's step holds both sequences of each pair in its rows, and for
  DPO / KTO under LoRA also the reference forward (adapters off; the larger of the two reference
  modes); under full fine-tuning the precomputed reference log-probs ride in the batch.
  """
  if constrain:  # each layer's input split by batch rows, as the training loop does
    options = options.replace(constrain=sharding_lib.ActivationSharding(mesh, rules))

  def build():
    model = CausalLM(cfg, options, rngs=nnx.Rngs(0))
    if method == "lora":
      apply_lora(model, rank=lora_rank, alpha=2.0 * lora_rank, use_dora=use_dora, rngs=nnx.Rngs(1))
    if objective == "reward":
      model.add_score_head()
    return model

  abstract = nnx.eval_shape(build)
  with_reference = objective in objectives.WITH_REFERENCE
  live = with_reference and method == "lora"
  step_objective = step_lib.Objective(objective, objective_settings, base_graphdef(abstract) if live else None)
  graphdef, params, keys, rest = split_trainable(abstract, method)
  sds = lambda tree: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(tree))
  params_sds, frozen = sds(params), step_lib.Frozen(sds(rest), sds(keys))
  scalar = jax.ShapeDtypeStruct((), np.int32)
  state = step_lib.TrainState(
    params_sds,
    jax.eval_shape(optimizer.init, params_sds),
    scalar,
    jax.ShapeDtypeStruct((2,), np.uint32),
    scalar,
    scalar,
  )
  shape = (accum, rows // accum, seq)
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32) for k in step_lib.BATCH_KEYS}
  if objective == "kto":
    batch["labels"] = jax.ShapeDtypeStruct(shape, np.int32)
  if with_reference and not live:
    batch["ref_logps"] = jax.ShapeDtypeStruct(shape, np.float32)
  sh = sharding_lib.train_shardings(abstract, optimizer, mesh, rules, method=method)

  def step(state, frozen, batch):
    return step_lib.make_train_step(graphdef, frozen, optimizer, objective=step_objective)(state, batch)

  jitted = jax.jit(step, in_shardings=sh.step_args, out_shardings=(sh.state, None), donate_argnums=0)
  stats = jitted.lower(state, frozen, batch).compile().memory_analysis()
  trained = sharding_lib.per_device_bytes(state.params, sh.state.params)
  return Report(
    devices=mesh.size,
    mesh=dict(mesh.shape),
    params=trained + sharding_lib.per_device_bytes(frozen, sh.frozen),
    trainable=trained,
    optimizer=sharding_lib.per_device_bytes(state.opt_state, sh.state.opt_state),
    batch=sharding_lib.per_device_bytes(batch, jax.tree.map(lambda _: sh.batch, batch)),
    temp=stats.temp_size_in_bytes,
    argument=stats.argument_size_in_bytes,
    output=stats.output_size_in_bytes,
    alias=stats.alias_size_in_bytes,
    code=stats.generated_code_size_in_bytes,
  )


@cli.guard
def main(argv: list[str]) -> int:
  run(argv)
  return 0


def run(argv: list[str]) -> list[Report]:
  """The reports for the command line `argv`, printed as they come."""
  p = cli.parser("jaxtune dry-run", __doc__.split("\n")[0])
  p.add_argument("--config", help="a config file or a shipped name: model.path, peft, optim, data sizes, mesh")
  p.add_argument("--model", default="", help=f"a preset shape: {', '.join(PRESETS)}")
  p.add_argument("--model_config", default="", help="an HF config.json instead of the config's model.path")
  p.add_argument("--num_devices", default="8", help="comma-separated device counts, e.g. 8,16,32")
  p.add_argument("--method", choices=("lora", "full"), help="override peft.method")
  p.add_argument("--preset", choices=tuple(mesh_lib.PRESETS), help="override mesh.preset")
  p.add_argument("--seq", type=int, help="override data.max_seq_len")
  p.add_argument("--batch_per_device", type=int, help="rows per data-parallel device (else data.batch_size)")
  p.add_argument("--remat", help="override model.remat")
  p.add_argument("--quantize", choices=("none", "nf4", "int8"), help="override model.quantize (QLoRA: nf4)")
  p.add_argument("--double_quant", action="store_true", help="set model.double_quant (NF4 absmax values in 8 bits)")
  p.add_argument(
    "--platform",
    choices=("tpu", "gpu", "cpu"),
    default="tpu",
    help="the platform whose program is traced: its dtypes, attention and kernels (default tpu)",
  )
  p.add_argument("--attention_impl", help="override model.attention_impl (xla | chunked | ...)")
  p.add_argument("--no_constraint", action="store_true", help="compile the model as is (no layer-input constraint)")
  p.add_argument("--json", action="store_true", help="print one JSON line per report too")
  args = p.parse_args(argv)

  from jaxtune.train import config as config_lib

  config = configs.load(args.config) if args.config else config_lib.default_config()
  config.unlock()
  for key, value in (
    ("peft.method", args.method),
    ("data.max_seq_len", args.seq),
    ("model.remat", args.remat),
    ("model.attention_impl", args.attention_impl),
    ("model.quantize", args.quantize),
    ("model.double_quant", args.double_quant or None),
  ):
    if value is not None:
      node, leaf = config, key.split(".")
      for part in leaf[:-1]:
        node = node[part]
      node[leaf[-1]] = value
  mesh_cfg = config.get("mesh") or mesh_lib.mesh_config()
  if args.preset:
    mesh_cfg = ml_collections.ConfigDict(mesh_cfg.to_dict())
    mesh_cfg.preset = args.preset
  cfg = model_config(args.model, args.model_config, config.model.path, config.model.cache_dir)
  config = config_lib.resolve(config, args.platform, cfg)  # e.g. TPU: bfloat16 compute, float32 masters for full
  options = config_lib.model_options(config, args.platform)
  note = ""
  if options.attention_impl in ("cudnn", "splash"):  # they compile only on their device
    note = f" ({options.attention_impl} stood in for by chunked)"
    options = options.replace(attention_impl="chunked", interpret=False)
  counts = [int(n) for n in args.num_devices.split(",")]
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", max(counts))
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  print(
    f"{cfg.model_type} d={cfg.hidden_size} L={cfg.num_layers}, {config.peft.method}, objective {config.objective}, "
    f"seq {config.data.max_seq_len}, "
    f"remat {options.remat}, {options.dtype} compute / {options.param_dtype} params, attention "
    f"{options.attention_impl}{note}, {options.kernels} kernels, optimizer {config.optim.name}, "
    f"quantize {options.quantize}{' (double)' if options.double_quant else ''}; "
    f"the {args.platform} program, compiled for CPU devices"
  )
  print(HEADER)
  reports = []
  for n in counts:
    mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:n])
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = batch_ways * args.batch_per_device if args.batch_per_device else config.data.batch_size
    accum = 1 if args.batch_per_device else config.train.grad_accum
    report = compile_report(
      cfg,
      options,
      mesh,
      mesh_cfg.rules,
      method=config.peft.method,
      lora_rank=config.peft.lora.rank,
      use_dora=config.peft.lora.use_dora,
      optimizer=optimizer,
      rows=rows,
      seq=config.data.max_seq_len,
      accum=accum,
      constrain=not args.no_constraint,
      objective=config.objective,
      objective_settings=objectives.settings(config),
    )
    print(report.line(), flush=True)
    if args.json:
      print(json.dumps({**dataclasses.asdict(report), "peak": report.peak}))
    reports.append(report)
  return reports


if __name__ == "__main__":
  sys.exit(main())
