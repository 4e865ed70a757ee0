"""GGUF export for llama.cpp and Ollama: Llama-architecture models in f32, f16, bf16 or q8_0.

Tensors get llama.cpp's names (`gguf.get_tensor_name_map`), q/k rows are permuted into
llama.cpp's rotary order (`jaxtune.hf.gguf.permute_qk`, the inverse of the import), 1-D
tensors stay float32 and q8_0 falls back to f16 for rows not a multiple of 32, as
llama.cpp's own converter does. The tokenizer (byte-level BPE), special ids and chat
template come from the source checkpoint's tokenizer files. Written with `gguf.GGUFWriter`
tensor by tensor: the header is planned first, then each tensor is merged, converted and
written before the next one is computed.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import gguf
import numpy as np

from jaxtune.export import files, staging
from jaxtune.export.files import ExportError, TensorSpec
from jaxtune.export.merged import check_matches_source, hf_tensors
from jaxtune.hf.gguf import permute_qk
from jaxtune.models import rope as rope_lib
from jaxtune.models.config import ModelConfig, RopeSpec
from jaxtune.models.transformer import CausalLM

Q = gguf.GGMLQuantizationType
GGUF_DTYPES = {
  "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
  "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
  "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
  "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
_ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "q8": "q8_0"}
GGUF_PATTERNS = ("*.gguf",)
# llama.cpp pre-tokenizer names, recognised from tokenizer.json's pre_tokenizer.
_LLAMA3_REGEX = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
  r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = (
  gguf.TokenType.NORMAL,
  gguf.TokenType.CONTROL,
  gguf.TokenType.USER_DEFINED,
  gguf.TokenType.UNUSED,
)


def gguf_dtype(name: str) -> str:
  """The GGUF dtype name (f16, bf16, q8_0, f32) for a short or long name ("bfloat16" -> "bf16")."""
  key = _ALIASES.get(str(name).lower(), str(name).lower())
  if key not in GGUF_DTYPES:
    raise ExportError(f"GGUF dtype {name!r} is not supported; choose one of {', '.join(GGUF_DTYPES)}.")
  return key


def _check_architecture(cfg: ModelConfig) -> None:
  problems = []
  if cfg.model_type != "llama":
    problems.append(f"model_type {cfg.model_type!r} (only 'llama' is exported to GGUF)")
  if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
    problems.append("attention or MLP biases")
  if cfg.rope_full.rope_type not in ("default", "linear", "llama3"):
    problems.append(f"rope_type {cfg.rope_full.rope_type!r}")
  if problems:
    raise ExportError(
      f"GGUF export supports Llama-architecture models; this one has {', '.join(problems)}. "
      "Export --format merged (Hugging Face safetensors) instead; llama.cpp's "
      "convert_hf_to_gguf.py converts that for other architectures."
    )


def _pre_tokenizer(tokenizer: dict, where: pathlib.Path) -> str:
  """llama.cpp's `tokenizer.ggml.pre` for the pre-tokenizer in tokenizer.json."""
  pre = tokenizer.get("pre_tokenizer") or {}
  steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
  kinds = [s.get("type") for s in steps]
  if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
    return "smollm"
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
    return "gpt2"
  if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_REGEX:
    return "llama-bpe"
  raise ExportError(
    f"{where}: pre-tokenizer {kinds} has no known llama.cpp equivalent; supported: SmolLM/StarCoder "
    "(Digits + ByteLevel), GPT-2 (ByteLevel), Llama 3 (Split + ByteLevel)."
  )


def _looks_special(token: str) -> bool:
  return (token.startswith("<|") and token.endswith("|>")) or (
    token.startswith("<") and token.endswith(">") and " " not in token and len(token) > 2
  )


def _tokenizer_tables(source: pathlib.Path, n_vocab: int) -> tuple[list[str], list[int], str]:
  """(tokens, token types, pre-tokenizer name) of the source's byte-level BPE tokenizer.json, by id."""
  where = source / "tokenizer.json"
  if not where.is_file():
    raise ExportError(
      f"{where}: not found; GGUF files carry the tokenizer, so the source checkpoint needs a "
      "tokenizer.json (a Hugging Face fast tokenizer)."
    )
  tok = files.read_json(where)
  model = tok.get("model", {})
  if model.get("type") != "BPE" or model.get("byte_fallback") or (tok.get("decoder") or {}).get("type") != "ByteLevel":
    raise ExportError(
      f"{where}: a {model.get('type')} tokenizer (byte_fallback={model.get('byte_fallback')}); "
      "GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3)."
    )
  pre = _pre_tokenizer(tok, where)
  tokens: list[str | None] = [None] * n_vocab
  types = [_NORMAL] * n_vocab
  for text, i in list(model["vocab"].items()) + [(t["content"], t["id"]) for t in tok.get("added_tokens", [])]:
    if i >= n_vocab:
      raise ExportError(f"{where}: token {text!r} has id {i}, beyond the model's vocab_size {n_vocab}.")
    tokens[i] = text
  for t in tok.get("added_tokens", []):
    types[t["id"]] = _CONTROL if t.get("special") or _looks_special(t["content"]) else _USER_DEFINED
  for i, text in enumerate(tokens):
    if text is None:  # rows of the embedding the tokenizer never produces
      tokens[i], types[i] = f"[PAD{i}]", _UNUSED
  return tokens, [int(t) for t in types], pre


def check_source(cfg: ModelConfig, source_dir: str | os.PathLike) -> None:
  """Raises ExportError unless a model of `cfg` with the tokenizer of `source_dir` can be written as GGUF."""
  _check_architecture(cfg)
  _tokenizer_tables(pathlib.Path(source_dir), cfg.vocab_size)


def _add_tokenizer(writer: gguf.GGUFWriter, source: pathlib.Path, n_vocab: int, chat_template: str | None) -> None:
  """Tokens, token types, merges, special ids, add-bos flag and chat template (llama.cpp's keys).

  chat_template: the one the run trained with, in place of the source's (None: the source's).
  """
  tokens, types, pre = _tokenizer_tables(source, n_vocab)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  special = gguf.SpecialVocab(source, load_merges=True, n_vocab=n_vocab)
  special.add_special_token.setdefault("bos", False)  # llama.cpp would otherwise assume a BOS is wanted
  if chat_template:
    special.chat_template = chat_template
  if special.chat_template is None:
    warnings.warn(f"{source} has no chat template; the GGUF file will have none.", stacklevel=3)
  special.add_to_gguf(writer, quiet=True)
  writer.add_add_space_prefix(False)


def _add_hparams(writer: gguf.GGUFWriter, model: CausalLM, name: str, file_type: int) -> None:
  cfg = model.config
  writer.add_type("model")
  writer.add_name(name)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_block_count(cfg.num_layers)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_full.theta)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_rope_dimension_count(cfg.head_dim)
  if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
  if cfg.rope_full.rope_type == "linear":
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(cfg.rope_full.get("factor")))
  writer.add_file_type(int(file_type))
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_freq_factors(spec: RopeSpec, head_dim: int) -> np.ndarray:
  """llama.cpp's `rope_freqs.weight` for Llama 3 rope scaling: each frequency's divisor ([head_dim // 2])."""
  plain, _ = rope_lib.inverse_frequencies(RopeSpec(theta=spec.theta), head_dim)
  scaled, _ = rope_lib.inverse_frequencies(spec, head_dim)
  return (plain / scaled).astype(np.float32)


def _plan(spec: TensorSpec, gguf_name: str, qtype: Q) -> tuple[Q, tuple[int, ...], np.dtype, int]:
  """(type, shape as GGUFWriter wants it, numpy dtype, bytes) of one tensor in the file."""
  if len(spec.shape) < 2 or gguf_name == "rope_freqs.weight":
    qtype = Q.F32  # norms and other vectors stay float32, as in llama.cpp's converter
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  if spec.shape[-1] % block:
    qtype, block, type_size = Q.F16, 1, 2  # rows that q8_0 blocks do not tile
  if qtype in (Q.F32, Q.F16):
    dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
    return qtype, spec.shape, dtype, int(np.prod(spec.shape)) * dtype.itemsize
  byte_shape = (*spec.shape[:-1], spec.shape[-1] // block * type_size)
  return qtype, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _check_out_path(out_path: str | os.PathLike, overwrite: bool) -> pathlib.Path:
  out = pathlib.Path(out_path).expanduser().absolute()
  if out.is_dir():
    raise ExportError(f"{out}: is a directory; pass the path of the .gguf file to write.")
  if out.exists() and not overwrite:
    raise ExportError(
      f"{out}: already exists; pass --overwrite (overwrite=True) to replace it, or choose another path."
    )
  files.ensure_writable_dir(out.parent)
  return out


def export_gguf(
  model: CausalLM,
  source_dir: str | os.PathLike,
  out_path: str | os.PathLike,
  *,
  dtype: str = "f16",
  overwrite: bool = False,
  name: str | None = None,
  chat_template: str | None = None,
) -> pathlib.Path:
  """Writes `model` (LoRA merged) as one GGUF file for llama.cpp; returns its path.

  source_dir: the HF checkpoint the model was loaded from (tokenizer and chat template).
  chat_template: written instead of the source's (a run's `data.chat_template`).
  dtype: "f16", "bf16", "q8_0" or "f32".
  """
  dtype = gguf_dtype(dtype)
  _check_architecture(model.config)
  source = pathlib.Path(source_dir).expanduser()
  check_matches_source(model.config, files.read_json(source / "config.json"), source / "config.json")
  out = _check_out_path(out_path, overwrite)
  cfg = model.config
  qtype, file_type = GGUF_DTYPES[dtype]

  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
  specs = [(s, names.get_name(s.name, try_suffixes=(".weight", ".bias"))) for s in hf_tensors(model, np.float32)]
  unnamed = [s.name for s, n in specs if n is None]
  if unnamed:
    raise ExportError(f"tensors {unnamed[:3]} have no llama.cpp name; this model cannot be exported to GGUF.")
  if cfg.rope_full.rope_type == "llama3":
    factors = rope_freq_factors(cfg.rope_full, cfg.head_dim)
    specs.append((TensorSpec("rope_freqs", factors.shape, np.float32, lambda: factors), "rope_freqs.weight"))
  partial = out.with_name(out.name + ".partial")
  writer = gguf.GGUFWriter(partial, "llama")
  try:
    _add_hparams(writer, model, name or source.name, file_type)
    _add_tokenizer(writer, source, cfg.vocab_size, chat_template)
    plans = []
    for spec, gguf_name in specs:
      plan = _plan(spec, gguf_name, qtype)
      writer.add_tensor_info(gguf_name, plan[1], plan[2], plan[3], raw_dtype=plan[0] if plan[2] == np.uint8 else None)
      plans.append(plan)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (spec, gguf_name), (tensor_type, _, _, _) in zip(specs, plans):
      value = spec.produce().astype(np.float32)
      if gguf_name.endswith("attn_q.weight"):
        value = permute_qk(value, cfg.num_heads)
      elif gguf_name.endswith("attn_k.weight"):
        value = permute_qk(value, cfg.num_kv_heads)
      writer.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(value), tensor_type))
    writer.close()
    files.check_complete(partial)
  except BaseException:
    writer.close()
    partial.unlink(missing_ok=True)  # no half-written file left behind
    raise
  os.replace(partial, out)  # an earlier file of that name is replaced only by a complete one
  return out


def export_gguf_dir(
  model: CausalLM,
  source_dir: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  dtype: str = "f16",
  overwrite: bool = False,
  name: str | None = None,
  chat_template: str | None = None,
) -> pathlib.Path:
  """`export_gguf` into OUT_DIR/model-<dtype>.gguf, the directory written whole or not at all (export/staging.py).

  Returns the .gguf file's path.
  """
  dtype = gguf_dtype(dtype)
  with staging.staged(out_dir, overwrite=overwrite, patterns=GGUF_PATTERNS) as stage:
    export_gguf(
      model, source_dir, stage.path / f"model-{dtype}.gguf", dtype=dtype, name=name, chat_template=chat_template
    )
  return pathlib.Path(out_dir).expanduser().absolute() / f"model-{dtype}.gguf"
