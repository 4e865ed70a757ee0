"""Shared by the export tests: LoRA models with random adapters, reading checkpoints back, logit checks."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.hf.load import load_model
from jaxtune.hf.safetensors_io import Checkpoint
from jaxtune.models.transformer import CausalLM, Linear
from jaxtune.peft.lora import LoRA, LoRAParam, apply_lora, in_axes

import tiny_configs


def lora_model(
  source: pathlib.Path,
  *,
  rank: int = 4,
  alpha: float = 8.0,
  seed: int = 0,
  std: float = 0.05,
  load: dict | None = None,
  **lora,
) -> CausalLM:
  """The HF checkpoint at `source` in jaxtune with `apply_lora` adapters, A and B random (B is zero at init);
  DoRA's magnitudes (use_dora=True) are the kernels' row norms, each moved by ~20%.

  load: `load_model` settings of the base (e.g. quantize="nf4"). The adapters' structure comes from apply_lora
  on an abstract model and their values from numpy: apply_lora's random init compiles once per shape, seconds
  per model on 2 cores.
  """
  base = load_model(source, **(load or {}))
  abstract = nnx.eval_shape(
    lambda: apply_lora(
      CausalLM(base.config, base.options, rngs=nnx.Rngs(0)), rank=rank, alpha=alpha, rngs=nnx.Rngs(0), **lora
    )
  )
  graphdef, adapters, rest = nnx.split(abstract, LoRAParam, ...)
  del rest
  rng = np.random.default_rng(seed)
  adapters = jax.tree.map(lambda s: jnp.asarray((std * rng.standard_normal(s.shape)).astype(s.dtype)), adapters)
  model = nnx.merge(graphdef, adapters, nnx.state(base))
  for _, linear in nnx.iter_modules(model):
    if isinstance(linear, Linear) and isinstance(linear.adapter, LoRA) and linear.adapter.use_dora:
      kernel = np.asarray(linear.kernel[...], np.float32)
      norms = np.sqrt(np.sum(np.square(kernel), axis=in_axes(linear.adapter.spec, kernel.ndim)))
      linear.adapter.lora_magnitude.set_value(jnp.asarray(norms * (1 + 0.2 * rng.standard_normal(norms.shape))))
  return model


def randomize_adapters(model: CausalLM, seed: int = 0, std: float = 0.05) -> CausalLM:
  """Sets every LoRA B of a model (zero at init) to random values, in place; returns the model."""
  rng = np.random.default_rng(seed)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LoRA):
      b = module.lora_b
      b.set_value(jnp.asarray((std * rng.standard_normal(b.shape)).astype(b.dtype)))
  return model


def read_checkpoint(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of an HF checkpoint directory (single file or sharded), in its stored dtype."""
  return dict(Checkpoint(directory).items())


def assert_close_logits(got: np.ndarray, want: np.ndarray, rel: float = 1e-4, what: str = "") -> None:
  scale = np.abs(want).max()
  err = np.abs(got - want).max()
  assert err <= rel * scale, f"{what}: max |diff| {err:.3g} > {rel} x logit scale {scale:.3g}"


CHATML = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_llama(directory: pathlib.Path, vocab_size: int = 288, seed: int = 0) -> pathlib.Path:
  """A tiny random Llama (default rope, tied) with a small byte-level BPE tokenizer and a ChatML template.

  The GGUF tests use it: SmolLM2's 49k-token vocabulary makes every gguf read take seconds.
  Ids past the tokenizer's last one (vocab_size is padded up) have no token.
  """
  import torch
  import transformers
  from gguf.vocab import bytes_to_unicode  # GPT-2 byte -> char table
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  alphabet = list(bytes_to_unicode().values())
  merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]
  vocab = {c: i for i, c in enumerate(alphabet)}
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(
    [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
  )
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<|im_start|>",
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    chat_template=CHATML,
    clean_up_tokenization_spaces=False,
  )
  ids = fast.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
  config = transformers.LlamaConfig(
    **tiny_configs.LLAMA_TIED_CHAT, vocab_size=vocab_size, bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2]
  )
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  fast.save_pretrained(directory)
  return directory
