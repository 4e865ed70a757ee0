"""An Ollama Modelfile for a GGUF export: the chat template in Ollama's (Go text/template) syntax, and stop tokens.

Ollama renders a prompt with a Go template over `.Messages` (role, content) and `.System` (the
system messages, joined). The Jinja template is translated by what it renders: conversations
with marker contents show the text before the first user turn (with and without a system
prompt), between a user turn and the next assistant turn and back, after the last user turn (the
generation prompt), and where the system prompt goes (its own turn or the first user turn, as in
ChatML, Llama 3, Gemma; or the last user turn, as in Mistral). Those pieces become the Go
template, which is checked against the Jinja rendering of every probe before it is written; a
template that the pieces cannot reproduce (content-dependent formatting) gets no TEMPLATE line,
and Ollama falls back to its own detection. A BOS token that llama.cpp adds itself
(`tokenizer.ggml.add_bos_token`) is left out of the template. Messages are inserted as given:
Ollama's templates cannot trim, so a template that trims contents agrees for trimmed contents.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings

import gguf

from jaxtune.hf.gguf_tokenizer import field, stop_token_ids

MODELFILE = "Modelfile"
_S, _U, _A = "@@S0@@", ("@@U0@@", "@@U1@@", "@@U2@@"), ("@@A0@@", "@@A1@@")


class Untranslatable(ValueError):
  """A chat template whose rendering the Go template pieces cannot reproduce."""


@dataclasses.dataclass(frozen=True)
class Pieces:
  """The literal text around the messages of a chat template's rendering."""

  head: str  # before the first user message, no system prompt
  sys_head: str  # before the system prompt ("first": at the start; "last": inside the last user turn)
  sys_tail: str  # after the system prompt, before the user message it goes with
  user_to_assistant: str
  assistant_to_user: str
  tail: str  # after the last user message: its end and the generation prompt
  system_at: str  # "first" | "last"


def render(template: str, messages: list[dict], generate: bool, bos: str, eos: str) -> str:
  """The Jinja template's text for `messages`, as transformers renders it."""
  from transformers.utils.chat_template_utils import render_jinja_template

  rendered, _ = render_jinja_template(
    conversations=[messages], chat_template=template, add_generation_prompt=generate, bos_token=bos, eos_token=eos
  )
  return rendered[0]


def _split(text: str, markers: list[str]) -> list[str]:
  """The text between consecutive markers (each must appear once, in order)."""
  out, rest = [], text
  for m in markers:
    if rest.count(m) != 1:
      raise Untranslatable(f"message {m} appears {rest.count(m)} times in the rendering")
    before, rest = rest.split(m)
    out.append(before)
  return out + [rest]


def _conversation(system: bool) -> list[dict]:
  turns = [("user", _U[0]), ("assistant", _A[0]), ("user", _U[1]), ("assistant", _A[1]), ("user", _U[2])]
  return [{"role": "system", "content": _S}] * system + [{"role": r, "content": c} for r, c in turns]


def pieces(template: str, bos: str, eos: str, strip_bos: bool) -> Pieces:
  """The template's Pieces, read off renderings of marker conversations; Untranslatable if it has none."""

  def text(messages: list[dict]) -> str:
    out = render(template, messages, True, bos, eos)
    return out[len(bos) :] if strip_bos and bos and out.startswith(bos) else out

  order = [_U[0], _A[0], _U[1], _A[1], _U[2]]
  head, ua, au, ua2, au2, tail = _split(text(_conversation(False)), order)
  if (ua, au) != (ua2, au2):
    raise Untranslatable("the text between turns differs from turn to turn")
  with_system = text(_conversation(True))
  if with_system.find(_S) < with_system.find(_U[0]):
    sys_head, sys_tail, *rest = _split(with_system, [_S] + order)
    if rest != [ua, au, ua, au, tail]:
      raise Untranslatable("a system prompt changes the text between later turns")
    return Pieces(head, sys_head, sys_tail, ua, au, tail, "first")
  head2, *middle, before_sys, sys_tail, tail2 = _split(with_system, order[:-1] + [_S, _U[2]])
  if not before_sys.startswith(au) or [head2, *middle, tail2] != [head, ua, au, ua, tail]:
    raise Untranslatable("the system prompt is neither before the first user turn nor in the last one")
  return Pieces(head, before_sys[len(au) :], sys_tail, ua, au, tail, "last")


def _lit(s: str) -> str:
  """A Go template action printing `s` (a Go string literal; JSON's escapes are Go's), or nothing for ""."""
  return "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""


def go_template(p: Pieces) -> str:
  """The Go template (Ollama's TEMPLATE) that renders a conversation as the pieces say."""
  first = "{{- if $.System }}" + _lit(p.sys_head) + "{{ $.System }}" + _lit(p.sys_tail)
  first += "{{ else }}" + _lit(p.head) + "{{ end }}"
  if p.system_at == "last":
    first = _lit(p.head)
  lines = [
    '{{- $prev := "" }}',
    "{{- range $i, $m := .Messages }}",
    '{{- if eq .Role "user" }}',
    '{{- if eq $prev "" }}',
    first,
    "{{- else }}" + _lit(p.assistant_to_user) + "{{ end }}",
  ]
  if p.system_at == "last":
    last = "{{- if and $.System (eq (len (slice $.Messages $i)) 1) }}"
    lines.append(last + _lit(p.sys_head) + "{{ $.System }}" + _lit(p.sys_tail) + "{{ end }}")
  lines += [
    '{{- .Content }}{{ $prev = "user" }}',
    '{{- else if eq .Role "assistant" }}' + _lit(p.user_to_assistant) + '{{ .Content }}{{ $prev = "assistant" }}',
    "{{- end }}",
    "{{- end }}",
    '{{- if eq $prev "user" }}' + _lit(p.tail) + "{{ end }}",
  ]
  # Every line opens with "{{-", which drops the newline before it: the layout prints nothing.
  return "\n".join(line if line.startswith("{{-") else "{{-" + line[2:] for line in lines if line)


def simulate(p: Pieces, messages: list[dict]) -> str:
  """What `go_template(p)` renders for `messages` under Ollama (system messages joined into .System)."""
  system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
  turns = [m for m in messages if m["role"] in ("user", "assistant")]
  out, prev = "", ""
  for i, m in enumerate(turns):
    if m["role"] == "user":
      if not prev:
        out += p.sys_head + system + p.sys_tail if system and p.system_at == "first" else p.head
      else:
        out += p.assistant_to_user
      if system and p.system_at == "last" and m is messages[-1]:
        out += p.sys_head + system + p.sys_tail
      out += m["content"]
    else:
      out += p.user_to_assistant + m["content"]
    prev = m["role"]
  return out + (p.tail if prev == "user" else "")


# Conversations the translation must reproduce exactly (besides the marker probes) before it is written.
CHECKS = [
  [{"role": "user", "content": "Hi!"}],
  [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
  [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
  ],
]


def translate(template: str, bos: str, eos: str, strip_bos: bool) -> str:
  """The Go template for a Jinja chat template; Untranslatable where it would render differently."""
  p = pieces(template, bos, eos, strip_bos)
  for messages in CHECKS + [_conversation(True), _conversation(False)]:
    want = render(template, messages, True, bos, eos)
    want = want[len(bos) :] if strip_bos and bos and want.startswith(bos) else want
    if simulate(p, messages) != want:
      raise Untranslatable(f"the translation renders {len(messages)} messages differently")
  go = go_template(p)
  if '"""' in go:
    raise Untranslatable('the template holds """, which ends a Modelfile TEMPLATE')
  return go


def modelfile(gguf_path: str | pathlib.Path) -> str:
  """The Modelfile text for the GGUF file (FROM it, its chat template as TEMPLATE, its stop tokens)."""
  path = pathlib.Path(gguf_path)
  reader = gguf.GGUFReader(path)
  tokens = field(reader, "tokenizer.ggml.tokens")

  def token(key: str) -> str:
    i = field(reader, f"tokenizer.ggml.{key}_token_id", None)
    return "" if i is None else tokens[int(i)]

  lines = [f"FROM ./{path.name}"]
  template = field(reader, "tokenizer.chat_template", None)
  if template:
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", field(reader, "tokenizer.ggml.model") == "llama"))
    try:
      lines.append(f'TEMPLATE """{translate(template, token("bos"), token("eos"), add_bos)}"""')
    except Untranslatable as e:
      warnings.warn(f"{path.name}: no Ollama TEMPLATE written ({e}); Ollama will guess the template.", stacklevel=2)
    except Exception as e:  # a template that fails to render its probes (it raises, or needs other inputs)
      warnings.warn(f"{path.name}: no Ollama TEMPLATE written (rendering failed: {e}).", stacklevel=2)
  lines += [f"PARAMETER stop {json.dumps(tokens[i], ensure_ascii=False)}" for i in stop_token_ids(reader)]
  return "\n".join(lines) + "\n"
