"""Exports are written whole or not at all: into a temporary sibling directory, checked, then renamed into place.

    with staging.staged(out_dir, overwrite=overwrite, patterns=...) as stage:
      ... write every file into stage.path ...
    # here out_dir holds the complete, checked export

The files go to OUT's hidden sibling `.NAME.partial-PID-XXXX`. When they are all written, each is
checked (a safetensors file's size against its header, a GGUF file's against its tensor table,
the shards a safetensors index names, and the SHA-256 a writer computed while streaming against
the bytes on disk), fsynced, and listed with its size and SHA-256 in `export_manifest.json`; only
then is the directory renamed to OUT. An export interrupted before that (killed, a full disk)
leaves nothing at OUT, and `--overwrite` replaces an earlier export only once the new one is
complete: the two directories are exchanged in one `renameat2(RENAME_EXCHANGE)` where Linux offers
it, and the old one is deleted after. Because the whole directory is replaced, OUT may hold only
files of an earlier export. Partial directories left by a killed export are removed by the next
export to the same OUT.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fnmatch
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Sequence

from jaxtune.errors import write_failure, write_fix
from jaxtune.export import files
from jaxtune.export.files import MODEL_PATTERNS, TOKENIZER_PATTERNS, ExportError

MANIFEST = "export_manifest.json"
# Every file an export writes: a directory holding only these is an earlier export that --overwrite may replace.
EXPORT_PATTERNS = MODEL_PATTERNS + TOKENIZER_PATTERNS + ("generation_config.json", "additional_chat_templates")
EXPORT_PATTERNS += (
  MANIFEST,
  "README.md",
  "Modelfile",
)  # README.md: an adapter export's model card; Modelfile: Ollama's, beside a GGUF


@dataclasses.dataclass
class Stage:
  """The temporary directory an export writes into, and the SHA-256 its writers computed while streaming."""

  path: pathlib.Path
  streamed: dict[str, str] = dataclasses.field(default_factory=dict)  # file name -> hex digest

  def record(self, name: str, sha256: str) -> None:
    self.streamed[name] = sha256


def _is_export_file(name: str) -> bool:
  return any(fnmatch.fnmatch(name, pattern) for pattern in EXPORT_PATTERNS)


def _shown(names: Sequence[str]) -> str:
  return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def check_destination(out_dir: str | os.PathLike, *, overwrite: bool, patterns: Sequence[str]) -> pathlib.Path:
  """Where the export goes, checked before anything is computed: absent, empty, or an earlier export to replace."""
  out = pathlib.Path(out_dir).expanduser().absolute()
  if out.exists() and not out.is_dir():
    raise ExportError(f"{out}: exists and is not a directory; pass a directory path to --out.")
  names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
  foreign = [n for n in names if not _is_export_file(n)]
  if foreign:
    raise ExportError(
      f"{out}: holds files that are not part of an export ({_shown(foreign)}); an export replaces the whole "
      "directory, so move them or choose another --out."
    )
  if names and not overwrite:
    models = sorted({p.name for pattern in patterns for p in out.glob(pattern) if p.is_file()}) or names
    raise ExportError(
      f"{out}: already holds a model ({_shown(models)}); pass --overwrite (overwrite=True) to replace "
      "it, or choose an empty --out directory."
    )
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out.parent):
      pass
  except OSError as e:
    raise ExportError(f"{out}: cannot write there ({e.strerror or e}); choose a writable --out directory.") from None
  return out


@contextlib.contextmanager
def staged(out_dir: str | os.PathLike, *, overwrite: bool, patterns: Sequence[str]) -> Iterator[Stage]:
  """A Stage to write the export into; on leaving the block it is checked and becomes `out_dir` (see the module)."""
  out = check_destination(out_dir, overwrite=overwrite, patterns=patterns)
  _remove_abandoned(out)
  stage = Stage(pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent)))
  try:
    try:
      yield stage
      _seal(stage, out)
    except OSError as e:
      why = write_failure(e)
      if why is None:
        raise
      kept = " (the earlier export there is as it was)" if out.exists() and any(out.iterdir()) else ""
      raise ExportError(
        f"{out}: could not write the export ({why}); nothing was put there{kept}: {write_fix(why)}, then export again."
      ) from None
    _commit(stage.path, out)
  finally:
    shutil.rmtree(stage.path, ignore_errors=True)  # the partial export, or after an exchange the replaced one


def _remove_abandoned(out: pathlib.Path) -> None:
  """Deletes partial directories of exports to `out` whose process is gone (killed before they were renamed)."""
  for partial in out.parent.glob(f".{out.name}.partial-*"):
    pid = partial.name.removeprefix(f".{out.name}.partial-").split("-")[0]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


# ---------------------------------------------------------------- checks


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
    os.fsync(f.fileno())
  return digest.hexdigest()


def _check_file(path: pathlib.Path, stage: Stage) -> str:
  """Raises ExportError when `path` is not complete or not the bytes its writer streamed; returns its SHA-256."""
  files.check_complete(path)
  digest = _sha256(path)
  if path.name in stage.streamed and stage.streamed[path.name] != digest:
    raise ExportError(f"{path}: the bytes on disk differ from those written; the export was not put in place.")
  return digest


def _check_index(directory: pathlib.Path) -> None:
  """Every shard a safetensors index names exists and holds the tensors it is said to."""
  index = directory / "model.safetensors.index.json"
  if not index.is_file():
    return
  by_shard: dict[str, set[str]] = {}
  for tensor, shard in json.loads(index.read_text())["weight_map"].items():
    by_shard.setdefault(shard, set()).add(tensor)
  for shard, tensors in by_shard.items():
    if not (directory / shard).is_file() or not tensors <= set(files.safetensors_header(directory / shard)):
      raise ExportError(f"{index.name}: names tensors {shard} does not hold; the export was not put in place.")


def _seal(stage: Stage, out: pathlib.Path) -> None:
  """Checks every file, writes the manifest (name -> bytes, SHA-256) and fsyncs the directory."""
  _check_index(stage.path)
  listed = {}
  for path in sorted(p for p in stage.path.rglob("*") if p.is_file()):
    listed[str(path.relative_to(stage.path))] = {"bytes": path.stat().st_size, "sha256": _check_file(path, stage)}
  (stage.path / MANIFEST).write_text(json.dumps({"files": listed}, indent=2) + "\n")
  _fsync_dir(stage.path)


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


# ---------------------------------------------------------------- putting it in place

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swaps two directories in one atomic step (Linux renameat2); False where that is not available."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  return False  # e.g. EINVAL on a filesystem without it: fall back to two renames


def _commit(stage: pathlib.Path, out: pathlib.Path) -> None:
  """Puts the checked export at `out`; an earlier export there ends up in `stage` (deleted by the caller)."""
  if out.is_dir() and any(out.iterdir()):
    if not _exchange(stage, out):
      aside = stage.with_name(stage.name + "-replaced")
      os.rename(out, aside)  # between these two renames OUT is briefly absent: both exports are still whole
      os.rename(stage, out)
      os.rename(aside, stage)
  else:
    os.rename(stage, out)  # onto nothing, or onto an empty directory: one atomic rename either way
  _fsync_dir(out.parent)
