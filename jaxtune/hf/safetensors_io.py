"""Reading safetensors without torch: memory-mapped, tensor by tensor, sliceable.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to {dtype, shape, data_offsets}, then the raw bytes. Reading it
ourselves gives bfloat16/float8 through ml_dtypes (numpy has no bfloat16) and lets
the sharded loader read just the slices a host needs.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from jaxtune.errors import UserError

DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(UserError, ValueError):
  """A checkpoint file or directory that cannot be loaded; the message says where and what to do."""


class SafetensorsFile:
  """One .safetensors file, memory-mapped; tensors are read on demand."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    try:
      size = self.path.stat().st_size
      with open(self.path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
          raise CheckpointError(f"{self.path}: file is too short to be safetensors ({size} bytes); re-download it.")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER, size - 8):
          raise CheckpointError(
            f"{self.path}: corrupt safetensors header (length {header_len} for a file of "
            f"{size} bytes); the file is truncated or not safetensors; re-download it."
          )
        header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{self.path}: corrupt safetensors header ({e}); re-download the file.") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._data_start = 8 + header_len
    self._entries = header
    data_len = size - self._data_start
    for name, entry in header.items():
      start, end = entry["data_offsets"]
      if entry["dtype"] not in DTYPES:
        raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}.")
      expected = int(np.prod(entry["shape"], dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
      if end > data_len or end - start != expected:
        raise CheckpointError(
          f"{self.path}: tensor {name!r} lies outside the file or has the wrong byte size "
          f"(offsets {start}..{end}, file data {data_len} bytes); the file is truncated or "
          "corrupt; re-download it."
        )
    self._mmap = None  # opened on the first sliced read

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self._entries[name]["dtype"]]

  def get(self, name: str) -> np.ndarray:
    """The whole tensor, read into its own buffer (nothing else of the file stays resident)."""
    entry = self._entries[name]
    start, end = entry["data_offsets"]
    dtype = DTYPES[entry["dtype"]]
    with open(self.path, "rb") as f:
      array = np.fromfile(f, dtype=dtype, count=(end - start) // dtype.itemsize, offset=self._data_start + start)
    return array.reshape(entry["shape"])

  def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """A slice of a tensor, read through the memory map (only the pages it touches are read)."""
    entry = self._entries[name]
    start, end = entry["data_offsets"]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    raw = self._mmap[self._data_start + start : self._data_start + end]
    return np.array(raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])[index])


class Checkpoint:
  """All safetensors files of an HF checkpoint directory, addressed by tensor name."""

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    files = self._files()
    self._files_by_name = {f: SafetensorsFile(self.directory / f) for f in sorted(set(files.values()))}
    self._file_of = files

  def _files(self) -> dict[str, str]:
    d = self.directory
    index = d / "model.safetensors.index.json"
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e}); re-download it.") from None
      missing = sorted({f for f in weight_map.values() if not (d / f).exists()})
      if missing:
        raise CheckpointError(f"{index}: lists shard files that are missing: {', '.join(missing)}; download them.")
      return dict(weight_map)
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
      pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
      if pickles:
        raise CheckpointError(
          f"{d}: holds only pickle checkpoints ({', '.join(pickles)}). jaxtune does not load pickles because "
          "unpickling runs arbitrary code. Convert once, in an environment you trust, with transformers: "
          "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)."
        )
      raise CheckpointError(f"{d}: no *.safetensors files found; is this a Hugging Face model directory?")
    out = {}
    for shard in shards:
      for name in SafetensorsFile(shard).keys():
        out[name] = shard.name
    return out

  def keys(self) -> list[str]:
    return list(self._file_of)

  def file_of(self, name: str) -> SafetensorsFile:
    return self._files_by_name[self._file_of[name]]

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for name in self._file_of:
      yield name, self.file_of(name).get(name)
