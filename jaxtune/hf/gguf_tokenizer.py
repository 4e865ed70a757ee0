"""A GGUF file's vocabulary as a transformers fast tokenizer: byte-level BPE ("gpt2") or SentencePiece ("llama").

llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores highest; the
same tokenizer in transformers is a byte-fallback BPE whose merges are ranked by those scores (as
transformers' own SentencePiece conversion ranks them).
"""

from __future__ import annotations

from typing import Any

import gguf

from jaxtune.errors import UserError
from jaxtune.hf.tokens import END_OF_TURN_TOKENS

# llama.cpp token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space
# llama.cpp pre-tokenizers (tokenizer.ggml.pre) that split by one regex before the byte-level step, with that
# regex as the models' tokenizer.json files write it (llama.cpp's src/llama-vocab.cpp spells it another way).
SPLIT_REGEXES = {
  "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
  r"\s*[\r\n]+|\s+(?!\S)|\s+",
  "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
  r"\s*[\r\n]+|\s+(?!\S)|\s+",
}


class GGUFImportError(UserError, ValueError):
  """A GGUF file that jaxtune cannot turn into a Hugging Face checkpoint."""


def field(reader: gguf.GGUFReader, key: str, default: Any = ...) -> Any:
  """Metadata value for key; a missing required key is an error naming file and key."""
  found = reader.get_field(key)
  if found is None:
    if default is ...:
      raise GGUFImportError(f"{reader.data.filename}: required metadata key {key!r} is missing")
    return default
  return found.contents()


def stop_token_ids(reader: gguf.GGUFReader) -> list[int]:
  """eos, end-of-turn and end-of-message ids, so generation stops at the end of a chat turn."""
  ids = [field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
  tokens = field(reader, "tokenizer.ggml.tokens")
  types = field(reader, "tokenizer.ggml.token_type")
  ids += [i for i, (tok, typ) in enumerate(zip(tokens, types)) if typ == CONTROL and tok in END_OF_TURN_TOKENS]
  return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _pre_tokenizer(pre: str, path: str) -> Any:
  """HF pre-tokenizer equal to llama.cpp's regex split for `tokenizer.ggml.pre`."""
  from tokenizers import Regex
  from tokenizers import pre_tokenizers as pt

  if pre in ("llama3", "llama-v3"):
    pre = "llama-bpe"
  if pre in SPLIT_REGEXES:
    return pt.Sequence(
      [
        pt.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated", invert=False),
        pt.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
      ]
    )
  # These split "\p{N}" first, then the GPT-2 regex.
  if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r"):
    return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais"):
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)
  raise GGUFImportError(
    f"{path}: tokenizer.ggml.pre={pre!r} is not supported; add its pre-tokenizer to "
    "_pre_tokenizer in jaxtune/hf/gguf_tokenizer.py (see llama.cpp src/llama-vocab.cpp for its regex)."
  )


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
  """BPE merges equal to SentencePiece's by-score merging: every split of a normal piece into two pieces, best first."""
  vocab = {t: i for i, t in enumerate(tokens)}
  ranked = []
  for i, (piece, kind) in enumerate(zip(tokens, types)):
    if kind != NORMAL or len(piece) < 2:
      continue
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in vocab and right in vocab:
        ranked.append((-scores[i], vocab[left], vocab[right], left, right))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def _bpe_tokenizer(reader: gguf.GGUFReader, tokens: list[str], path: str) -> Any:
  from tokenizers import Tokenizer, decoders, models, processors

  merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre", "default"), path)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok


def _spm_tokenizer(reader: gguf.GGUFReader, tokens: list[str], types: list[int], space_prefix: bool) -> Any:
  from tokenizers import Tokenizer, decoders, models, normalizers

  scores = field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))
  unk = next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
  vocab = {t: i for i, t in enumerate(tokens)}
  model = models.BPE(
    vocab=vocab, merges=spm_merges(tokens, scores, types), byte_fallback=True, fuse_unk=True, unk_token=unk
  )
  tok = Tokenizer(model)
  steps = [normalizers.Prepend(SPIECE_SPACE)] if space_prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE_SPACE)])
  parts = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(parts + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
  return tok


def build_tokenizer(reader: gguf.GGUFReader) -> Any:
  """A transformers fast tokenizer rebuilt from the GGUF vocabulary (byte-level BPE or SentencePiece)."""
  from tokenizers import AddedToken, processors
  from transformers import PreTrainedTokenizerFast

  path = str(reader.data.filename)
  kind = field(reader, "tokenizer.ggml.model")
  tokens = field(reader, "tokenizer.ggml.tokens")
  types = field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
  if kind == "gpt2":
    tok = _bpe_tokenizer(reader, tokens, path)
  elif kind == "llama":
    tok = _spm_tokenizer(reader, tokens, types, bool(field(reader, "tokenizer.ggml.add_space_prefix", True)))
  else:
    raise GGUFImportError(
      f"{path}: tokenizer.ggml.model={kind!r}; supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"
    )
  # Control tokens are special (skipped on decode); user-defined ones are matched verbatim.
  added = [(t, k) for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED)]
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in added if k == USER_DEFINED])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in added if k == CONTROL])

  def token(key: str) -> str | None:
    i = field(reader, f"tokenizer.ggml.{key}_token_id", None)
    return None if i is None else tokens[int(i)]

  bos, eos = token("bos"), token("eos")
  add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
  add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
  if add_bos or add_eos:
    # llama.cpp wraps every sequence in bos/eos when asked to; HF does it in the post-processor.
    def wrap(seq: str, type_id: int) -> list[str]:
      return [f"{bos}:{type_id}"] * add_bos + [f"{seq}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos

    specials = [(t, tokens.index(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(
      single=wrap("$A", 0), pair=wrap("$A", 0) + wrap("$B", 1), special_tokens=specials
    )
  arch = field(reader, "general.architecture")
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=bos,
    eos_token=eos,
    unk_token=token("unknown"),
    pad_token=token("padding"),
    chat_template=field(reader, "tokenizer.chat_template", None),
    # llama.cpp sets clean_spaces=false for these vocabularies: decode must be exact.
    clean_up_tokenization_spaces=False,
    model_max_length=int(field(reader, f"{arch}.context_length", 2048)),
  )
