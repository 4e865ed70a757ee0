"""Named chat templates (`data.chat_template="llama3"`), for checkpoints whose tokenizer carries none.

Each file here is the template its family's instruct models publish on the hub, unchanged:

  llama2   Llama-2-*-chat          ([INST] ... [/INST], <<SYS>> inside the first user turn)
  llama3   Llama-3-*-Instruct      (the updated template: the assistant header only as a generation prompt)
  mistral  Mistral-7B-Instruct-v0.3 (the system prompt joins the last user turn)
  qwen2.5  Qwen2.5-*-Instruct      (ChatML, with Qwen's default system prompt)
  qwen3    Qwen3                   (ChatML with <think> reasoning blocks)
  gemma    Gemma 3 (also Gemma 1 and 2 tokenizers: <start_of_turn>; a system prompt joins the first user turn)
  phi3     Phi-3-*-instruct

The run uses the template it resolves to everywhere: loss masks, task scoring, chat, and the export,
which writes it into the tokenizer files so that inference formats prompts as training did.
"""

from __future__ import annotations

import pathlib

from jaxtune.errors import ConfigError

HERE = pathlib.Path(__file__).resolve().parent
NAMES = tuple(sorted(p.stem for p in HERE.glob("*.jinja")))


def resolve(value: str) -> str | None:
  """The Jinja text `data.chat_template` stands for: a named template's, the text itself, or None (the tokenizer's)."""
  if not value:
    return None
  if value in NAMES:
    return (HERE / f"{value}.jinja").read_text()
  if "{{" in value or "{%" in value:
    return value
  raise ConfigError(
    f"data.chat_template: {value!r} is neither a named template ({', '.join(NAMES)}) nor Jinja text; "
    "use one of the names, or the template itself"
  )
