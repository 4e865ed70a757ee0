"""Tiny checkpoints of every family with a tokenizer of the family's kind, for the GGUF tests.

Configs are tests/tiny_configs.py's FAMILIES. Tokenizers are trained here on a few sentences:
byte-level BPE with Llama 3's or Qwen2's pre-tokenizer regex for Llama and Qwen, SentencePiece BPE
with byte fallback (trained with `sentencepiece`, converted by transformers) for Mistral (with a
space prefix) and Gemma (without); each with its family's special tokens and chat template
(jaxtune/data/templates). Weights are drawn N(0, `std`) (norms 1 + N(0, 0.1), or N(0, 0.1) where the
model adds 1): larger than the configs' init, so next-token distributions are peaked and greedy
choices are not near-ties.
"""

from __future__ import annotations

import json
import pathlib

from jaxtune.hf.gguf_tokenizer import SPLIT_REGEXES

from tiny_configs import COMMON, FAMILIES

CORPUS = [
  "The quick brown fox jumps over the lazy dog.",
  "Hello there! How are you today? I am fine, thank you.",
  "You are a helpful assistant. Answer briefly and exactly.",
  "What is two plus two? Two plus two is four. 1234 + 5678 = 6912",
  "Translate this sentence into French, please: le chat est noir.",
  "Café déjà vu, naïve façade; 東京 and München — 42 times.",
  "user assistant system model think answer question context\n\n  indented\tline",
]
# family -> (tokenizer kind, special tokens, bos, eos, chat template name)
TOKENIZERS = {
  "llama": (
    "llama-bpe",
    ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "<|begin_of_text|>",
    "<|eot_id|>",
    "llama3",
  ),
  "qwen2": ("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "qwen2.5"),
  "qwen3": ("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "qwen3"),
  "mistral": ("spm-prefix", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "mistral"),
}
_GEMMA = ("spm", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>")
for _family in ("gemma", "gemma2", "gemma3_text"):
  TOKENIZERS[_family] = (*_GEMMA, "gemma")
# Changes to tiny_configs' FAMILIES. EXPORTABLE: Gemma 2 with the query scale llama.cpp uses (1 / sqrt(head_dim));
# FULL_ATTENTION: Mistral without a sliding window, which llama.cpp's Llama architecture does not have.
EXPORTABLE = {"gemma2": {"query_pre_attn_scalar": 16}}
FULL_ATTENTION = {"mistral": {"sliding_window": None}}


def _byte_level(kind: str, specials: list[str], bos: str | None, vocab_size: int):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(SPLIT_REGEXES[kind]), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=specials,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(CORPUS, trainer)
  if bos:
    tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials.index(bos))]
    )
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok


def _sentencepiece(directory: pathlib.Path, kind: str, specials: list[str], vocab_size: int) -> None:
  """tokenizer.model trained with sentencepiece; the ids of `specials` are 0, 1, 2, ..."""
  import sentencepiece as spm

  names = {"<unk>": "unk", "<s>": "bos", "</s>": "eos", "<pad>": "pad", "<eos>": "eos", "<bos>": "bos"}
  ids = {f"{names[t]}_id": i for i, t in enumerate(specials) if t in names}
  pieces = {f"{names[t]}_piece": t for t in specials if t in names}
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS * 4),
    model_prefix=str(directory / "tokenizer"),
    vocab_size=vocab_size,
    model_type="bpe",
    byte_fallback=True,
    character_coverage=1.0,
    add_dummy_prefix=kind == "spm-prefix",
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    split_digits=True,
    allow_whitespace_only_pieces=True,
    user_defined_symbols=[t for t in specials if t not in names],
    pad_id=ids.get("pad_id", -1),
    minloglevel=2,
    **{k: v for k, v in ids.items() if k != "pad_id"},
    **pieces,
  )
  (directory / "tokenizer.vocab").unlink()


def write_tokenizer(family: str, directory: pathlib.Path, vocab_size: int = 320):
  """The family's tiny tokenizer and chat template, saved to `directory`; returns the transformers tokenizer."""
  import transformers

  from jaxtune.data import templates

  kind, specials, bos, eos, template = TOKENIZERS[family]
  directory.mkdir(parents=True, exist_ok=True)
  if kind.startswith("spm"):
    _sentencepiece(directory, kind, specials, vocab_size + 100)  # 256 byte pieces come first
    config = {
      "tokenizer_class": "LlamaTokenizer" if kind == "spm-prefix" else "GemmaTokenizer",
      "bos_token": bos,
      "eos_token": eos,
      "unk_token": "<unk>",
      "add_bos_token": True,
      "add_eos_token": False,
      "legacy": False,
    }
    if "<pad>" in specials:
      config["pad_token"] = "<pad>"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    fast = transformers.AutoTokenizer.from_pretrained(directory)
    (directory / "tokenizer.model").unlink()  # the export reads tokenizer.json, what jaxtune trains with
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t.startswith(("<s", "<e", "["))]})
  else:
    fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=_byte_level(kind, specials, bos, vocab_size), bos_token=bos, eos_token=eos, pad_token=specials[0]
    )
  fast.chat_template = templates.resolve(template)
  fast.save_pretrained(directory)
  return fast


def write_checkpoint(family: str, directory: pathlib.Path, seed: int = 0, std: float = 0.15, **overrides):
  """A random tiny checkpoint of `family` with its tokenizer at `directory`; returns (torch model, tokenizer)."""
  import torch
  import transformers

  tokenizer = write_tokenizer(family, directory)
  kwargs = {**COMMON, **FAMILIES[family], **overrides, "vocab_size": len(tokenizer)}
  kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  kwargs["pad_token_id"] = tokenizer.pad_token_id
  model_type = kwargs.pop("model_type")
  config = transformers.AutoConfig.for_model(model_type, **kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  offset = model_type.startswith("gemma")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((0 if offset else 1) + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(std * torch.randn_like(p))
  model.eval().save_pretrained(directory)
  return model, tokenizer
