"""A checkpoint's tokenizer.json as llama.cpp's vocabulary: byte-level BPE ("gpt2") or SentencePiece ("llama").

Byte-level BPE (Llama 3, Qwen, SmolLM): tokens, merges and llama.cpp's pre-tokenizer name, recognised
from the pre-tokenizer's regex. SentencePiece written as a byte-fallback BPE (Gemma, Mistral, Llama 2):
llama.cpp merges the adjacent pair whose joined piece scores highest, so each piece scores minus the
rank of the first merge that makes it (SentencePiece's own scores order its merges the same way);
`<0xNN>` pieces are byte tokens and the space prefix follows the normalizer or pre-tokenizer. Token
types and special ids as llama.cpp's converter (convert_hf_to_gguf.py) writes them.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import warnings

import gguf

from jaxtune.export import files
from jaxtune.export.files import ExportError
from jaxtune.hf.gguf_tokenizer import SPIECE_SPACE, SPLIT_REGEXES

T = gguf.TokenType
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_ADDED_SCORE = -1000.0  # llama.cpp's converter scores added and padding pieces so


@dataclasses.dataclass
class Vocab:
  """What llama.cpp needs to tokenize as the checkpoint does."""

  model: str  # "gpt2" | "llama"
  pre: str  # tokenizer.ggml.pre
  tokens: list[str]
  types: list[int]
  scores: list[float] | None = None  # SentencePiece only
  space_prefix: bool = False


def _pre_tokenizer(tokenizer: dict, where: pathlib.Path) -> str:
  """llama.cpp's `tokenizer.ggml.pre` for the byte-level pre-tokenizer in tokenizer.json."""
  pre = tokenizer.get("pre_tokenizer") or {}
  steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
  kinds = [s.get("type") for s in steps]
  if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
    return "smollm"
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
    return "gpt-2"
  names = {regex: name for name, regex in SPLIT_REGEXES.items()}
  if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") in names:
    return names[steps[0]["pattern"]["Regex"]]
  raise ExportError(
    f"{where}: pre-tokenizer {kinds} has no known llama.cpp equivalent; supported: SmolLM/StarCoder "
    "(Digits + ByteLevel), GPT-2 (ByteLevel), Llama 3 and Qwen2/3 (Split + ByteLevel)."
  )


def _looks_special(token: str) -> bool:
  return (token.startswith("<|") and token.endswith("|>")) or (
    token.startswith("<") and token.endswith(">") and " " not in token and len(token) > 2
  )


def _space_prefix(tok: dict, where: pathlib.Path) -> bool:
  """Whether the SentencePiece tokenizer puts "▁" before the text, from its normalizer or pre-tokenizer."""
  norm, pre = tok.get("normalizer") or {}, tok.get("pre_tokenizer") or {}
  steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
  pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
  replaces = any(s.get("type") == "Replace" and s.get("content") == SPIECE_SPACE for s in steps)
  metaspace = [p for p in pres if p.get("type") == "Metaspace"]
  if metaspace:
    return metaspace[0].get("prepend_scheme", "always") != "never" and metaspace[0].get("add_prefix_space", True)
  if not replaces:
    raise ExportError(
      f"{where}: a byte-fallback BPE that does not write spaces as {SPIECE_SPACE!r}; GGUF export supports "
      "SentencePiece-style (Gemma, Mistral, Llama 2) and byte-level BPE tokenizers."
    )
  return any(s.get("type") == "Prepend" for s in steps)


def _table(tok: dict, n_vocab: int, where: pathlib.Path) -> tuple[list[str | None], list[int], dict]:
  """(tokens by id, NORMAL types, added tokens by id) of a tokenizer.json, checked against the model's vocab."""
  model = tok.get("model", {})
  added = {t["id"]: t for t in tok.get("added_tokens", [])}
  tokens: list[str | None] = [None] * n_vocab
  for text, i in list(model["vocab"].items()) + [(t["content"], i) for i, t in added.items()]:
    if i >= n_vocab:
      raise ExportError(f"{where}: token {text!r} has id {i}, beyond the model's vocab_size {n_vocab}.")
    tokens[i] = text
  return tokens, [int(T.NORMAL)] * n_vocab, added


def _byte_level(tok: dict, n_vocab: int, where: pathlib.Path) -> Vocab:
  tokens, types, added = _table(tok, n_vocab, where)
  for i, t in added.items():
    types[i] = T.CONTROL if t.get("special") or _looks_special(t["content"]) else T.USER_DEFINED
  for i, text in enumerate(tokens):
    if text is None:  # rows of the embedding the tokenizer never produces
      tokens[i], types[i] = f"[PAD{i}]", T.UNUSED
  return Vocab("gpt2", _pre_tokenizer(tok, where), tokens, [int(t) for t in types])


def _sentencepiece(tok: dict, n_vocab: int, where: pathlib.Path, unk: str | None) -> Vocab:
  model = tok["model"]
  tokens, types, added = _table(tok, n_vocab, where)
  scores = [0.0] * n_vocab
  merges = model.get("merges") or []
  made: dict[str, int] = {}
  for rank, m in enumerate(merges):
    left, right = m.split(" ", 1) if isinstance(m, str) else m
    made.setdefault(left + right, rank)
  for i, text in enumerate(tokens):
    if text is None:
      continue
    if _BYTE_PIECE.fullmatch(text):
      types[i] = T.BYTE
    elif text == unk:
      types[i] = T.UNKNOWN
    scores[i] = -float(made.get(text, 0))
  for i, t in added.items():
    scores[i] = _ADDED_SCORE
    if t["content"] == unk:
      types[i] = T.UNKNOWN
    elif t.get("special") or _looks_special(t["content"]):
      types[i] = T.CONTROL
    else:  # llama.cpp matches user-defined tokens against the raw text, before "▁" replaces spaces
      types[i], tokens[i] = T.USER_DEFINED, t["content"].replace(SPIECE_SPACE, " ")
  for i, text in enumerate(tokens):
    if text is None:
      tokens[i], types[i], scores[i] = f"[PAD{i}]", T.UNUSED, _ADDED_SCORE
  return Vocab("llama", "default", tokens, [int(t) for t in types], scores, _space_prefix(tok, where))


def read_vocab(source: pathlib.Path, n_vocab: int) -> Vocab:
  """The vocabulary of the source checkpoint's tokenizer.json, one entry per embedding row."""
  where = source / "tokenizer.json"
  if not where.is_file():
    raise ExportError(
      f"{where}: not found; GGUF files carry the tokenizer, so the source checkpoint needs a "
      "tokenizer.json (a Hugging Face fast tokenizer)."
    )
  tok = files.read_json(where)
  model = tok.get("model", {})
  decoder = (tok.get("decoder") or {}).get("type")
  if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
    return _byte_level(tok, n_vocab, where)
  if model.get("type") == "BPE" and model.get("byte_fallback"):
    config = source / "tokenizer_config.json"
    unk = (files.read_json(config) if config.is_file() else {}).get("unk_token")
    unk = model.get("unk_token") or (unk.get("content") if isinstance(unk, dict) else unk)
    return _sentencepiece(tok, n_vocab, where, unk)
  raise ExportError(
    f"{where}: a {model.get('type')} tokenizer (byte_fallback={model.get('byte_fallback')}, decoder {decoder}) "
    "that GGUF export cannot write; it writes byte-level BPE (Llama 3, Qwen, SmolLM) and SentencePiece-style "
    "BPE (Gemma, Mistral, Llama 2) tokenizers. Export --format merged instead."
  )


def add_vocab(writer: gguf.GGUFWriter, source: pathlib.Path, vocab: Vocab, chat_template: str | None) -> None:
  """Tokens, types, scores or merges, special ids, add-bos flag and chat template (llama.cpp's keys).

  chat_template: the one the run trained with, in place of the source's (None: the source's).
  """
  writer.add_tokenizer_model(vocab.model)
  writer.add_tokenizer_pre(vocab.pre)
  writer.add_token_list(vocab.tokens)
  if vocab.scores is not None:
    writer.add_token_scores(vocab.scores)
  writer.add_token_types(vocab.types)
  special = gguf.SpecialVocab(source, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
  special.add_special_token.setdefault("bos", False)  # llama.cpp would otherwise assume a BOS is wanted
  if chat_template:
    special.chat_template = chat_template
  if special.chat_template is None:
    warnings.warn(f"{source} has no chat template; the GGUF file will have none.", stacklevel=3)
  special.add_to_gguf(writer, quiet=True)
  writer.add_add_space_prefix(vocab.space_prefix)
