"""GGUF export for llama.cpp and Ollama: Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3 in f32 ... q4_K_M.

Tensor names, hyper-parameters and the vocabulary are those llama.cpp's own converter
(convert_hf_to_gguf.py) writes for the family: the layout (q/k row order, Gemma's 1 + w norms) is
`jaxtune.hf.gguf`'s, shared with the import; the vocabulary is `gguf_vocab`'s. 1-D tensors stay
float32. f32, f16, bf16, q8_0, q4_0 and q4_1 are written by the `gguf` package tensor by tensor
(the header is planned first, then each tensor is merged, converted and written before the next is
computed); q4_0/q4_1 keep the embedding and output matrices at q8_0, and rows that the 32-wide
blocks do not tile stay f16. The k-quants (q4_k_m, q5_k_m, q6_k) are llama.cpp's own quantiser
(`llama-cpp-python`) run on the f16 file.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pathlib
import warnings

import gguf
import numpy as np

from jaxtune.export import files, gguf_vocab, ollama, staging
from jaxtune.export.files import ExportError, TensorSpec
from jaxtune.export.merged import check_matches_source, hf_tensors
from jaxtune.hf import gguf as layout
from jaxtune.hf import mapping
from jaxtune.models.config import ModelConfig
from jaxtune.models.transformer import CausalLM

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
GGUF_DTYPES = {
  "f32": (Q.F32, F.ALL_F32),
  "f16": (Q.F16, F.MOSTLY_F16),
  "bf16": (Q.BF16, F.MOSTLY_BF16),
  "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
  "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
  "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
}
# Made by llama.cpp's quantiser from the f16 file: kind -> llama_cpp's file-type constant.
K_QUANTS = {
  "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
  "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
  "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
KINDS = tuple(GGUF_DTYPES) + tuple(K_QUANTS)
_ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "q8": "q8_0"}
GGUF_PATTERNS = ("*.gguf", ollama.MODELFILE)
LLAMA_CPP_INSTALL = "pip install llama-cpp-python"
# Matrices that the 4-bit kinds keep at q8_0: llama.cpp's quantiser, too, keeps them above 4 bits.
_EIGHT_BIT = ("token_embd.weight", "output.weight")
# Biases llama.cpp reads for each architecture.
_BIASES = {"qwen2": "qkv"}


def gguf_dtype(name: str) -> str:
  """The GGUF kind (f16, q4_k_m, ...) for a short or long name ("bfloat16" -> "bf16"); checks llama.cpp is there."""
  key = _ALIASES.get(str(name).lower(), str(name).lower())
  if key not in KINDS:
    raise ExportError(f"GGUF dtype {name!r} is not supported; choose one of {', '.join(KINDS)}.")
  if key in K_QUANTS and importlib.util.find_spec("llama_cpp") is None:
    raise ExportError(
      f"GGUF dtype {key} is made by llama.cpp's quantiser, which is not installed: `{LLAMA_CPP_INSTALL}` "
      f"(builds llama.cpp, about 5 minutes), or choose one of {', '.join(GGUF_DTYPES)}."
    )
  return key


def architecture(cfg: ModelConfig) -> str:
  """llama.cpp's architecture for the model; ExportError naming what llama.cpp cannot run as this model does."""
  arch = layout.ARCHITECTURES.get(cfg.model_type)
  if arch is None:
    raise ExportError(f"model_type {cfg.model_type!r} has no llama.cpp architecture; export --format merged instead.")
  problems = []
  biases = _BIASES.get(arch, "")
  if (cfg.qkv_bias and "qkv" not in biases) or cfg.o_bias or cfg.mlp_bias:
    problems.append("attention or MLP biases")
  allowed = ("default", "linear", "llama3") if arch == "llama" else ("default", "linear")
  if cfg.rope_full.rope_type not in allowed:
    problems.append(f"rope_type {cfg.rope_full.rope_type!r}")
  if arch == "gemma3" and cfg.rope_sliding.rope_type != "default":
    problems.append(f"rope_type {cfg.rope_sliding.rope_type!r} on sliding layers")
  if arch in ("gemma", "gemma2") and not cfg.tie_embeddings:
    problems.append("an lm_head of its own (llama.cpp's Gemma and Gemma 2 use the embedding)")
  if arch == "qwen2" and cfg.num_heads * cfg.head_dim != cfg.hidden_size:
    problems.append(f"head_dim {cfg.head_dim} x {cfg.num_heads} heads != hidden_size {cfg.hidden_size}")
  if arch in ("gemma2", "gemma3"):
    want = layout.query_pre_attn_scalar(arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim)
    if not np.isclose(cfg.scale, want**-0.5, rtol=1e-6):
      problems.append(f"query_pre_attn_scalar {cfg.scale**-2:g} (llama.cpp scales queries by {want:g} ** -0.5)")
  if arch == "gemma3" and cfg.attn_softcap:
    problems.append("attention logit soft-capping")
  if arch == "gemma2" and not (cfg.attn_softcap and cfg.final_softcap):
    problems.append("no attention or final logit soft-capping")
  if problems:
    raise ExportError(
      f"{cfg.model_type} model with {'; '.join(problems)}: llama.cpp's {arch!r} architecture cannot run it. "
      "Export --format merged (Hugging Face safetensors) instead."
    )
  return arch


def check_source(cfg: ModelConfig, source_dir: str | os.PathLike) -> None:
  """Raises ExportError unless a model of `cfg` with the tokenizer of `source_dir` can be written as GGUF."""
  architecture(cfg)
  gguf_vocab.read_vocab(pathlib.Path(source_dir), cfg.vocab_size)


def _context_length(cfg: ModelConfig, arch: str) -> int:
  if cfg.sliding_window and arch not in layout.SWA_PATTERN and cfg.sliding_window < cfg.max_position_embeddings:
    warnings.warn(
      f"llama.cpp's {arch!r} architecture has no sliding window: the file's context length is the window "
      f"({cfg.sliding_window} tokens), within which full attention is the same.",
      stacklevel=4,
    )
    return cfg.sliding_window
  return cfg.max_position_embeddings


def _add_hparams(writer: gguf.GGUFWriter, cfg: ModelConfig, arch: str, name: str, file_type: int) -> None:
  writer.add_type("model")
  writer.add_name(name)
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(_context_length(cfg, arch))
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_full.theta)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  if arch == "llama":
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
  if arch != "llama" or cfg.head_dim != cfg.hidden_size // cfg.num_heads:
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
  if cfg.rope_full.rope_type == "linear":
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(cfg.rope_full.get("factor")))
  if arch == "gemma2":
    writer.add_attn_logit_softcapping(cfg.attn_softcap)
  if arch in ("gemma2", "gemma3") and cfg.final_softcap:
    writer.add_final_logit_softcapping(cfg.final_softcap)
  if arch in layout.SWA_PATTERN and cfg.sliding_window:
    writer.add_sliding_window(cfg.sliding_window)
    if list(cfg.sliding_layers) != layout.swa_layers(arch, cfg.num_layers):
      writer.add_sliding_window_pattern(list(cfg.sliding_layers))
  if arch == "gemma3":
    writer.add_rope_freq_base_swa(cfg.rope_sliding.theta)
  writer.add_file_type(int(file_type))
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _plan(spec: TensorSpec, gguf_name: str, qtype: Q) -> tuple[Q, tuple[int, ...], np.dtype, int]:
  """(type, shape as GGUFWriter wants it, numpy dtype, bytes) of one tensor in the file."""
  if len(spec.shape) < 2 or gguf_name == "rope_freqs.weight":
    qtype = Q.F32  # norms and other vectors stay float32, as in llama.cpp's converter
  elif qtype in (Q.Q4_0, Q.Q4_1) and gguf_name in _EIGHT_BIT:
    qtype = Q.Q8_0
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  if spec.shape[-1] % block:
    qtype, block, type_size = Q.F16, 1, 2  # rows that the quantised blocks do not tile
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


def _tensors(model: CausalLM, arch: str) -> list[tuple[TensorSpec, str, mapping.TensorMap | None]]:
  """(HF tensor, llama.cpp name, its row of the weight table) in file order, rope_freqs last."""
  cfg = model.config
  try:
    table = {hf: (name, tmap) for name, (tmap, hf) in layout.gguf_tensor_maps(cfg, arch).items()}
  except layout.GGUFImportError as e:
    raise ExportError(str(e)) from None
  out = [(s, *table[s.name]) for s in hf_tensors(model, np.float32)]
  if cfg.rope_full.rope_type == "llama3":
    factors = layout.rope_freq_factors(cfg.rope_full, cfg.head_dim)
    out.append((TensorSpec("rope_freqs", factors.shape, np.float32, lambda: factors), "rope_freqs.weight", None))
  return out


def _write(model: CausalLM, source: pathlib.Path, partial: pathlib.Path, dtype: str, name: str, template: str | None):
  cfg = model.config
  arch = architecture(cfg)
  vocab = gguf_vocab.read_vocab(source, cfg.vocab_size)
  qtype, file_type = GGUF_DTYPES[dtype]
  specs = _tensors(model, arch)
  writer = gguf.GGUFWriter(partial, arch)
  try:
    _add_hparams(writer, cfg, arch, name, file_type)
    gguf_vocab.add_vocab(writer, source, vocab, template)
    plans = []
    for spec, gguf_name, _ in specs:
      plan = _plan(spec, gguf_name, qtype)
      writer.add_tensor_info(gguf_name, plan[1], plan[2], plan[3], raw_dtype=plan[0] if plan[2] == np.uint8 else None)
      plans.append(plan)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (spec, _, tmap), (tensor_type, _, _, _) in zip(specs, plans):
      value = spec.produce().astype(np.float32)
      if tmap is not None:
        value = layout.to_gguf(tmap, cfg, arch, value)
      writer.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(value), tensor_type))
    writer.close()
    files.check_complete(partial)
  except BaseException:
    writer.close()
    raise


def quantize(src: pathlib.Path, dst: pathlib.Path, kind: str) -> None:
  """llama.cpp's quantiser (llama-cpp-python): the f16 GGUF `src` as `kind` (q4_k_m, q5_k_m, q6_k) at `dst`."""
  try:
    import llama_cpp
  except ImportError:
    raise ExportError(f"GGUF dtype {kind} needs llama.cpp's quantiser: `{LLAMA_CPP_INSTALL}`.") from None
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = getattr(llama_cpp, K_QUANTS[kind])
  rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
  if rc != 0:
    raise ExportError(f"{src}: llama.cpp's quantiser failed (code {rc}) making {kind}; its log above says why.")


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
  dtype: one of KINDS (f16, bf16, q8_0, q4_0, q4_1, f32; q4_k_m, q5_k_m, q6_k with llama-cpp-python).
  """
  dtype = gguf_dtype(dtype)
  architecture(model.config)
  source = pathlib.Path(source_dir).expanduser()
  check_matches_source(model.config, files.read_json(source / "config.json"), source / "config.json")
  out = _check_out_path(out_path, overwrite)
  partial = out.with_name(out.name + ".partial")
  f16 = out.with_name(out.name + ".f16.partial")
  try:
    if dtype in K_QUANTS:
      _write(model, source, f16, "f16", name or source.name, chat_template)
      quantize(f16, partial, dtype)
      files.check_complete(partial)
    else:
      _write(model, source, partial, dtype, name or source.name, chat_template)
  except BaseException:
    partial.unlink(missing_ok=True)  # no half-written file left behind
    raise
  finally:
    f16.unlink(missing_ok=True)
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
  """`export_gguf` into OUT_DIR/model-<dtype>.gguf with an Ollama Modelfile beside it (export/ollama.py).

  The directory is written whole or not at all (export/staging.py). Returns the .gguf file's path.
  """
  dtype = gguf_dtype(dtype)
  file = f"model-{dtype}.gguf"
  with staging.staged(out_dir, overwrite=overwrite, patterns=GGUF_PATTERNS) as stage:
    path = export_gguf(model, source_dir, stage.path / file, dtype=dtype, name=name, chat_template=chat_template)
    (stage.path / ollama.MODELFILE).write_text(ollama.modelfile(path))
  return pathlib.Path(out_dir).expanduser().absolute() / file
