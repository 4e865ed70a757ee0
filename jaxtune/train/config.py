"""The training config: defaults every `configs/*.py` derives from, and the checks run before any weights load.

Fields that outside tools drive runs through (keep their names and meanings): `model.path`,
`data.train`, `output_dir`, `train.steps`, `peft.method`, `peft.lora.rank`, `peft.lora.alpha`, `resume`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any

import ml_collections

from jaxtune import configs
from jaxtune.data import packing, templates
from jaxtune.data.config import data_config
from jaxtune.errors import ConfigError
from jaxtune.eval import metrics as metrics_lib
from jaxtune.models import attention as attn_lib
from jaxtune.models import options as options_lib
from jaxtune.models import quantize as quantize_lib
from jaxtune.models.config import ModelConfig
from jaxtune.parallel.mesh import mesh_config
from jaxtune.peft.lora import METHODS
from jaxtune.train import builtin_models, objectives
from jaxtune.train import loss_scale as loss_scale_lib
from jaxtune.train.builtin_models import BUILTIN_MODELS
from jaxtune.train.optim import make_optimizer, optim_config

DTYPES = ("auto", "float32", "bfloat16", "float16")
REMAT = options_lib.REMAT_POLICIES
ATTENTION = ("auto",) + options_lib.ATTENTION_IMPLS
KERNELS = ("auto",) + options_lib.KERNELS
RESUME = ("auto", "never")


def default_config() -> ml_collections.ConfigDict:
  """Every training setting and its default; a `configs/NAME.py` changes a few of them."""
  c = ml_collections.ConfigDict()
  c.output_dir = ""  # The run directory: checkpoints/, metrics.jsonl, events, config.json.
  c.resume = "auto"  # auto: continue from the newest complete checkpoint in output_dir | never

  # What the run minimises: sft, or a preference objective with its settings (train/objectives.py).
  for key, value in objectives.objective_config().items():
    c[key] = value

  c.model = ml_collections.ConfigDict(
    dict(
      path="",  # HF directory, hub id, or a built-in: smollm2-gguf | tiny-random (see builtin_models.py)
      dtype="auto",  # compute dtype; auto: bfloat16 on TPU/GPU, float32 on CPU
      param_dtype="auto",  # auto: float32 masters for trained weights; the compute dtype for a frozen LoRA base
      # xla | chunked | cudnn | splash; auto: cudnn on GPU where it applies, else chunked (models/attention.py)
      attention_impl="auto",
      kernels="auto",  # plain | cpu; auto: cpu on the CPU backend, plain on TPU and GPU (models/kernels.py)
      # none | full | dots | dots_no_batch (rematerialise layer activations). dots_no_batch keeps the
      # weight products (an adapted layer's output once, base + delta) and the attention's inputs and
      # outputs, and recomputes the rest: on the CPU benchmark (AMD EPYC, SmolLM2 shape) it is as fast
      # as none, since recomputing elementwise ops costs less than stacking them, and cuts peak RSS by
      # 1.1 GB (LoRA) / 1.4 GB (full); on an H200 it is faster than none and takes 10.6 against 22.8 GB
      # (LoRA, Llama 3.2 1B shape).
      remat="dots_no_batch",
      cache_dir=builtin_models.DEFAULT_CACHE,  # where built-in models are converted to
      # A PEFT LoRA adapter directory (trained elsewhere, or a run exported with --format adapter) that
      # training continues from instead of fresh adapters; its rank, alpha and modules replace peft.lora's.
      # Under DPO and KTO the model it gives is the reference (precomputed).
      adapter="",
      # The hub id this model is known by, named as the base in exported adapters (adapter_config.json).
      # Empty: model.path when that is a hub id; a built-in's own (smollm2-gguf: HuggingFaceTB/...).
      hub_id="",
      # none | nf4 | int8: store the frozen decoder-layer weights quantised as bitsandbytes does (LoRA on an
      # nf4 base is QLoRA); embeddings, norms and the LM head stay 16-bit (models/quantize.py). int8 is
      # per-output-row absmax, not LLM.int8()'s outlier scheme.
      quantize="none",
      quantize_block=64,  # NF4 weights per absmax: 32 ... 4096, dividing each weight's innermost input axis
      double_quant=False,  # NF4: the absmax values stored 8-bit too (bitsandbytes' bnb_4bit_use_double_quant)
    )
  )
  c.data = data_config()

  c.peft = ml_collections.ConfigDict()
  c.peft.method = "lora"  # what is trained: lora (DoRA with use_dora) | ia3 | prompt | prefix | full (every weight)
  c.peft.lora = ml_collections.ConfigDict(
    dict(
      rank=16,  # r: the inner dimension of each adapter's A (r x in) and B (out x r)
      alpha=32.0,  # the update B A is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora)
      dropout=0.0,  # dropout on an adapted layer's input to A, in training only
      use_rslora=False,  # rank-stabilised LoRA: scale alpha / sqrt(rank), PEFT's use_rslora
      # DoRA (PEFT's use_dora): a trained magnitude per output row of each adapted weight besides A and B;
      # each step recomputes the weights' row norms, and keeps one more activation per adapted layer.
      use_dora=False,
      # all-linear | module names, ours or HF's, comma-separated ("q_proj,v_proj") | a regex matching whole dotted
      # module paths, e.g. "layers.attn.(q|v)"
      targets="all-linear",
    )
  )

  # IA3: a learned scale per adapted module (PEFT's target_modules / feedforward_modules).
  c.peft.ia3 = ml_collections.ConfigDict(
    dict(
      # The scaled modules. "default": PEFT's for the family (Llama k, v, down; Qwen2 and Gemma q, v, down); else
      # module names (ours or HF's, comma-separated) or a regex over whole dotted paths.
      targets="default",
      # Which targets are feed-forward modules, scaled at their input rather than their output; "default": down.
      feedforward="default",
    )
  )
  # Prompt tuning: learned embeddings of num_virtual_tokens tokens before every example.
  c.peft.prompt = ml_collections.ConfigDict(
    dict(
      num_virtual_tokens=20,  # virtual tokens before every example (they count against data.max_seq_len)
      init="random",  # random | text: PEFT's TEXT init, the embeddings of init_text's tokens repeated
      init_text="",  # the text whose token embeddings start the prompt, with init=text
    )
  )
  # Prefix tuning: learned keys and values of num_virtual_tokens tokens in every layer.
  c.peft.prefix = ml_collections.ConfigDict(
    dict(
      num_virtual_tokens=20,  # virtual key/value positions before every example, in every layer
      projection=False,  # learn them through PEFT's reparameterisation MLP (exported as its output)
      projection_hidden=0,  # the MLP's hidden units; 0: the key/value width
    )
  )

  c.optim = optim_config()

  c.mesh = mesh_config()  # preset dp | fsdp | fsdp_tp, axis sizes, logical-axis rules (jaxtune/parallel/mesh.py)

  c.train = ml_collections.ConfigDict(
    dict(
      steps=1000,  # optimizer updates; 0: data.num_epochs epochs of the training data (and the schedule to match)
      grad_accum=1,  # data.batch_size rows per update, split into this many micro-batches
      seed=0,  # model init (random / LoRA), dropout
      eval_every=0,  # evaluate the validation split every N steps (0: only at the end) ...
      eval=True,  # ... and at the end; False: never evaluate
      eval_batches=0,  # validation batches per evaluation; 0: the whole split
      log_every=10,  # steps between logged training metrics
      max_nan_streak=10,  # stop after this many skipped (NaN/inf) steps in a row
      overlap=True,  # read step s's metrics after dispatching step s+1 (saves, evals, stops stay exact)
      # auto | dynamic | none. auto: dynamic when model.dtype is float16, whose small gradients underflow
      # without it (train/loss_scale.py); bfloat16 and float32 never need it.
      loss_scale="auto",
      loss_scale_growth_interval=2000,  # dynamic: double the scale after this many finite steps in a row
      # Early stopping: stop once early_stop_metric (logged at eval steps) has not improved by more than
      # early_stop_min_delta for this many evaluations in a row; 0: never stop early.
      early_stop_patience=0,
      early_stop_metric="eval/loss",  # any eval/ metric, e.g. eval/loss, eval/accuracy or eval/squad_f1
      early_stop_mode="min",  # min | max: whether lower or higher is better
      early_stop_min_delta=0.0,  # the smallest change that counts as an improvement
      # Generation metrics (registry names, comma-separated: "squad_f1,rougeL") scored on task.test_file's
      # examples at every eval step and logged as eval/<name>; empty: none.
      eval_metrics="",
    )
  )

  c.checkpoint = ml_collections.ConfigDict(
    dict(
      every=500,  # save every N steps (and at the end, and on a preemption notice); 0: only those
      keep=3,  # the newest K checkpoints are kept
      keep_best=False,  # also keep the one with the lowest validation loss
      async_save=True,  # write in the background while training continues
    )
  )

  c.logging = ml_collections.ConfigDict(
    dict(
      progress=True,  # a progress bar on stderr (loss, lr, tokens/s, ETA)
      tensorboard=True,  # event files in output_dir/tensorboard
      wandb_project="",  # set to log to Weights & Biases (needs `pip install wandb`)
      wandb_entity="",  # the W&B team or user; empty: your default
      wandb_run_name="",  # the W&B run name; empty: W&B picks one
    )
  )

  # A generation task scored before and after training (the quickstart's exact match).
  c.task = ml_collections.ConfigDict(
    dict(
      test_file="",  # JSONL chat records; the last assistant turn is the reference. Empty: data.test_fraction's split
      scorer="json",  # the primary metric: a name in jaxtune/eval/metrics.py (exact, json, squad_f1, ...) or module:fn
      metrics="",  # more metrics reported with their 95% interval before/after training, e.g. "squad_f1,rougeL"
      num_examples=50,  # the first N records
      max_new_tokens=48,  # the longest generated answer in tokens
      batch_size=50,  # prompts generated together
      show=3,  # generations printed side by side
      before=True,  # also score the model before training
    )
  )
  return configs.locked(c)  # a config file can change settings, not add them (jaxtune/configs)


def _fail(key: str, problem: str, fix: str = "") -> None:
  raise ConfigError(f"{key}: {problem}" + (f"; {fix}" if fix else "") + ".")


def _choice(config: ml_collections.ConfigDict, key: str, allowed: tuple[str, ...]) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  if value not in allowed:
    _fail(key, f"{value!r} is not one of {', '.join(allowed)}")


def _sources(value: Any) -> tuple[str, ...]:
  return (value,) if isinstance(value, str) and value else tuple(v for v in (value or ()) if v)


_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def _local_path(source: str) -> pathlib.Path | None:
  """The local file or directory a data source names, or None for a hub dataset id."""
  path = pathlib.Path(source.split(":")[0] if ":" in source and not source.startswith("/") else source).expanduser()
  local = path.exists() or source.startswith((".", "/", "~")) or path.suffix.lower() in _DATA_SUFFIXES
  return path if local else None


def validate(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
  """Raises ConfigError naming the key when settings are missing, invalid or incompatible; loads no weights."""
  if not config.output_dir:
    _fail("output_dir", "empty", "set the run directory, e.g. --config.output_dir=runs/my_run")
  _choice(config, "resume", RESUME)
  if not config.model.path:
    _fail("model.path", "empty", "set an HF checkpoint directory, a hub id, or one of " + ", ".join(BUILTIN_MODELS))
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "model.param_dtype", DTYPES)
  _choice(config, "model.remat", REMAT)
  _choice(config, "model.attention_impl", ATTENTION)
  _choice(config, "model.kernels", KERNELS)
  _choice(config, "peft.method", METHODS)
  _choice(config, "model.quantize", options_lib.QUANTIZE)
  if config.model.quantize != "none":
    if config.peft.method == "full":
      _fail(
        "model.quantize",
        f"{config.model.quantize} with peft.method=full: a quantised base is frozen",
        "train adapters on it (peft.method=lora), or set model.quantize=none",
      )
    if config.model.quantize_block not in quantize_lib.BLOCKS:
      _fail(
        "model.quantize_block",
        f"{config.model.quantize_block} is not a bitsandbytes block size",
        "choose one of " + ", ".join(map(str, quantize_lib.BLOCKS)),
      )
  if config.model.adapter and config.peft.method != "lora":
    _fail("model.adapter", "an adapter to start from needs peft.method=lora")
  if config.model.adapter and not pathlib.Path(config.model.adapter).expanduser().is_dir():
    _fail("model.adapter", f"{config.model.adapter} is not a directory", "pass a PEFT adapter directory")
  objectives.validate(config)

  lora, train, data = config.peft.lora, config.train, config.data
  if config.peft.method == "lora":
    if lora.rank < 1:
      _fail("peft.lora.rank", f"{lora.rank} must be >= 1")
    if lora.alpha <= 0:
      _fail("peft.lora.alpha", f"{lora.alpha} must be > 0")
    if not 0.0 <= lora.dropout < 1.0:
      _fail("peft.lora.dropout", f"{lora.dropout} must be in [0, 1)")
  elif lora.use_dora:
    _fail("peft.lora.use_dora", f"DoRA adapters need peft.method=lora, not {config.peft.method}", "set use_dora=False")
  _validate_virtual(config)
  if config.peft.method == "full" and config.model.param_dtype in ("bfloat16", "float16"):
    _fail(
      "model.param_dtype",
      f"{config.model.param_dtype} with peft.method=full: updates smaller than the "
      "parameter's precision are lost, so training stalls",
      "use param_dtype=float32 (or auto)",
    )

  if train.steps < 0:
    _fail("train.steps", f"{train.steps} must be >= 1 (or 0: data.num_epochs epochs)")
  if train.steps == 0 and data.num_epochs < 1:
    _fail(
      "train.steps", "0 trains data.num_epochs epochs, but that is 0", "set train.steps >= 1 or data.num_epochs >= 1"
    )
  if train.grad_accum < 1:
    _fail("train.grad_accum", f"{train.grad_accum} must be >= 1")
  if data.batch_size % (train.grad_accum * process_count):
    _fail(
      "data.batch_size",
      f"{data.batch_size} rows do not split into train.grad_accum={train.grad_accum} "
      f"micro-batches on {process_count} process(es)",
      "make data.batch_size a multiple of grad_accum x processes",
    )
  if train.max_nan_streak < 1:
    _fail("train.max_nan_streak", f"{train.max_nan_streak} must be >= 1")
  _choice(config, "train.loss_scale", loss_scale_lib.MODES)
  if train.loss_scale_growth_interval < 1:
    _fail("train.loss_scale_growth_interval", f"{train.loss_scale_growth_interval} must be >= 1")
  if train.eval_every < 0 or train.log_every < 1:
    _fail("train.eval_every / train.log_every", "eval_every must be >= 0 and log_every >= 1")

  templates.resolve(data.chat_template)  # a name that is not one fails here, listing the names
  if not _sources(data.train):
    _fail("data.train", "no training data", "set a JSONL/JSON/Parquet/CSV file, a directory or a dataset id")
  for source in _sources(data.train) + _sources(data.validation):
    path = _local_path(source)
    if path is not None and not path.exists():
      _fail("data.train" if source in _sources(data.train) else "data.validation", f"{source} does not exist")
  has_validation = bool(_sources(data.validation)) or data.validation_fraction > 0
  has_validation = has_validation or config.objective == "grpo"  # GRPO's evaluations: samples and train.eval_metrics
  if train.eval and train.eval_every and not has_validation:
    _fail(
      "train.eval_every",
      f"{train.eval_every} but there is no validation data",
      "set data.validation or data.validation_fraction, or train.eval_every=0",
    )

  if train.eval_metrics:
    if not config.task.test_file:
      _fail("train.eval_metrics", "set, but there is no task.test_file to generate answers for", "set task.test_file")
    try:
      metrics_lib.parse(train.eval_metrics)
    except metrics_lib.MetricError as e:
      _fail("train.eval_metrics", str(e))
  if train.early_stop_patience:
    _choice(config, "train.early_stop_mode", ("min", "max"))
    if train.early_stop_patience < 0 or not (train.eval and has_validation and train.eval_every):
      _fail("train.early_stop_patience", "needs evaluations to watch", "set train.eval_every and validation data")

  ckpt = config.checkpoint
  if ckpt.every < 0 or ckpt.keep < 1:
    _fail("checkpoint.every / checkpoint.keep", f"every={ckpt.every} must be >= 0 and keep={ckpt.keep} >= 1")
  if ckpt.keep_best:
    if not (train.eval and has_validation and train.eval_every):
      _fail("checkpoint.keep_best", "needs a validation loss", "set train.eval_every and validation data")
    if not ckpt.every or ckpt.every % train.eval_every:
      _fail(
        "checkpoint.keep_best",
        f"checkpoint.every={ckpt.every} is not a multiple of "
        f"train.eval_every={train.eval_every}, so saved checkpoints would have no validation loss",
        "make checkpoint.every a multiple of train.eval_every",
      )

  if config.logging.wandb_project and importlib.util.find_spec("wandb") is None:
    _fail("logging.wandb_project", "set, but the wandb package is not installed", "pip install wandb, or unset it")

  task = config.task
  if task.test_file:
    if not pathlib.Path(task.test_file).expanduser().is_file():
      _fail("task.test_file", f"{task.test_file} is not a file")
    for key in ("task.scorer", "task.metrics"):
      try:
        metrics_lib.parse(config.task.scorer if key == "task.scorer" else config.task.metrics or "exact")
      except metrics_lib.MetricError as e:
        _fail(key, str(e))
    if task.num_examples < 1 or task.batch_size < 1 or task.max_new_tokens < 1:
      _fail("task", "num_examples, batch_size and max_new_tokens must be >= 1")

  try:
    lengths = row_lengths(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  odd = [t for t in lengths if t % 2]
  if config.model.attention_impl == "cudnn" and odd:
    _fail(
      "data.max_seq_len / data.bucket_lengths",
      f"rows of {odd} tokens, but cuDNN attention with a mask needs even lengths",
      "make them even, or use model.attention_impl=auto, chunked or xla",
    )
  _check_model_fits(config)
  try:
    make_optimizer(
      config.optim, train.steps or max(int(config.optim.warmup_steps), 1)
    )  # builds no state: checks names, schedule and warmup
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_model_fits(config: ml_collections.ConfigDict) -> None:
  """With a local checkpoint: its config.json must exist and take sequences of data.max_seq_len."""
  if config.model.path in BUILTIN_MODELS:
    return
  path = pathlib.Path(config.model.path).expanduser()
  if not path.exists():
    if str(config.model.path).startswith((".", "/", "~")) or str(config.model.path).count("/") != 1:
      _fail("model.path", f"{config.model.path} is neither a directory nor a hub id 'org/name'")
    return  # a hub id: checked when it is fetched
  if not (path / "config.json").is_file():
    _fail("model.path", f"{path} has no config.json", "point it at a Hugging Face checkpoint directory")
  hf = json.loads((path / "config.json").read_text())
  limit = hf.get("max_position_embeddings")
  if limit and config.data.max_seq_len > limit:
    _fail(
      "data.max_seq_len",
      f"{config.data.max_seq_len} exceeds the model's max_position_embeddings ({limit})",
      f"lower it to {limit} or less",
    )


def row_lengths(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Every row length the training and validation batches can have (packed rows: max_seq_len)."""
  return packing.bucket_lengths(tuple(config.data.bucket_lengths), config.data.max_seq_len)


def auto_attention(config: ml_collections.ConfigDict, platform: str, model_config: ModelConfig) -> tuple[str, str]:
  """(implementation, reason) that model.attention_impl="auto" resolves to; model.dtype must be resolved."""
  return attn_lib.auto_impl(
    platform, config.model.dtype, model_config.head_dim, model_config.attn_softcap, row_lengths(config)
  )


def resolve(
  config: ml_collections.ConfigDict, platform: str, model_config: ModelConfig | None = None
) -> ml_collections.ConfigDict:
  """A copy with every "auto" made concrete for `platform` ("cpu", "gpu", "tpu").

  attention_impl="auto" on GPU depends on the checkpoint (head dim, soft-capping): pass its
  `model_config` there, or it resolves to the portable "chunked".
  """
  config = ml_collections.ConfigDict(config.to_dict())
  model = config.model
  if model.dtype == "auto":
    model.dtype = "float32" if platform == "cpu" else "bfloat16"
  if config.train.loss_scale == "auto":
    config.train.loss_scale = "dynamic" if loss_scale_lib.active("auto", model.dtype) else "none"
  if model.param_dtype == "auto":
    model.param_dtype = model.dtype if config.peft.method != "full" else "float32"
  if model.attention_impl == "auto":
    model.attention_impl = "chunked"
    if model_config is not None:
      model.attention_impl, _ = auto_attention(config, platform, model_config)
  if model.kernels == "auto":
    model.kernels, _ = options_lib.auto_kernels(platform)
  config.lock()
  return config


def model_options(config: ml_collections.ConfigDict, platform: str, constrain: Any = None) -> options_lib.ModelOptions:
  """The ModelOptions of a resolved config (`resolve`) on `platform`."""
  model = config.model
  return options_lib.for_platform(
    platform,
    kernels=model.kernels,
    dtype=model.dtype,
    param_dtype=model.param_dtype,
    attention_impl=model.attention_impl,
    remat=model.remat,
    constrain=constrain,
    quantize=model.quantize,
    quant_block=model.quantize_block,
    double_quant=model.double_quant and model.quantize == "nf4",
  )


def write(config: ml_collections.ConfigDict, run_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes the resolved config as `run_dir/config.json`; returns the path."""
  path = pathlib.Path(run_dir) / "config.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".partial")
  try:  # written whole or not at all: a full disk leaves the previous config.json as it was
    partial.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)
  return path


def virtual_tokens(config: ml_collections.ConfigDict) -> int:
  """The virtual tokens before every example under prompt or prefix tuning, else 0."""
  method = config.peft.method
  return config.peft[method].num_virtual_tokens if method in ("prompt", "prefix") else 0


def _validate_virtual(config: ml_collections.ConfigDict) -> None:
  """Prompt and prefix tuning's refusals (docs/peft.md)."""
  method = config.peft.method
  if method not in ("prompt", "prefix"):
    return
  key = f"peft.{method}.num_virtual_tokens"
  count = config.peft[method].num_virtual_tokens
  if count < 1:
    _fail(key, f"{count} must be >= 1")
  if config.data.max_seq_len <= count:
    _fail(
      "data.max_seq_len",
      f"{config.data.max_seq_len} leaves no room for {key}={count}",
      f"raise data.max_seq_len above {count} or lower {key}",
    )
  if config.objective != "sft":
    _fail(
      "objective",
      f"{config.objective} with peft.method={method}: virtual tokens are supported for sft only",
      "use objective=sft, or peft.method=lora or ia3",
    )
  if method == "prompt":
    init = config.peft.prompt.init
    if init not in ("random", "text"):
      _fail("peft.prompt.init", f"{init!r} is unknown", "choose random or text")
    if init == "text" and not config.peft.prompt.init_text:
      _fail("peft.prompt.init_text", "empty with peft.prompt.init=text", "give the text, or set init=random")
  config.data.virtual_tokens = count
