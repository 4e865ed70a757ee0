"""What every export format shares: dtypes, the source checkpoint's files, safetensors writing.

No torch here: safetensors files are written from numpy, one tensor at a time, so a
shard never has to exist in memory as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from jaxtune.errors import UserError
from jaxtune.hf.safetensors_io import DTYPES as _SAFETENSORS_DTYPES
from jaxtune.hf.safetensors_io import Checkpoint

# dtype names the CLI and the Python API accept for safetensors output.
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_ALIASES = {
  "f32": "float32",
  "fp32": "float32",
  "bf16": "bfloat16",
  "f16": "float16",
  "fp16": "float16",
  "half": "float16",
}
_DTYPE_CODES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
# Files of a source checkpoint that describe the tokenizer and chat template (copied as they are).
TOKENIZER_PATTERNS = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "vocab.json",
  "vocab.txt",
  "merges.txt",
  "tokenizer.model",
  "*.tiktoken",
  "chat_template.jinja",
  "chat_template.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default "5GB"
# Files whose presence means a directory already holds an exported model or adapter.
MODEL_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "adapter_config.json", "config.json", "*.gguf")


class ExportError(UserError, ValueError):
  """An export that cannot be done as asked; the message says where and what to do."""


def dtype_of(name: str | np.dtype) -> np.dtype:
  """A float dtype from its name ("bfloat16", "bf16", np.float16, ...)."""
  key = str(np.dtype(name).name if not isinstance(name, str) else name).lower()
  key = _ALIASES.get(key, key)
  if key not in DTYPES:
    raise ExportError(f"dtype {name!r} is not supported for safetensors export; choose one of {', '.join(DTYPES)}.")
  return DTYPES[key]


def source_dtype(source_dir: pathlib.Path) -> np.dtype:
  """The dtype a checkpoint directory stores its weights in (its first tensor's; else config.json's)."""
  ckpt = Checkpoint(source_dir)
  name = ckpt.keys()[0]
  found = ckpt.file_of(name).dtype(name)
  if found in DTYPES.values():
    return found
  hf = read_json(source_dir / "config.json")  # e.g. float8 weights: the dtype the model was trained in
  for key in ("dtype", "torch_dtype"):
    if isinstance(hf.get(key), str) and _ALIASES.get(hf[key], hf[key]) in DTYPES:
      return dtype_of(hf[key])
  return DTYPES["float32"]


def check_not_source(out: str | os.PathLike, source_dir: str | os.PathLike) -> None:
  """Refuses to write into the checkpoint being read (an overwrite would delete it first)."""
  if pathlib.Path(out).expanduser().resolve() == pathlib.Path(source_dir).expanduser().resolve():
    raise ExportError(f"{out}: is the source checkpoint directory itself; choose another --out.")


def read_json(path: pathlib.Path) -> dict:
  """A JSON file as a dict, with errors that name the file."""
  if not path.is_file():
    raise ExportError(f"{path}: not found; the source checkpoint directory must hold it.")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ExportError(f"{path}:{e.lineno}: invalid JSON ({e.msg}).") from None


def write_json(path: pathlib.Path, value: dict) -> None:
  path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def ensure_writable_dir(directory: str | os.PathLike) -> pathlib.Path:
  """Creates `directory` if needed and checks that files can be created in it."""
  out = pathlib.Path(directory).expanduser().absolute()
  try:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
      pass
  except OSError as e:
    raise ExportError(f"{out}: cannot write there ({e.strerror or e}); choose a writable --out directory.") from None
  return out


def write_chat_template(out: pathlib.Path, template: str) -> None:
  """Makes `template` the exported tokenizer's chat template (the run's `data.chat_template`).

  Both places transformers reads: chat_template.jinja, which it prefers, and tokenizer_config.json.
  """
  config = out / "tokenizer_config.json"
  if config.is_file():
    data = json.loads(config.read_text())
    data["chat_template"] = template
    config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
  (out / "chat_template.jinja").write_text(template)


def copy_tokenizer_files(source_dir: pathlib.Path, out: pathlib.Path) -> list[str]:
  """Copies the tokenizer and chat-template files of the source checkpoint; returns their names."""
  copied = []
  for pattern in TOKENIZER_PATTERNS:
    for src in sorted(source_dir.glob(pattern)):
      if src.is_file():
        shutil.copyfile(src, out / src.name)
        copied.append(src.name)
  extra = source_dir / "additional_chat_templates"
  if extra.is_dir():
    shutil.copytree(extra, out / extra.name, dirs_exist_ok=True)
    copied.append(extra.name)
  return copied


def added_tokens(source_dir: pathlib.Path) -> dict[str, int]:
  """Token -> id of the added (special) tokens of tokenizer.json; {} without one."""
  path = source_dir / "tokenizer.json"
  if not path.is_file():
    return {}
  return {t["content"]: int(t["id"]) for t in read_json(path).get("added_tokens", [])}


# ---------------------------------------------------------------- safetensors


class TensorSpec:
  """One tensor to write: its name, shape and dtype, and how to compute it when its turn comes."""

  def __init__(self, name: str, shape: Sequence[int], dtype: np.dtype, produce: Callable[[], np.ndarray]):
    self.name, self.shape, self.dtype, self.produce = name, tuple(int(s) for s in shape), np.dtype(dtype), produce

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_safetensors(path: pathlib.Path, tensors: Sequence[TensorSpec], metadata: dict[str, str]) -> str:
  """Writes a safetensors file tensor by tensor (header first: every size is known in advance); returns its SHA-256.

  The digest is of the bytes as they were written, for the export's check of the file on disk
  (export/staging.py). The file is written under a temporary name and renamed when complete, so
  an interrupted write never leaves a truncated file under the final name.
  """
  header: dict = {"__metadata__": dict(metadata)}
  offset = 0
  for t in tensors:
    header[t.name] = {
      "dtype": _DTYPE_CODES[t.dtype],
      "shape": list(t.shape),
      "data_offsets": [offset, offset + t.nbytes],
    }
    offset += t.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
  partial = path.with_name(path.name + ".partial")
  digest = hashlib.sha256()
  with open(partial, "wb") as f:
    for chunk in (struct.pack("<Q", len(raw)), raw):
      f.write(chunk)
      digest.update(chunk)
    for t in tensors:
      value = np.ascontiguousarray(t.produce())
      if value.shape != t.shape or value.dtype != t.dtype:
        raise AssertionError(f"{t.name}: produced {value.shape} {value.dtype}, planned {t.shape} {t.dtype}")
      data = value.reshape(-1).view(np.uint8).data  # raw bytes, no copy (works for ml_dtypes too)
      f.write(data)
      digest.update(data)
      del value, data
  os.replace(partial, path)
  return digest.hexdigest()


def safetensors_header(path: pathlib.Path) -> dict:
  """The tensor table of a safetensors file ({name: {dtype, shape, data_offsets}}), without its metadata."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  header["__header_bytes__"] = 8 + n
  return header


def check_complete(path: pathlib.Path) -> None:
  """Raises ExportError unless a written safetensors or GGUF file is as long as its own header says it must be."""
  size, name = path.stat().st_size, path.name.removesuffix(".partial")
  try:
    if name.endswith(".safetensors"):
      header = safetensors_header(path)
      start = header.pop("__header_bytes__")
      want = start + max((t["data_offsets"][1] for t in header.values()), default=0)
    elif name.endswith(".gguf"):
      import gguf

      tensors = gguf.GGUFReader(path).tensors
      want = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    else:
      return
  except (ValueError, KeyError, struct.error) as e:
    raise ExportError(f"{path}: written unreadable ({e}); the export was not put in place.") from None
  if size < want:
    raise ExportError(f"{path}: {size:,} bytes written, {want:,} expected; the export was not put in place.")


def write_sharded(
  out: pathlib.Path, tensors: Sequence[TensorSpec], max_bytes: int, record: Callable[[str, str], None]
) -> None:
  """Writes tensors as transformers' shards (model.safetensors, or model-0000K-of-0000N ones and their index).

  record(file name, SHA-256) is called for each shard written (the staging's check of the files on disk).
  """
  shards = plan_shards(tensors, max_bytes)
  names = (
    ["model.safetensors"]
    if len(shards) == 1
    else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  )
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    record(fname, write_safetensors(out / fname, shard, metadata={"format": "pt"}))
    for t in shard:
      weight_map[t.name] = fname
      total += t.nbytes
  if len(shards) > 1:
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def plan_shards(tensors: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
  """Groups tensors, in order, into shards of at most `max_bytes` (a larger tensor gets a shard alone)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards
