"""Batched KV-cache generation: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded into one batch; positions count real
tokens only, so every row sees the positions it would see alone. The prefill and
the whole decode loop run as one compiled `lax.while_loop`, stopping early once
every row has produced a stop token. The command line lives in `jaxtune/generate.py`.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.hf.tokens import END_OF_TURN_TOKENS
from jaxtune.models.transformer import CausalLM, KVCache

_PROMPT_BUCKET = 32  # prompt lengths are padded up to a multiple of this, so a few shapes compile


def stop_token_ids(tokenizer) -> list[int]:
  """EOS ids from the tokenizer, the checkpoint's generation_config.json and known end-of-turn tokens."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  gen_cfg = pathlib.Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "generation_config.json"
  if gen_cfg.is_file():
    eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
    ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
  vocab = tokenizer.get_vocab()
  ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
  return sorted(ids)


def _sample(
  logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int | None, top_p: float | None
) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(
  graphdef,
  state,
  input_ids_BP,
  mask_BP,
  stop_ids,
  key,
  *,
  max_new_tokens: int,
  temperature: float,
  top_k: int | None,
  top_p: float | None,
):
  model: CausalLM = nnx.merge(graphdef, state)
  B, P = input_ids_BP.shape
  cache = KVCache.create(model.config, B, P + max_new_tokens, model.options.dtype)
  positions = jnp.maximum(jnp.cumsum(mask_BP, axis=-1) - 1, 0)
  hidden, cache = model.hidden_states(input_ids_BP, segment_ids=mask_BP, positions=positions, cache=cache)
  logits = model.logits(hidden[:, -1:])  # only the last prompt position predicts anything we keep
  next_pos = positions[:, -1] + 1
  key, sub = jax.random.split(key)
  token = _sample(logits[:, -1], sub, temperature, top_k, top_p)
  out = jnp.zeros((B, max_new_tokens), jnp.int32)
  done = jnp.zeros((B,), bool)

  def cond(carry):
    i, _, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, pos, cache, out, done, key = carry
    out = out.at[:, i].set(jnp.where(done, 0, token))
    done = done | jnp.isin(token, stop_ids)
    logits, cache = model(token[:, None], segment_ids=jnp.ones((B, 1), jnp.int32), positions=pos[:, None], cache=cache)
    key, sub = jax.random.split(key)
    return i + 1, _sample(logits[:, -1], sub, temperature, top_k, top_p), pos + 1, cache, out, done, key

  carry = (jnp.int32(0), token, next_pos, cache, out, done, key)
  _, _, _, _, out, done, _ = jax.lax.while_loop(cond, body, carry)
  return out


def generate_ids(
  model: CausalLM,
  input_ids: Sequence[Sequence[int]],
  *,
  max_new_tokens: int = 128,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  stop_ids: Sequence[int] = (),
  seed: int = 0,
) -> list[list[int]]:
  """New token ids for each prompt (a list of token ids), up to and including the first stop token."""
  P = max(len(p) for p in input_ids)
  P = -(-P // _PROMPT_BUCKET) * _PROMPT_BUCKET
  ids = np.zeros((len(input_ids), P), np.int32)
  mask = np.zeros((len(input_ids), P), np.int32)
  for row, prompt in enumerate(input_ids):
    ids[row, P - len(prompt) :] = prompt
    mask[row, P - len(prompt) :] = 1
  graphdef, state = nnx.split(model)
  out = _generate(
    graphdef,
    state,
    jnp.asarray(ids),
    jnp.asarray(mask),
    jnp.asarray(list(stop_ids) or [-1], jnp.int32),
    jax.random.key(seed),
    max_new_tokens=max_new_tokens,
    temperature=float(temperature),
    top_k=top_k,
    top_p=top_p,
  )
  stops = set(stop_ids)
  result = []
  for row in np.asarray(out).tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    result.append(row[:cut])
  return result


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]], chat: bool | None = None) -> list[list[int]]:
  """Token ids per prompt; message lists, and strings when the tokenizer has a chat template, are templated."""
  chat = bool(tokenizer.chat_template) if chat is None else chat
  encoded = []
  for prompt in prompts:
    if isinstance(prompt, str) and not chat:
      encoded.append(tokenizer(prompt)["input_ids"])
      continue
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
  return encoded


def generate(
  model: CausalLM,
  tokenizer,
  prompts: Sequence[str | list[dict]],
  max_new_tokens: int = 128,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  seed: int = 0,
  chat: bool | None = None,
) -> list[str]:
  """Generated texts, one per prompt (chat template applied when the tokenizer has one)."""
  new_ids = generate_ids(
    model,
    encode_prompts(tokenizer, prompts, chat),
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    stop_ids=stop_token_ids(tokenizer),
    seed=seed,
  )
  return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
