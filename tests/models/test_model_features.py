"""Packing, attention implementations, config layouts, dtypes, remat and sampling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxtune
from jaxtune.generation import _sample, generate_ids
from jaxtune.models.config import from_hf_dict, load_config

import tiny_hf


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
  """Gemma 2 exercises the most: sliding and global layers, soft-caps, sandwich norms."""
  directory = tmp_path_factory.mktemp("gemma2")
  tiny_hf.build("gemma2", directory)
  return directory


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_row_equals_each_sequence_alone(family, tmp_path):
  tiny_hf.build(family, tmp_path)
  model = jaxtune.load_model(tmp_path)
  rng = np.random.default_rng(0)
  a, b = rng.integers(3, 128, size=11), rng.integers(3, 128, size=9)
  packed = np.concatenate([a, b, [0, 0, 0, 0]])[None]
  segments = np.array([[1] * 11 + [2] * 9 + [0] * 4])
  positions = np.array([list(range(11)) + list(range(9)) + [0] * 4])
  out = np.asarray(model(packed, segment_ids=segments, positions=positions))[0]
  alone_a = np.asarray(model(a[None]))[0]
  alone_b = np.asarray(model(b[None]))[0]
  np.testing.assert_allclose(out[:11], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[11:20], alone_b, atol=1e-5)


def test_dot_product_attention_path_matches_xla(tmp_path):
  tiny_hf.build("mistral", tmp_path)  # sliding window, GQA
  ids = np.random.default_rng(0).integers(3, 128, size=(2, 16))
  mask = np.ones((2, 16), np.int32)
  mask[1, 10:] = 0
  xla = np.asarray(jaxtune.load_model(tmp_path)(ids, mask))
  dpa = np.asarray(jaxtune.load_model(tmp_path, attention_impl="dot_product")(ids, mask))
  np.testing.assert_allclose(dpa[mask == 1], xla[mask == 1], atol=1e-5)


def test_fused_attention_refuses_softcapping(gemma2_dir):
  model = jaxtune.load_model(gemma2_dir, attention_impl="dot_product")
  with pytest.raises(ValueError, match="soft-capping"):
    model(np.ones((1, 4), np.int32))


def test_old_and_new_config_layouts_agree():
  rope = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
  )
  base = dict(
    model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4
  )
  new = from_hf_dict({**base, "rope_parameters": {**rope, "rope_theta": 500000.0}})
  old = from_hf_dict({**base, "rope_theta": 500000.0, "rope_scaling": rope})
  assert new == old and new.rope_full.rope_type == "llama3" and new.rope_full.theta == 500000.0
  g3 = dict(
    model_type="gemma3_text",
    vocab_size=10,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=12,
    num_attention_heads=4,
  )
  new3 = from_hf_dict(
    {
      **g3,
      "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
      },
    }
  )
  old3 = from_hf_dict(
    {**g3, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
  )
  assert new3 == old3
  assert new3.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)


def test_old_layout_checkpoint_matches_transformers(tmp_path):
  """A checkpoint whose config.json uses rope_theta/rope_scaling (pre-transformers-5)."""
  hf_model = tiny_hf.build("llama", tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  rope = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rope.pop("rope_theta")
  cfg["rope_scaling"] = rope
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  ids = np.random.default_rng(0).integers(3, 128, size=(1, 12))
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(jaxtune.load_model(tmp_path)(ids)), ref, atol=1e-4 * np.abs(ref).max())


def test_bfloat16_checkpoint_loads_into_any_dtype(tmp_path):
  hf_model = tiny_hf.build("qwen3", tmp_path, dtype=torch.bfloat16)
  f32 = jaxtune.load_model(tmp_path)
  bf16 = jaxtune.load_model(tmp_path, dtype="bfloat16")
  assert f32.embed[...].dtype == jnp.float32 and bf16.embed[...].dtype == jnp.bfloat16
  ref_embed = hf_model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(f32.embed[...]), ref_embed)  # bf16 -> f32 is exact
  ids = np.arange(3, 15)[None]
  a, b = np.asarray(f32(ids)), np.asarray(bf16(ids))
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


@pytest.mark.parametrize("policy", ["dots", "dots_no_batch", "full"])
def test_remat_policies_agree_on_loss_and_grads(gemma2_dir, policy):
  ids = np.arange(3, 19)[None]

  def loss_and_grad(remat):
    from flax import nnx

    model = jaxtune.load_model(gemma2_dir, remat=remat)
    return nnx.jit(nnx.value_and_grad(lambda m: m(ids).sum()))(model)  # one compile, not op by op

  (l0, g0), (l1, g1) = loss_and_grad("none"), loss_and_grad(policy)
  np.testing.assert_allclose(l0, l1, rtol=1e-5)  # fusion order differs; values do not
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_kv_cache_decoding_equals_full_forward(gemma2_dir):
  model = jaxtune.load_model(gemma2_dir)
  prompt = list(range(3, 15))
  new = generate_ids(model, [prompt], max_new_tokens=10)[0]
  full = np.asarray(model(np.array([prompt + new[:-1]])))[0]
  assert np.argmax(full[len(prompt) - 1 :], axis=-1).tolist() == new


def test_cudnn_models_decode_with_the_portable_path(tmp_path):
  """cuDNN serves the cache-free forward only: KV-cache decoding of a cudnn model runs XLA's path,
  so on CPU (no cuDNN) it generates exactly what the xla model does."""
  tiny_hf.build("llama", tmp_path)
  prompt = list(range(3, 15))
  want = generate_ids(jaxtune.load_model(tmp_path), [prompt], max_new_tokens=6)[0]
  assert generate_ids(jaxtune.load_model(tmp_path, attention_impl="cudnn"), [prompt], max_new_tokens=6)[0] == want


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)

  def draw(**kw):
    return np.array([int(_sample(logits, k, 1.0, kw.get("top_k"), kw.get("top_p"))[0]) for k in keys])

  assert set(draw(top_k=2)) == {0, 1}
  assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
  assert set(draw(top_p=0.4)) == {0}
  assert set(draw()) == {0, 1, 2, 3}
  assert int(_sample(logits, keys[0], 0.0, None, None)[0]) == 0


def test_generate_stops_at_stop_token(gemma2_dir):
  model = jaxtune.load_model(gemma2_dir)
  free = generate_ids(model, [[5, 6, 7]], max_new_tokens=8)[0]
  stopped = generate_ids(model, [[5, 6, 7]], max_new_tokens=8, stop_ids=[free[2]])[0]
  assert stopped == free[: free.index(free[2]) + 1]


def test_unsupported_model_type_lists_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
  with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
    load_config(tmp_path)


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_splash_attention_matches_xla_in_interpret_mode(family, tmp_path):
  """Pallas splash attention (TPU kernel, run by Pallas' interpreter on CPU) over packed rows with padding."""
  tiny_hf.build(family, tmp_path)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 128, size=(1, 128))
  segments = np.array([[1] * 50 + [2] * 70 + [0] * 8])
  positions = np.array([list(range(50)) + list(range(70)) + [0] * 8])
  xla = np.asarray(jaxtune.load_model(tmp_path)(ids, segment_ids=segments, positions=positions))
  splash = np.asarray(
    jaxtune.load_model(tmp_path, attention_impl="splash")(ids, segment_ids=segments, positions=positions)
  )
  real = segments[0] > 0
  np.testing.assert_allclose(splash[0, real], xla[0, real], atol=1e-4 * np.abs(xla).max())
