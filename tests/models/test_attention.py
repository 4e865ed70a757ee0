"""Attention against the plain softmax formula, values and gradients: the plain and chunked paths under both
kernels, and the fused call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtune
from jaxtune.generation import generate_ids
from jaxtune.models import attention as attn_lib
from jaxtune.models import cpu, kernels
from jaxtune.models.transformer import KVCache

import tiny_hf
from jaxprs import dot_result_types

B, T, N, K, H = 2, 6, 4, 2, 8


def _reference(q, k, v, mask, scale, softcap):
  """The textbook formula, no grouping tricks: repeat KV heads, softmax over keys."""
  k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision="highest") * scale
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, None], logits, attn_lib._MASKED)
  return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, -1), v, precision="highest")


def _grads(f, *args):
  """d f / d args, compiled once (op by op, the custom backward's many small ops each compile)."""
  return jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))(*args)


PATHS = [("xla", kernels.PLAIN), ("chunked", kernels.PLAIN), ("xla", cpu.CPU), ("chunked", cpu.CPU)]
PATH_IDS = ["xla-plain", "chunked-plain", "xla-cpu", "chunked-cpu"]


@pytest.mark.parametrize("impl, ops", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_values_and_gradients_match_the_formula(softcap, impl, ops):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k, v = jax.random.normal(ks[1], (B, T, K, H)), jax.random.normal(ks[2], (B, T, K, H))
  segments = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])  # packed row with a padding tail
  slots = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = attn_lib.attention_mask(slots, slots, segments, segments)
  assert not bool(mask[0, -1].any())  # the padding query sees nothing: a fully masked row
  cot = jax.random.normal(ks[3], (B, T, N, H))
  with jax.default_matmul_precision("highest"):
    f = lambda *a: jnp.sum(attn_lib.attend(*a, mask, scale=0.3, softcap=softcap, impl=impl, kernels=ops) * cot)
    g = lambda *a: jnp.sum(_reference(*a, mask, 0.3, softcap) * cot)
    np.testing.assert_allclose(
      jax.jit(attn_lib.attend, static_argnames=("scale", "softcap", "impl", "kernels"))(
        q, k, v, mask, scale=0.3, softcap=softcap, impl=impl, kernels=ops
      ),
      _reference(q, k, v, mask, 0.3, softcap),
      atol=1e-5,
    )
    got, want = _grads(f, q, k, v), _grads(g, q, k, v)
  for name, a, b in zip("qkv", got, want):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("ops", [kernels.PLAIN, cpu.CPU], ids=["plain", "cpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("T_new", [1, 3])
def test_cache_attention_matches_the_formula(T_new, softcap, dtype, ops):
  """Attention over a [B, K, S, H] cache: one new query (the CPU kernels' multiply-and-sum) or several (the
  products), with empty slots and a padded row, equals the formula on the same keys."""
  S = 7
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (B, T_new, N, H)).astype(dtype)
  k, v = (jax.random.normal(key, (B, S, K, H)).astype(dtype) for key in ks[1:])
  kv_seg = jnp.array([[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])  # left padding; the last slots not yet filled
  q_slots = jnp.broadcast_to(5 - T_new + jnp.arange(T_new), (B, T_new))
  mask = attn_lib.attention_mask(q_slots, jnp.broadcast_to(jnp.arange(S), (B, S)), jnp.ones((B, T_new)), kv_seg)
  got = jax.jit(attn_lib.attend_cache, static_argnames=("scale", "softcap", "kernels"))(
    q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, scale=0.3, softcap=softcap, kernels=ops
  )
  assert got.dtype == q.dtype
  f32 = lambda x: x.astype(jnp.float32)
  want = _reference(f32(q), f32(k), f32(v), mask, 0.3, softcap)
  np.testing.assert_allclose(f32(got), want, atol=1e-5 if dtype == "float32" else 2e-2)


def test_decoding_gives_the_same_tokens_under_both_kernels(tmp_path):
  """Greedy decoding under the CPU kernels (layers sliced once per call, one-query attention as multiply-and-sum)
  gives the tokens of the plain program (layers sliced in every step, attention as products), and both those of
  the cache-free forward."""
  tiny_hf.build("gemma2", tmp_path)  # soft-capping and sliding layers through the cache
  prompts = [list(range(3, 15)), list(range(20, 25))]
  got = {
    name: generate_ids(jaxtune.load_model(tmp_path, kernels=name), prompts, max_new_tokens=12)
    for name in ("plain", "cpu")
  }
  assert got["plain"] == got["cpu"]
  model = jaxtune.load_model(tmp_path, kernels="plain")
  for prompt, new in zip(prompts, got["cpu"]):
    full = np.asarray(model(np.array([prompt + new[:-1]])))[0]
    assert np.argmax(full[len(prompt) - 1 :], axis=-1).tolist() == new


@pytest.mark.parametrize("impl, ops", PATHS, ids=PATH_IDS)
def test_bfloat16_stays_close_and_takes_float32_result_products_with_the_cpu_kernels(impl, ops):
  """bf16 attention: with the CPU kernels every product returns float32 (the fast path on CPU,
  models/cpu.product), and the gradients stay within bf16 error of the float32 ones."""
  ks = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k, v = jax.random.normal(ks[1], (B, T, K, H)), jax.random.normal(ks[2], (B, T, K, H))
  slots = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = attn_lib.attention_mask(slots, slots, jnp.ones((B, T), jnp.int32), jnp.ones((B, T), jnp.int32))
  cot = jax.random.normal(ks[3], (B, T, N, H))

  def f(q, k, v):
    out = attn_lib.attend(q, k, v, mask, scale=0.3, impl=impl, kernels=ops)
    return jnp.sum((out * cot.astype(q.dtype)).astype(jnp.float32))

  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  if ops is cpu.CPU:
    assert dot_result_types(jax.grad(f, (0, 1, 2)), *bf16) == {"float32"}
  with jax.default_matmul_precision("highest"):
    want = _grads(f, q, k, v)
  for name, a, b in zip("qkv", _grads(f, *bf16), want):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.03 * float(np.abs(b).max()), err_msg=f"d{name}")


def _packed_rows(seed, window=None):
  """q, k, v of 12 positions, the mask of a packed row with a padding tail and of a plain row, the
  real (non-padding) queries [B, T, 1, 1], and a cotangent that is zero on padding rows (whose
  outputs are never used)."""
  T2 = 12
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, T2, N, H))
  k, v = jax.random.normal(ks[1], (B, T2, K, H)), jax.random.normal(ks[2], (B, T2, K, H))
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 0, 0], [1] * T2])
  slots = jnp.broadcast_to(jnp.arange(T2), (B, T2))
  mask = attn_lib.attention_mask(slots, slots, segments, segments, window)
  real = (segments != 0)[:, :, None, None]
  return q, k, v, mask, real, jax.random.normal(ks[3], (B, T2, N, H)) * real


@pytest.mark.parametrize("ops", [kernels.PLAIN, cpu.CPU], ids=["plain", "cpu"])
@pytest.mark.parametrize("blocks, window, softcap", [(2, None, None), (3, None, 2.0), (4, 5, None), (6, 3, None)])
def test_causal_blocks_match_the_formula(blocks, window, softcap, ops):
  """Skipping the blocks above the diagonal changes nothing a real (non-padding) query sees: values and gradients."""
  q, k, v, mask, real, cot = _packed_rows(1, window)
  with jax.default_matmul_precision("highest"):
    f = lambda *a: jnp.sum(
      attn_lib.attend(
        *a, mask, scale=0.3, softcap=softcap, impl="chunked", kernels=ops, causal=True, causal_blocks=blocks
      )
      * cot
    )
    g = lambda *a: jnp.sum(_reference(*a, mask, 0.3, softcap) * cot)
    out = jax.jit(attn_lib.attend, static_argnames=("scale", "softcap", "impl", "kernels", "causal", "causal_blocks"))(
      q, k, v, mask, scale=0.3, softcap=softcap, impl="chunked", kernels=ops, causal=True, causal_blocks=blocks
    )
    np.testing.assert_allclose(out * real, _reference(q, k, v, mask, 0.3, softcap) * real, atol=1e-5)
    got, want = _grads(f, q, k, v), _grads(g, q, k, v)
  for name, a, b in zip("qkv", got, want):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")


def test_fused_path_told_causal_matches_the_formula():
  """impl="dot_product" is jax.nn.dot_product_attention, the call cuDNN runs behind; causal=True adds
  is_causal to the packed mask, which must change nothing a real query sees: values and gradients."""
  q, k, v, mask, real, cot = _packed_rows(2)
  with jax.default_matmul_precision("highest"):
    f = lambda *a: jnp.sum(attn_lib.attend(*a, mask, scale=0.3, impl="dot_product", causal=True) * cot)
    g = lambda *a: jnp.sum(_reference(*a, mask, 0.3, None) * cot)
    out = attn_lib.attend(q, k, v, mask, scale=0.3, impl="dot_product", causal=True)
    np.testing.assert_allclose(out * real, _reference(q, k, v, mask, 0.3, None) * real, atol=1e-5)
    for name, a, b in zip("qkv", _grads(f, q, k, v), _grads(g, q, k, v)):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")


def test_model_tells_the_fused_kernel_causal_only_without_a_cache(monkeypatch, tmp_path):
  """A forward pass without a KV cache passes is_causal=True to cuDNN's call; decoding with a cache
  runs the XLA path (its key slots are not the query slots) and never reaches that call."""
  calls = []
  plain = jax.nn.dot_product_attention

  def record(*args, is_causal=False, implementation=None, **kwargs):  # cuDNN's call, run by XLA on CPU
    calls.append((implementation, is_causal))
    return plain(*args, is_causal=is_causal, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", record)
  tiny_hf.build("llama", tmp_path)
  model = jaxtune.load_model(tmp_path, attention_impl="cudnn")
  model(np.arange(3, 11)[None])
  assert calls and set(calls) == {("cudnn", True)}
  seen = len(calls)
  cache = KVCache.create(model.config, 1, 8)  # prefill through a cache, as generation does
  model.hidden_states(np.arange(3, 6)[None], cache=cache)
  assert len(calls) == seen


@pytest.mark.parametrize("T, want", [(32, 1), (255, 1), (256, 2), (300, 2), (512, 4), (1024, 8), (8192, 8), (4099, 1)])
def test_causal_block_count(T, want):
  assert cpu.causal_block_count(T) == want
  assert cpu.CPU.causal_blocks(T) == want and kernels.PLAIN.causal_blocks(T) == 1


EVEN = (256, 2048)  # row lengths


@pytest.mark.parametrize(
  "platform, dtype, head_dim, softcap, lens, want",
  [
    ("gpu", "bfloat16", 64, None, EVEN, "cudnn"),  # Llama 3.2 1B, measured 1.27x / 1.20x on an H200
    ("gpu", "float16", 128, None, EVEN, "cudnn"),
    ("gpu", "float32", 64, None, EVEN, "chunked"),  # cuDNN's fused kernel takes 16-bit inputs only
    ("gpu", "bfloat16", 256, 50.0, EVEN, "chunked"),  # Gemma 2: soft-capped logits
    ("gpu", "bfloat16", 256, None, EVEN, "chunked"),  # Gemma 3: head dim above 128
    ("gpu", "bfloat16", 60, None, EVEN, "chunked"),  # not a multiple of 8
    ("gpu", "bfloat16", 64, None, (64, 127), "chunked"),  # an odd row length: the masked kernel needs even ones
    ("cpu", "bfloat16", 64, None, EVEN, "chunked"),
    ("tpu", "bfloat16", 128, None, EVEN, "chunked"),  # splash stays opt-in
  ],
)
def test_auto_impl_picks_cudnn_only_where_it_applies(platform, dtype, head_dim, softcap, lens, want):
  impl, why = attn_lib.auto_impl(platform, dtype, head_dim, softcap, lens)
  assert impl == want and why
