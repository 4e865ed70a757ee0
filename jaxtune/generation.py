"""KV-cache generation: greedy, temperature, top-k and top-p sampling, batched or streamed.

Prompts of different lengths are left-padded into one batch; positions count real
tokens only, so every row sees the positions it would see alone. The prefill and
the whole decode loop run as one compiled `lax.while_loop`, stopping early once
every row has produced a stop token. The command line lives in `jaxtune/generate.py`.

Streaming (`stream_ids`, `stream_text`: the chat) runs the same prefill and the same
one-token step from the host instead, one compiled call per token, so each token can be
shown as soon as it exists. Its prompt padding, cache length and key schedule are those
of the batched loop: one prompt gives the tokens `generate_ids` gives, sampled ones too.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Iterable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.hf.tokens import END_OF_TURN_TOKENS
from jaxtune.models import kernels as kernels_lib
from jaxtune.models.transformer import CausalLM, KVCache
from jaxtune.peft import virtual as virtual_lib

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


def _token_log_prob(logits_BV: jax.Array, token_B: jax.Array, temperature: float) -> jax.Array:
  """log p(token) under logits / temperature (raw logits when greedy), before top-k / top-p: what the
  training forward computes for the same token (train/grpo.py)."""
  z = logits_BV.astype(jnp.float32) / (temperature or 1.0)
  return jnp.take_along_axis(z, token_B[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)


def _layers(model: CausalLM):
  """Each layer's weights sliced once for a whole generation where the kernels ask for it, else None (every
  step slices them): see `layers_once` in models/kernels.py and models/cpu.py."""
  return model.layer_states() if kernels_lib.get(model.options.kernels).layers_once else None


def _prefill(model: CausalLM, input_ids_BP, mask_BP, key, cache_len: int, sampling: tuple, layers=None):
  """(first new token [B], its position [B], the filled cache, the key for the next token). layers: `_layers`."""
  B, _ = input_ids_BP.shape
  cache = KVCache.create(model.config, B, cache_len, model.options.dtype)
  positions = jnp.maximum(jnp.cumsum(mask_BP, axis=-1) - 1, 0)
  hidden, cache = model.hidden_states(
    input_ids_BP, segment_ids=mask_BP, positions=positions, cache=cache, layers=layers
  )
  logits = model.logits(hidden[:, -1:])  # only the last prompt position predicts anything we keep
  key, sub = jax.random.split(key)
  token = _sample(logits[:, -1], sub, *sampling)
  return token, positions[:, -1] + 1, cache, key, _token_log_prob(logits[:, -1], token, sampling[0])


def _decode_step(model: CausalLM, token_B, pos_B, cache: KVCache, key, sampling: tuple, layers=None):
  """Feeds one token per row at `pos_B`: (the next token, the position after it, the cache, the next key)."""
  B = token_B.shape[0]
  segments = jnp.ones((B, 1), jnp.int32)
  logits, cache = model(token_B[:, None], segment_ids=segments, positions=pos_B[:, None], cache=cache, layers=layers)
  key, sub = jax.random.split(key)
  token = _sample(logits[:, -1], sub, *sampling)
  return token, pos_B + 1, cache, key, _token_log_prob(logits[:, -1], token, sampling[0])


@functools.partial(
  jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "log_probs")
)
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
  log_probs: bool = False,
):
  """(new tokens [B, N] (0 after a row's stop token), their log-probs [B, N] when `log_probs`, decode steps run)."""
  model: CausalLM = nnx.merge(graphdef, state)
  B, P = input_ids_BP.shape
  sampling = (temperature, top_k, top_p)
  layers = _layers(model)
  token, next_pos, cache, key, logp = _prefill(model, input_ids_BP, mask_BP, key, P + max_new_tokens, sampling, layers)
  out = jnp.zeros((B, max_new_tokens), jnp.int32)
  logps = jnp.zeros((B, max_new_tokens if log_probs else 0), jnp.float32)
  done = jnp.zeros((B,), bool)

  def write(i, token, logp, out, logps, done):
    """Token i of every row (0 once a row has stopped) and its log-prob; the rows stopped after it."""
    out = out.at[:, i].set(jnp.where(done, 0, token))
    if log_probs:
      logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
    return out, logps, done | jnp.isin(token, stop_ids)

  # Each iteration writes token i and decodes token i + 1; the last token is written after the loop, so no
  # step decodes a token nobody keeps.
  def cond(carry):
    i, _, _, _, _, _, done, _, _ = carry
    return (i < max_new_tokens - 1) & ~jnp.all(done)

  def body(carry):
    i, token, pos, cache, out, logps, done, key, logp = carry
    out, logps, done = write(i, token, logp, out, logps, done)
    token, pos, cache, key, logp = _decode_step(model, token, pos, cache, key, sampling, layers)
    return i + 1, token, pos, cache, out, logps, done, key, logp

  carry = (jnp.int32(0), token, next_pos, cache, out, logps, done, key, logp)
  i, token, _, _, out, logps, done, _, logp = jax.lax.while_loop(cond, body, carry)
  stopped = jnp.all(done)  # else the loop reached the last token, still to be written
  out, logps, _ = write(i, token, logp, out, logps, done)
  steps = i + (~stopped).astype(i.dtype)  # positions decoded before every row had stopped
  return out, logps, steps


@functools.partial(jax.jit, static_argnames="graphdef")
def _stream_layers(graphdef, state):
  return _layers(nnx.merge(graphdef, state))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "sampling"))
def _stream_prefill(graphdef, state, input_ids_BP, mask_BP, key, layers, *, cache_len: int, sampling: tuple):
  return _prefill(nnx.merge(graphdef, state), input_ids_BP, mask_BP, key, cache_len, sampling, layers)[:4]


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames="cache")
def _stream_step(graphdef, state, token_B, pos_B, cache, key, layers, *, sampling: tuple):
  return _decode_step(nnx.merge(graphdef, state), token_B, pos_B, cache, key, sampling, layers)[:4]


def left_pad(
  input_ids: Sequence[Sequence[int]], length: int = 0, bucket: int = _PROMPT_BUCKET
) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) [B, P]: prompts right-aligned, P the longest (or `length`) rounded up to a multiple of `bucket`."""
  P = max([len(p) for p in input_ids] + [length])
  P = -(-P // bucket) * bucket
  ids = np.zeros((len(input_ids), P), np.int32)
  mask = np.zeros((len(input_ids), P), np.int32)
  for row, prompt in enumerate(input_ids):
    ids[row, P - len(prompt) :] = prompt
    mask[row, P - len(prompt) :] = 1
  return ids, mask


def _with_virtual(model: CausalLM, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
  """Each prompt after its virtual tokens, under prompt or prefix tuning (jaxtune/peft/virtual.py)."""
  count = virtual_lib.num_virtual_tokens(model)
  return [virtual_lib.with_virtual(p, count) for p in prompts]


class Sampled(NamedTuple):
  """What `sample` returns, on the device: new tokens [B, N] (0 after each row's first stop token), their
  log-probs [B, N] (0 there too; [B, 0] unless asked for), and the decode steps the batch ran."""

  tokens: jax.Array
  log_probs: jax.Array
  steps: jax.Array


def sample(
  model: CausalLM,
  input_ids_BP: np.ndarray | jax.Array,
  mask_BP: np.ndarray | jax.Array,
  key: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  stop_ids: Sequence[int] = (),
  log_probs: bool = False,
) -> Sampled:
  """The batched KV-cache loop on left-padded prompts (ids, mask [B, P]) with the given key, in one compiled
  call. log_probs: also each new token's log-prob under logits / temperature (training's old log-probs)."""
  graphdef, state = nnx.split(model)
  return Sampled(
    *_generate(
      graphdef,
      state,
      jnp.asarray(input_ids_BP, jnp.int32),
      jnp.asarray(mask_BP, jnp.int32),
      jnp.asarray(list(stop_ids) or [-1], jnp.int32),
      key,
      max_new_tokens=max_new_tokens,
      temperature=float(temperature),
      top_k=top_k or None,
      top_p=top_p,
      log_probs=log_probs,
    )
  )


def lower_sample(model: CausalLM, rows: int, prompt_len: int, *, stop_ids: Sequence[int] = (), **settings):
  """`sample`'s program for `rows` prompts of `prompt_len`, lowered (not run): its memory analysis covers the KV
  cache (rows x (prompt_len + max_new_tokens)). settings: `sample`'s keyword arguments."""
  graphdef, state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32)
  stops = jax.ShapeDtypeStruct((max(len(stop_ids), 1),), jnp.int32)
  settings = {
    **settings,
    "temperature": float(settings.get("temperature", 0.0)),
    "top_k": settings.get("top_k") or None,
  }
  return _generate.lower(graphdef, state, ids, ids, stops, jax.random.key(0), **settings)


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
  ids, mask = left_pad(_with_virtual(model, input_ids))
  out = sample(
    model,
    ids,
    mask,
    jax.random.key(seed),
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    stop_ids=stop_ids,
  ).tokens
  stops = set(stop_ids)
  result = []
  for row in np.asarray(out).tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    result.append(row[:cut])
  return result


def stream_ids(
  model: CausalLM,
  prompt_ids: Sequence[int],
  *,
  max_new_tokens: int = 128,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  stop_ids: Sequence[int] = (),
  seed: int = 0,
) -> Iterator[int]:
  """New token ids of one prompt as they are decoded, up to and including the first stop token.

  The same tokens as `generate_ids(model, [prompt_ids], ...)`: its prefill, step, padding and keys,
  with the loop on the host. Closing the generator early (Ctrl-C, `break`) stops the decoding.
  """
  if max_new_tokens < 1:
    return
  ids, mask = left_pad(_with_virtual(model, [prompt_ids]))
  graphdef, state = nnx.split(model)
  sampling = (float(temperature), top_k, top_p)
  stops = set(stop_ids)
  layers = _stream_layers(graphdef, state)  # held while this answer streams
  token, pos, cache, key = _stream_prefill(
    graphdef,
    state,
    jnp.asarray(ids),
    jnp.asarray(mask),
    jax.random.key(seed),
    layers,
    cache_len=ids.shape[1] + max_new_tokens,
    sampling=sampling,
  )
  for i in range(max_new_tokens):
    # The next step is queued before the host waits for this token, so showing it overlaps computing the next.
    following = (
      None
      if i + 1 == max_new_tokens
      else _stream_step(graphdef, state, token, pos, cache, key, layers, sampling=sampling)
    )
    new = int(token[0])
    yield new
    if new in stops or following is None:
      return
    token, pos, cache, key = following


def stream_text(tokenizer, ids: Iterable[int], *, strip: bool = True) -> Iterator[str]:
  """Text chunks of a token stream: the stream decoded as a whole (special tokens skipped), each time its new end.

  A token can hold part of a character (byte-level BPE splits UTF-8): while the decoded text ends
  in U+FFFD, the rest of the character may still come, so that text waits for the next token.
  strip=True leaves out leading and trailing whitespace, as `generate` does: whitespace waits
  until something follows it. Decoding everything each time (not the new tokens alone) keeps what
  tokenizers do across tokens (SentencePiece's word-start spaces); it is quadratic in the answer's
  length, and a fast tokenizer's decode is cheap next to a decoding step.
  """
  seen: list[int] = []
  shown = 0

  def ready(final: bool) -> str:
    text = tokenizer.decode(seen, skip_special_tokens=True)
    text = text if final else text.rstrip("\ufffd")  # at the end an incomplete character stays U+FFFD
    return text.strip() if strip else text

  for token in ids:
    seen.append(token)
    text = ready(final=False)
    if len(text) > shown:
      yield text[shown:]
      shown = len(text)
  text = ready(final=True)
  if len(text) > shown:
    yield text[shown:]


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
