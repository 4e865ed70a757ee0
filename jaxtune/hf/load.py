"""Hugging Face checkpoint -> jaxtune NNX model, read whole or as the slices each device holds.

The model is first built abstractly (`nnx.eval_shape`: shapes, no memory). Each parameter is then
made by `jax.make_array_from_callback`: every device's block of our layout becomes the matching
slice of the HF tensor (`mapping.TensorMap.hf_block`), read through the safetensors memory map,
converted to the target dtype and placed before the next one is read. Stacked layer parameters
whose layer axis is not split are built one layer at a time, so the host stages at most one
layer's share of one tensor, never the model. A whole load is the same on one device.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxtune.errors import ConfigError
from jaxtune.hf import mapping
from jaxtune.hf.mapping import Block, TensorMap
from jaxtune.hf.safetensors_io import Checkpoint, CheckpointError
from jaxtune.models import einsum as einsum_lib
from jaxtune.models import options as options_lib
from jaxtune.models import quantize as quantize_lib
from jaxtune.models.config import ModelConfig, load_config
from jaxtune.models.options import ModelOptions
from jaxtune.models.transformer import CausalLM, Linear

# What a model download needs: configs, safetensors, tokenizer and template files; never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]

# Where a parameter goes, given its abstract variable (shape, dtype, logical axes).
ShardingOf = Callable[[nnx.Variable], Sharding]


def resolve(path_or_hub_id: str | pathlib.Path) -> pathlib.Path:
  """A local directory, or a hub id resolved through huggingface_hub's cache (offline when cached)."""
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.exists() or str(path_or_hub_id).startswith((".", "/", "~")) or str(path_or_hub_id).count("/") != 1:
    raise CheckpointError(f"{path_or_hub_id}: not a directory, and not a hub id of the form 'org/name'.")
  import huggingface_hub

  repo = str(path_or_hub_id)
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True))
  except Exception:  # not cached: fall through to a download
    pass
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo, allow_patterns=HUB_PATTERNS))
  except Exception as e:
    raise CheckpointError(
      f"{repo}: not in the local Hugging Face cache and could not be downloaded ({e}). "
      "Download it where there is network, or pass a local directory."
    ) from None


def _norm(index: Block, shape: tuple[int, ...]) -> Block:
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


class TensorReader:
  """Reads blocks of one parameter's HF tensors in our layout; counts what it stages on the host."""

  def __init__(self, ckpt: Checkpoint, tmap: TensorMap, dtype: np.dtype, stats: dict):
    self.ckpt, self.tmap, self.dtype, self.stats = ckpt, tmap, dtype, stats

  def check(self, name: str) -> None:
    """CheckpointError unless tensor `name` is in the checkpoint with the shape the config implies."""
    if name not in self.ckpt:
      raise CheckpointError(
        f"{self.ckpt.directory}: tensor {name!r} is missing (needed for "
        f"{'.'.join(self.tmap.path)}); the checkpoint does not match its config.json."
      )
    got, expected = tuple(self.ckpt.file_of(name).shape(name)), self.tmap.hf_shape
    if got != expected:
      raise CheckpointError(
        f"{self.ckpt.file_of(name).path}: tensor {name!r} has shape {got}, but config.json "
        f"implies {expected}; the checkpoint does not match its config.json."
      )

  def block(self, name: str, index: Block) -> np.ndarray:
    """Block `index` of our layout of tensor `name`, read as the HF slice that holds it."""
    hf_index, to_ours = self.tmap.hf_block(_norm(index, self.tmap.shape))
    out = np.ascontiguousarray(to_ours(self.ckpt.file_of(name).get_slice(name, hf_index)), dtype=self.dtype)
    self.stats["read_bytes"] = self.stats.get("read_bytes", 0) + out.nbytes
    return out

  def array(self, name: str, sharding: Sharding) -> jax.Array:
    """Tensor `name` as one global array placed by `sharding`, each process reading its own blocks."""
    shape = self.tmap.shape
    staged: dict[tuple, np.ndarray] = {}  # replicas of one block (data / tensor axes) are read once

    def callback(index):
      key = tuple((s.start, s.stop) for s in _norm(index, shape))
      if key not in staged:
        staged[key] = self.block(name, index)
      return staged[key]

    out = jax.make_array_from_callback(shape, sharding, callback)
    held = sum(x.nbytes for x in staged.values())  # every block of this call is alive until the transfer
    self.stats["peak_staged_bytes"] = max(self.stats.get("peak_staged_bytes", 0), held)
    return out

  def stacked(self, names: list[str], shape: tuple[int, ...], sharding: Sharding) -> jax.Array:
    """The [layers, ...] stack of tensors `names`, placed by `sharding`."""
    layer_sharding = _layer_sharding(sharding, shape)
    if layer_sharding is not None:  # layers whole on every device: build the stack one layer at a time
      value, set_layer = _zeros(shape, self.dtype, sharding), _setter(sharding)
      for i, name in enumerate(names):
        value = set_layer(value, self.array(name, layer_sharding), i)
      return value

    def callback(index):  # the layer axis itself is split: each device reads its own layers
      index = _norm(index, shape)
      return np.stack([self.block(names[i], index[1:]) for i in range(*index[0].indices(len(names)))])

    return jax.make_array_from_callback(shape, sharding, callback)


def _layer_sharding(sharding: Sharding, shape: tuple[int, ...]) -> Sharding | None:
  """The sharding of one layer of a stack placed by `sharding`; None when the layer axis is split."""
  if sharding.shard_shape(shape)[0] != shape[0]:
    return None
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  raise TypeError(f"stacked parameters need a NamedSharding or SingleDeviceSharding, got {sharding!r}.")


@functools.lru_cache(maxsize=None)
def _setter(sharding: Sharding) -> Callable:
  @functools.partial(jax.jit, donate_argnums=0, out_shardings=sharding)
  def set_layer(stack, layer, i):
    return stack.at[i].set(layer)

  return set_layer


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: Sharding) -> jax.Array:
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _check_no_unexpected(ckpt: Checkpoint, cfg: ModelConfig, used: set[str]) -> None:
  unexpected = [
    n
    for n in ckpt.keys()
    if n not in used and not n.endswith(mapping.IGNORED_SUFFIXES) and not (cfg.tie_embeddings and n == "lm_head.weight")
  ]
  if unexpected:
    shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
    raise CheckpointError(
      f"{ckpt.directory}: unexpected tensors {shown}; the checkpoint holds weights that "
      f"{cfg.model_type} models do not have (a different architecture or an adapter?)."
    )


def _place(host: np.ndarray, sharding: Sharding) -> jax.Array:
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _load_quantized(
  reader: TensorReader,
  names: list[str],
  kernel: quantize_lib.QuantizedKernel,
  fields: dict[str, nnx.Variable],
  sharding_of: ShardingOf,
) -> dict[str, jax.Array]:
  """A quantised kernel's arrays, one layer's HF tensor read, quantised on the host CPU and placed at a time."""
  shardings = {f: sharding_of(var) for f, var in fields.items()}
  problem = quantize_lib.shard_problem(kernel, shardings["codes"])
  if problem:
    raise ConfigError(f"{names[0]}: {problem}.")
  cpu = jax.local_devices(backend="cpu")[0]
  settings = dict(kind=kernel.kind, n_ins=kernel.n_ins, block=kernel.block, double=kernel.double)

  def layer(name: str) -> dict[str, np.ndarray]:
    w = reader.block(name, tuple(slice(0, n) for n in reader.tmap.shape))
    reader.stats["peak_staged_bytes"] = max(reader.stats.get("peak_staged_bytes", 0), w.nbytes)
    arrays = quantize_lib.quantize(jax.device_put(w, cpu), n_stack=0, **settings)
    return {f: np.asarray(a) for f, a in arrays.items()}

  if kernel.n_stack == 0:
    return {f: _place(a, shardings[f]) for f, a in layer(names[0]).items()}
  layer_shardings = {f: _layer_sharding(sh, tuple(fields[f].shape)) for f, sh in shardings.items()}
  if any(sh is None for sh in layer_shardings.values()):  # the layer axis is split: stack on the host first
    layers = [layer(name) for name in names]
    return {f: _place(np.stack([a[f] for a in layers]), sh) for f, sh in shardings.items()}
  values = {f: _zeros(tuple(var.shape), var.dtype, shardings[f]) for f, var in fields.items()}
  for i, name in enumerate(names):
    for f, a in layer(name).items():
      values[f] = _setter(shardings[f])(values[f], _place(a, layer_shardings[f]), i)
  return values


def load_params(
  ckpt: Checkpoint,
  cfg: ModelConfig,
  abstract_state: nnx.State,
  sharding_of: ShardingOf | None = None,
  stats: dict | None = None,
  quantized: dict[tuple[str, ...], quantize_lib.QuantizedKernel] | None = None,
) -> nnx.State:
  """Fills an abstract (eval_shape) state from the checkpoint, each parameter placed by `sharding_of`.

  Without `sharding_of` every parameter goes whole to the default device. Any tensor missing or
  left over (besides `mapping.IGNORED_SUFFIXES`) is a CheckpointError naming it. `stats`, when
  given, receives read_bytes and peak_staged_bytes (host bytes of one transfer, the most at once).
  quantized: {kernel path: the abstract model's QuantizedKernel} for kernels stored quantised; their
  HF tensors are quantised as they are read, one layer at a time.
  """
  stats = {} if stats is None else stats
  quantized = quantized or {}
  if sharding_of is None:
    device = SingleDeviceSharding(jax.devices()[0])
    sharding_of = lambda var: device
  by_path = {m.path: m for m in mapping.tensor_maps(cfg)}
  used: set[str] = set()
  flat = []
  quantized_fields: dict[tuple[str, ...], dict[str, nnx.Variable]] = {}
  for path, var in nnx.to_flat_state(abstract_state):
    path = tuple(str(p) for p in path)
    if path[:-1] in quantized:
      quantized_fields.setdefault(path[:-1], {})[path[-1]] = var
      continue
    tmap = by_path.get(path)
    if tmap is None:
      raise CheckpointError(f"no Hugging Face tensor is known for parameter {'.'.join(path)}.")
    shape = tuple(var.shape)
    if shape != ((cfg.num_layers,) if tmap.stacked else ()) + tmap.shape:
      raise CheckpointError(
        f"parameter {'.'.join(path)} has shape {shape}, but the weight table says "
        f"{tmap.shape}{' per layer' if tmap.stacked else ''}; the model and hf/mapping.py "
        "disagree."
      )
    reader = TensorReader(ckpt, tmap, np.dtype(var.dtype), stats)
    names = tmap.hf_names(cfg.num_layers)
    for name in names:
      reader.check(name)
    used.update(names)
    sharding = sharding_of(var)
    value = reader.stacked(names, shape, sharding) if tmap.stacked else reader.array(names[0], sharding)
    flat.append((path, var.replace(value)))
  for path, fields in quantized_fields.items():
    tmap = by_path[path]
    reader = TensorReader(ckpt, tmap, np.dtype(np.float32), stats)
    names = tmap.hf_names(cfg.num_layers)
    for name in names:
      reader.check(name)
    used.update(names)
    values = _load_quantized(reader, names, quantized[path], fields, sharding_of)
    flat.extend((path + (f,), var.replace(values[f])) for f, var in fields.items())
  _check_no_unexpected(ckpt, cfg, used)
  return nnx.from_flat_state(flat)


def load_model(
  path_or_hub_id: str | pathlib.Path,
  dtype: Any = None,
  *,
  attention_impl: str = "xla",
  remat: str = "none",
  param_dtype: Any = None,
  kernels: str = "auto",
  quantize: str = "none",
  quant_block: int = 64,
  double_quant: bool = False,
) -> CausalLM:
  """Loads an HF checkpoint as a jaxtune CausalLM (parameters and compute in `dtype`, default float32).

  kernels: "plain", "cpu", or "auto" (cpu on the CPU backend, plain elsewhere; models/kernels.py).
  quantize: none | nf4 | int8, the decoder layers' kernels stored quantised (models/quantize.py).
  """
  dtype = np.dtype(dtype or "float32").name
  options = options_lib.for_platform(
    jax.default_backend(),
    kernels=kernels,
    dtype=dtype,
    param_dtype=np.dtype(param_dtype or dtype).name,
    attention_impl=attention_impl,
    remat=remat,
    quantize=quantize,
    quant_block=quant_block,
    double_quant=double_quant,
  )
  return load(path_or_hub_id, options)


def load(
  path_or_hub_id: str | pathlib.Path,
  options: ModelOptions | None = None,
  *,
  sharding_of: ShardingOf | None = None,
  stats: dict | None = None,
) -> CausalLM:
  """An HF checkpoint as a CausalLM run with `options`, each parameter placed by `sharding_of`.

  sharding_of: where each parameter goes (default: whole, on the default device); every process
  calls this and reads only the slices its own devices hold. stats: see `load_params`.
  """
  directory = resolve(path_or_hub_id)
  cfg = load_config(directory)
  ckpt = Checkpoint(directory)
  if options is not None and options.quantize == "nf4":
    _check_blocks(cfg, options)
  abstract = nnx.eval_shape(lambda: CausalLM(cfg, options, rngs=nnx.Rngs(0)))
  quantized = {
    tuple(str(p) for p in path): m
    for path, m in nnx.iter_modules(abstract)
    if isinstance(m, quantize_lib.QuantizedKernel)
  }
  graphdef, abstract_state = nnx.split(abstract)
  return nnx.merge(graphdef, load_params(ckpt, cfg, abstract_state, sharding_of, stats, quantized))


def _check_blocks(cfg: ModelConfig, options: ModelOptions) -> None:
  """ConfigError naming the HF tensor when `options.quant_block` does not fit a weight the options quantise."""
  plain = nnx.eval_shape(lambda: CausalLM(cfg, options.replace(quantize="none"), rngs=nnx.Rngs(0)))
  hf_names = {m.path: m.hf_names(cfg.num_layers)[0] for m in mapping.tensor_maps(cfg)}
  kernels = {}
  for path, linear in nnx.iter_modules(plain):
    if isinstance(linear, Linear) and linear.quantizable:
      n_ins = len(einsum_lib.parse(linear.einsum).ins)
      n_stack = len(linear.kernel_shape) - len(einsum_lib.parse(linear.einsum).w)
      shape, axes = linear.kernel_shape[n_stack:], linear.kernel_axes[n_stack:]
      kernels[hf_names[tuple(str(p) for p in path) + ("kernel",)]] = (shape, n_ins, axes[n_ins - 1])
  quantize_lib.check_blocks(kernels, options.quant_block)


def init_model(cfg: ModelConfig, seed: int = 0, options: ModelOptions | None = None) -> CausalLM:
  """A randomly initialised model (tests and benchmarks)."""
  return CausalLM(cfg, options, rngs=nnx.Rngs(seed))


def load_tokenizer(path_or_hub_id: str | pathlib.Path):
  """The checkpoint's transformers tokenizer (never with remote code).

  The class its tokenizer_config.json names is built directly when transformers has it: going
  through AutoTokenizer imports transformers' configuration module, which imports torch wherever
  torch is installed (seconds at every start, and the runtime never needs it).
  """
  import transformers

  directory = resolve(path_or_hub_id)
  config_file = directory / "tokenizer_config.json"
  name = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
  if isinstance(name, str) and name.isidentifier():
    # As AutoTokenizer chooses: the fast (Rust) class where one exists, e.g. LlamaTokenizerFast for LlamaTokenizer.
    for candidate in (name if name.endswith("Fast") else f"{name}Fast", name):
      cls = getattr(transformers, candidate, None)
      if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase):
        return cls.from_pretrained(str(directory))
  return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
