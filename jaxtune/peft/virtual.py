"""Prompt tuning and prefix tuning: learned virtual tokens before every example.

One hook for both: the model reads virtual token k of an example from input_ids = -1 - k (`VIRTUAL`), slots
the data pipeline and generation put before each example's own tokens (`with_virtual`). So packing, segment
ids, positions, loss masks (0 at the virtual slots), attention masks and the KV cache treat them as tokens of
the example: each packed example gets its own, and the positions are PEFT's (virtual tokens at 0..P-1, the
text from P on). The transform sets `CausalLM.virtual`:

* `PromptTuning` (PEFT's PROMPT_TUNING): the virtual slots' embeddings are learned [P, D], taken as the
  layers' input: Gemma's sqrt(D) scaling does not apply to them (transformers scales in its embedding
  module, not `inputs_embeds`), and a text init takes the scaled embeddings of its tokens, as PEFT does.
* `PrefixTuning` (PEFT's PREFIX_TUNING): every layer's keys and values at the virtual slots are learned
  [L, 2, P, K, H], taken as they stand in a KV cache (after rope and k-norm, as PEFT's `past_key_values`);
  what the virtual slots' queries compute is never read. With `projection` (PEFT's prefix_projection), they
  are the output of PEFT's reparameterisation MLP, embedding [P, K*H] -> Linear -> tanh -> Linear.

PEFT saves both as one tensor `prompt_embeddings`: [P, D], or [P, L*2*K*H] (the MLP applied).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.models.transformer import CausalLM
from jaxtune.peft.lora import AdapterParam

VIRTUAL_METHODS = ("prompt", "prefix")


def virtual_ids(count: int) -> list[int]:
  """The input ids of `count` virtual tokens: -1, -2, ..., -count."""
  return [-1 - k for k in range(count)]


def with_virtual(ids: Sequence[int], count: int) -> list[int]:
  """An example's tokens after its `count` virtual slots."""
  return virtual_ids(count) + list(ids)


class PromptTuning(nnx.Module):
  """Learned input embeddings of P virtual tokens."""

  method = "prompt"

  def __init__(self, embeddings: jax.Array):
    self.embeddings = AdapterParam(jnp.asarray(embeddings, jnp.float32), axes=(None, "embed"))
    self.num_virtual_tokens = int(embeddings.shape[0])

  def __call__(self, x_BTD: jax.Array, slots_BT: jax.Array) -> tuple[jax.Array, None]:
    table = self.embeddings[...].astype(x_BTD.dtype)
    virtual = (slots_BT >= 0)[..., None]
    return jnp.where(virtual, table[jnp.clip(slots_BT, 0, table.shape[0] - 1)], x_BTD), None

  def prompt_embeddings(self) -> jax.Array:
    return self.embeddings[...]


class PrefixTuning(nnx.Module):
  """Learned keys and values of P virtual tokens in every layer, optionally through PEFT's MLP."""

  method = "prefix"

  def __init__(
    self,
    num_layers: int,
    num_virtual_tokens: int,
    kv_heads: int,
    head_dim: int,
    *,
    projection: bool = False,
    hidden: int = 0,
    rngs: nnx.Rngs,
  ):
    L, P, K, H = num_layers, num_virtual_tokens, kv_heads, head_dim
    self.shape = (L, 2, P, K, H)
    self.num_virtual_tokens, self.projection, self.hidden = P, projection, hidden
    token_dim = K * H
    normal = lambda shape: jax.random.normal(rngs.params(), shape, jnp.float32)  # torch.nn.Embedding's init
    if projection:
      hidden = hidden or token_dim
      self.hidden = hidden
      bound1, bound2 = 1 / math.sqrt(token_dim), 1 / math.sqrt(hidden)  # torch.nn.Linear's init
      uniform = lambda shape, b: jax.random.uniform(rngs.params(), shape, jnp.float32, -b, b)
      self.embedding = AdapterParam(normal((P, token_dim)), axes=(None, None))
      self.w1 = AdapterParam(uniform((token_dim, hidden), bound1), axes=(None, None))
      self.b1 = AdapterParam(uniform((hidden,), bound1), axes=(None,))
      self.w2 = AdapterParam(uniform((hidden, L * 2 * token_dim), bound2), axes=(None, None))
      self.b2 = AdapterParam(uniform((L * 2 * token_dim,), bound2), axes=(None,))
      self.prefix = nnx.data(None)
    else:
      self.prefix = AdapterParam(normal(self.shape), axes=("layers", None, None, "kv_heads", "head_dim"))

  def prompt_embeddings(self) -> jax.Array:
    """PEFT's saved tensor [P, L*2*K*H]: the MLP's output, or the prefixes in its layout."""
    if self.projection:
      h = jnp.tanh(self.embedding[...] @ self.w1[...] + self.b1[...])
      return h @ self.w2[...] + self.b2[...]
    L, _, P, K, H = self.shape
    return jnp.transpose(self.prefix[...], (2, 0, 1, 3, 4)).reshape(P, L * 2 * K * H)

  def kv(self) -> jax.Array:
    """Every layer's keys and values [L, 2, P, K, H]."""
    if not self.projection:
      return self.prefix[...]
    L, _, P, K, H = self.shape
    return jnp.transpose(self.prompt_embeddings().reshape(P, L, 2, K, H), (1, 2, 0, 3, 4))

  def __call__(self, x_BTD: jax.Array, slots_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    del slots_BT
    return x_BTD, self.kv()


def method(model: CausalLM) -> str | None:
  """ "prompt" or "prefix" when the model has that method's virtual tokens, else None."""
  virtual = getattr(model, "virtual", None)
  return None if virtual is None else virtual.method


def num_virtual_tokens(model: CausalLM) -> int:
  """How many virtual slots each example needs before its tokens (0 without prompt or prefix tuning)."""
  virtual = getattr(model, "virtual", None)
  return 0 if virtual is None else virtual.num_virtual_tokens


def _check_count(count: int, key: str) -> None:
  if count < 1:
    raise ConfigError(f"{key}: {count} must be >= 1.")


def init_text_ids(tokenizer: Any, text: str, count: int, key: str = "peft.prompt.init_text") -> list[int]:
  """PEFT's TEXT init: the text's token ids (with the tokenizer's special tokens, as PEFT encodes it) repeated
  up to `count`; a text of more tokens than `count` is refused."""
  ids = list(tokenizer(text)["input_ids"])
  if not ids:
    raise ConfigError(f"{key}: {text!r} encodes to no tokens; give a text, or set peft.prompt.init=random.")
  if len(ids) > count:
    raise ConfigError(
      f"{key}: {len(ids)} tokens is more than peft.prompt.num_virtual_tokens={count}; shorten the text or raise "
      f"num_virtual_tokens to {len(ids)}."
    )
  return (ids * math.ceil(count / len(ids)))[:count]


def apply_prompt_tuning(
  model: CausalLM, *, num_virtual_tokens: int, init_ids: Sequence[int] | None = None, rngs: nnx.Rngs
) -> CausalLM:
  """Adds prompt tuning's P learned embeddings, in place; returns the model.

  init_ids: PEFT's TEXT init (`init_text_ids`): the embeddings of these tokens; None: PEFT's RANDOM init
  (normal(0, 1), torch.nn.Embedding's)."""
  _check_count(num_virtual_tokens, "peft.prompt.num_virtual_tokens")
  if model.virtual is not None:
    raise ValueError("the model has virtual tokens already; apply one PEFT method once.")
  D = model.config.hidden_size
  if init_ids is not None:
    embeddings = jnp.asarray(model.embed[...], jnp.float32)[jnp.asarray(list(init_ids), jnp.int32)]
    if model.config.scale_embeddings:
      embeddings = embeddings * np.float32(D**0.5)
  else:
    embeddings = jax.random.normal(rngs.params(), (num_virtual_tokens, D), jnp.float32)
  model.virtual = PromptTuning(embeddings)
  return model


def apply_prefix_tuning(
  model: CausalLM, *, num_virtual_tokens: int, projection: bool = False, hidden: int = 0, rngs: nnx.Rngs
) -> CausalLM:
  """Adds prefix tuning's per-layer keys and values for P virtual tokens, in place; returns the model."""
  _check_count(num_virtual_tokens, "peft.prefix.num_virtual_tokens")
  if model.virtual is not None:
    raise ValueError("the model has virtual tokens already; apply one PEFT method once.")
  cfg = model.config
  model.virtual = PrefixTuning(
    cfg.num_layers, num_virtual_tokens, cfg.num_kv_heads, cfg.head_dim, projection=projection, hidden=hidden, rngs=rngs
  )
  return model


def peft_state_dict(model: CausalLM) -> dict[str, np.ndarray]:
  """PEFT's one tensor, `prompt_embeddings`."""
  return {"prompt_embeddings": np.ascontiguousarray(np.asarray(model.virtual.prompt_embeddings(), np.float32))}


def peft_config(model: CausalLM, base_model_name_or_path: str = "") -> dict[str, Any]:
  virtual, cfg = model.virtual, model.config
  common = {
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "num_virtual_tokens": virtual.num_virtual_tokens,
    "num_transformer_submodules": 1,
    "num_layers": cfg.num_layers,
    "inference_mode": True,
  }
  if virtual.method == "prompt":
    return {
      **common,
      "peft_type": "PROMPT_TUNING",
      "token_dim": cfg.hidden_size,
      "num_attention_heads": cfg.num_heads,
      "prompt_tuning_init": "RANDOM",
    }
  return {
    **common,
    "peft_type": "PREFIX_TUNING",
    # PEFT's GQA form: the prefixes are [K, H] per token (utils/other.py _prepare_prompt_learning_config).
    "token_dim": cfg.num_kv_heads * cfg.head_dim,
    "num_attention_heads": cfg.num_kv_heads,
    "encoder_hidden_size": virtual.hidden or cfg.num_kv_heads * cfg.head_dim,
    "prefix_projection": bool(virtual.projection),
  }
