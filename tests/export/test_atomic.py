"""Exports are atomic per directory: written aside, checked, renamed into place; an interrupted export or overwrite
leaves the destination as it was."""

import errno
import hashlib
import json
import os
import subprocess
import sys

import pytest
from safetensors.numpy import save_file

from jaxtune.export import ExportError, adapter, export_adapter, export_merged, files, staging
from jaxtune.train import builtin_models

from export_helpers import lora_model, read_checkpoint

SHARD = 20_000  # bytes: the tiny model's merged export comes in several shards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(the tiny-random checkpoint, the model with random adapters, the same with other adapters)."""
  source = builtin_models.write_tiny(tmp_path_factory.mktemp("tiny"))
  return source, lora_model(source, seed=1), lora_model(source, seed=2)


def _snapshot(directory):
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _full(path) -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_an_export_appears_whole_with_a_manifest_of_checked_files(tiny, tmp_path):
  source, model, _ = tiny
  out = export_merged(model, source, tmp_path / "out", max_shard_bytes=SHARD)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory left beside it
  listed = json.loads((out / staging.MANIFEST).read_text())["files"]
  on_disk = sorted(p.name for p in out.iterdir() if p.name != staging.MANIFEST)
  assert sorted(listed) == on_disk and len([n for n in on_disk if n.endswith(".safetensors")]) > 2
  for name, entry in listed.items():
    data = (out / name).read_bytes()
    assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_an_interrupted_export_leaves_nothing_at_the_destination(tiny, tmp_path, monkeypatch):
  source, model, _ = tiny
  write, written = files.write_safetensors, []

  def interrupted_at_the_third_shard(path, tensors, metadata):
    if len(written) == 2:
      raise KeyboardInterrupt  # Ctrl-C half-way through
    written.append(path)
    return write(path, tensors, metadata)

  monkeypatch.setattr(files, "write_safetensors", interrupted_at_the_third_shard)
  with pytest.raises(KeyboardInterrupt):
    export_merged(model, source, tmp_path / "out", max_shard_bytes=SHARD)
  assert len(written) == 2 and list(tmp_path.iterdir()) == []  # no destination, no partial directory


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_the_old_export_only_once_the_new_one_is_complete(tiny, tmp_path, monkeypatch, exchange):
  source, model, other = tiny
  out = export_adapter(model, tmp_path / "out", str(source))
  before = _snapshot(out)

  def full_disk(tensors, filename, metadata=None):  # the disk fills half-way through the new adapter file
    with open(filename, "wb") as f:
      f.write(b"\0" * 1000)
    raise _full(filename)

  monkeypatch.setattr(adapter, "save_file", full_disk)
  with pytest.raises(ExportError) as failed:
    export_adapter(other, out, str(source), overwrite=True)
  assert str(failed.value) == (
    f"{out}: could not write the export (no space left on the device); nothing was put there (the earlier export "
    "there is as it was): free space there (or choose a disk with room), then export again."
  )
  assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

  monkeypatch.setattr(adapter, "save_file", save_file)
  if not exchange:
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
  export_adapter(other, out, str(source), overwrite=True)
  after = _snapshot(out)
  assert after.keys() == before.keys() and after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the replaced export is gone


def test_a_file_cut_short_is_caught_before_it_is_put_in_place(tiny, tmp_path, monkeypatch):
  source, model, _ = tiny
  write = files.write_safetensors

  def cut_short(path, tensors, metadata):  # a filesystem that lost the end of the file without an error
    digest = write(path, tensors, metadata)
    with open(path, "r+b") as f:
      f.truncate(f.seek(0, os.SEEK_END) - 100)
    return digest

  monkeypatch.setattr(files, "write_safetensors", cut_short)
  with pytest.raises(
    ExportError, match=r"model.safetensors: [\d,]+ bytes written, [\d,]+ expected; the export was not"
  ):
    export_merged(model, source, tmp_path / "out")
  assert list(tmp_path.iterdir()) == []


def test_a_killed_exports_partial_directory_is_removed_by_the_next(tiny, tmp_path):
  source, model, _ = tiny
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  dead, alive = tmp_path / f".out.partial-{gone.stdout.strip()}-x1", tmp_path / f".out.partial-{os.getpid()}-x2"
  for partial in (dead, alive):
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
  out = export_merged(model, source, tmp_path / "out")
  assert not dead.exists() and alive.exists()  # a running export's directory is left alone
  assert set(read_checkpoint(out)) == set(read_checkpoint(source))


def test_destinations_an_export_would_damage_are_refused(tiny, tmp_path):
  source, model, _ = tiny
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "notes.txt").write_text("mine")
  with pytest.raises(
    ExportError, match=r"notes: holds files that are not part of an export \(notes.txt\); an export replaces the whole"
  ):
    export_merged(model, source, tmp_path / "notes", overwrite=True)
  assert (tmp_path / "notes" / "notes.txt").read_text() == "mine"
  out = export_merged(model, source, tmp_path / "empty_dir_is_fine")
  with pytest.raises(ExportError, match=r"already holds a model \(.*model.safetensors.*\); pass --overwrite"):
    export_merged(model, source, out)
