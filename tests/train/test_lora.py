"""LoRA as a parameter-tree transform: shapes, axes, targets, exactness at init, merging, dropout, PEFT parity."""

import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.hf.load import init_model, load_model
from jaxtune.models import kernels
from jaxtune.models.config import from_hf_dict
from jaxtune.models.options import ModelOptions
from jaxtune.models.transformer import Linear
from jaxtune.peft import lora

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "models"))
import tiny_configs
import tiny_hf

TINY = tiny_configs.LLAMA
IDS = np.random.default_rng(0).integers(3, 128, size=(2, 12)).astype(np.int32)


def _model(hf: dict, **options) -> nnx.Module:
  return init_model(from_hf_dict(hf), seed=0, options=ModelOptions(**options))


@nnx.jit
def _logits(model, ids):  # eager calls would recompile the layer scan every time
  return model(ids)


@pytest.fixture(scope="module")
def base():
  return init_model(from_hf_dict(TINY), seed=0)


def _with_lora(base, **kwargs):
  model = nnx.clone(base)
  kwargs = {"rank": 4, "alpha": 8.0, "rngs": nnx.Rngs(1), **kwargs}
  return lora.apply_lora(model, **kwargs)


def _randomize_b(model, seed=2):
  rng = np.random.default_rng(seed)  # numpy: no compile per shape
  for _, m in nnx.iter_modules(model):
    if isinstance(m, lora.LoRA):
      m.lora_b.set_value(jnp.asarray(0.1 * rng.standard_normal(m.lora_b.shape), m.lora_b.dtype))


def test_shapes_axes_and_scale(base):
  model = _with_lora(base, rank=4, alpha=8.0)
  q, o, down = model.layers.attn.q.adapter, model.layers.attn.o.adapter, model.layers.mlp.down.adapter
  assert q.lora_a.shape == (2, 64, 4) and q.lora_b.shape == (2, 4, 4, 24)
  assert o.lora_a.shape == (2, 4, 24, 4) and o.lora_b.shape == (2, 4, 64)
  assert down.lora_a.shape == (2, 96, 4) and down.lora_b.shape == (2, 4, 64)
  assert q.lora_a.get_metadata()["axes"] == ("layers", "embed", "lora_rank")
  assert q.lora_b.get_metadata()["axes"] == ("layers", "lora_rank", "heads", "head_dim")
  assert o.lora_a.get_metadata()["axes"] == ("layers", "heads", "head_dim", "lora_rank")
  assert isinstance(q.lora_a, lora.LoRAParam) and q.lora_a.dtype == jnp.float32
  assert q.scale == 2.0 and np.all(np.asarray(q.lora_b[...]) == 0)
  bound = 1 / np.sqrt(4 * 24)  # PEFT's kaiming-uniform bound 1/sqrt(fan_in) for o's A
  a = np.asarray(o.lora_a[...])
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
  assert not np.array_equal(a[0], a[1])  # each layer of the stack gets its own draw
  assert _with_lora(base, rank=4, alpha=8.0, use_rslora=True).layers.attn.q.adapter.scale == 4.0
  assert model.lm_head.adapter is None and base.layers.attn.q.adapter is None  # the base is untouched


@pytest.mark.parametrize(
  "targets, expected",
  [
    (["q_proj", "v"], {"q", "v"}),
    (r"layers\.mlp\..*", {"gate", "up", "down"}),
    (["lm_head"], {"lm_head"}),
    ("down_proj", {"down"}),  # one name, not a regex
    ("q_proj, v", {"q", "v"}),  # comma-separated names (Axolotl's lora_target_modules)
    ("all-linear", {"q", "k", "v", "o", "gate", "up", "down"}),
  ],
)
def test_targets(base, targets, expected):
  model = _with_lora(base, targets=targets)
  adapted = {w.path[-1] for w in lora.lora_weights(model)}
  assert adapted == expected


def test_target_errors(base):
  with pytest.raises(ValueError, match="name no linear layer"):
    _with_lora(base, targets=["qkv_proj"])
  with pytest.raises(ValueError, match="matched no linear layer"):
    _with_lora(base, targets="attn.q")  # a regex must match the whole dotted path
  with pytest.raises(ValueError, match="already has an adapter"):
    lora.apply_lora(_with_lora(base), rank=2, alpha=2, rngs=nnx.Rngs(0))


def test_zero_b_gives_exactly_the_base_logits(base):
  model = _with_lora(base, targets=r".*")  # lm_head included
  np.testing.assert_array_equal(np.asarray(_logits(model, IDS)), np.asarray(_logits(base, IDS)))


def test_merged_kernels_give_the_adapter_model_logits(base):
  model = _with_lora(base, targets=r".*")  # as in the test above: the compiled forward is reused
  _randomize_b(model)
  out = np.asarray(_logits(model, IDS))
  assert np.abs(out - np.asarray(_logits(base, IDS))).max() > 1e-2  # the adapters do something
  merged = lora.merge_lora(model)
  assert len(merged) == 8 and all(v.dtype == jnp.float32 for v in merged.values())
  unloaded = lora.merge_and_unload(model)
  assert unloaded.layers.attn.q.adapter is None and model.layers.attn.q.adapter is not None
  np.testing.assert_allclose(np.asarray(_logits(unloaded, IDS)), out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("targets, groups", [("all-linear", [2, 3]), (["q_proj", "v_proj"], [2])])
def test_shared_input_adapters_match_separate_ones(base, monkeypatch, targets, groups):
  """Adapters on one input (q/k/v, gate/up; or PEFT's default q and v) run as one A product: same loss and
  LoRA gradients as one adapter at a time."""
  model = _with_lora(base, targets=targets)
  _randomize_b(model)
  graphdef, params, rest = nnx.split(model, lora.LoRAParam, ...)
  calls = []

  def loss_and_grads(params, rest):  # jitted afresh for each path: the adapters' choice is made when tracing
    def loss(params):
      return jnp.sum(jnp.tanh(nnx.merge(graphdef, params, rest)(IDS)))

    return jax.value_and_grad(loss)(params)

  real = kernels.PlainKernels.lora
  monkeypatch.setattr(
    kernels.PlainKernels,
    "lora",
    lambda self, x, a_spec, b_specs, a, *rest: calls.append(len(a)) or real(self, x, a_spec, b_specs, a, *rest),
  )
  shared = jax.jit(loss_and_grads)(params, rest)
  assert sorted(set(calls) - {1}) == groups  # adapters per shared product (1: the separate ones)
  monkeypatch.setattr(lora.LoRA, "shared_deltas", staticmethod(lambda adapters, x: None))
  separate = jax.jit(loss_and_grads)(params, rest)
  np.testing.assert_allclose(shared[0], separate[0], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(shared[1]), jax.tree.leaves(separate[1])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_dropout_is_off_by_default_and_keyed(base):
  model = _with_lora(base, dropout=0.5)
  _randomize_b(model)
  plain = np.asarray(_logits(model, IDS))
  np.testing.assert_array_equal(np.asarray(_logits(model, IDS)), plain)  # deterministic by default
  model.set_attributes(deterministic=False)
  first, again = np.asarray(_logits(model, IDS)), np.asarray(_logits(model, IDS))
  np.testing.assert_array_equal(first, again)  # the mask comes from the stored keys
  assert np.abs(first - plain).max() > 1e-3
  keys = nnx.to_pure_dict(nnx.state(model, lora.LoRADropoutKey))
  nnx.update(model, lora.refresh_dropout_keys(keys, jax.random.key(7)))
  assert np.abs(np.asarray(_logits(model, IDS)) - first).max() > 1e-3


def test_dora_starts_as_the_base_and_merges_into_its_kernels(base):
  model = _with_lora(base, use_dora=True)
  q, o = model.layers.attn.q.adapter, model.layers.attn.o.adapter
  assert isinstance(q.lora_magnitude, lora.LoRAParam) and q.lora_magnitude.shape == (2, 4, 24)
  assert q.lora_magnitude.get_metadata()["axes"] == ("layers", "heads", "head_dim")  # the kernel's output axes
  assert o.lora_magnitude.get_metadata()["axes"] == ("layers", "embed")
  kernel = np.asarray(base.layers.attn.q.kernel[...])  # [L, D, N, H]: a row of HF's [N*H, D] is one (n, h)
  np.testing.assert_allclose(np.asarray(q.lora_magnitude[...]), np.linalg.norm(kernel, axis=1), rtol=1e-6)
  base_logits = np.asarray(_logits(base, IDS))
  np.testing.assert_allclose(np.asarray(_logits(model, IDS)), base_logits, atol=1e-6)  # B = 0: m / ||W|| = 1
  _randomize_b(model)
  rng = np.random.default_rng(3)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, lora.LoRA):
      m.lora_magnitude.set_value(m.lora_magnitude[...] * (1 + 0.2 * rng.standard_normal(m.lora_magnitude.shape)))
  out = np.asarray(_logits(model, IDS))
  assert np.abs(out - base_logits).max() > 1e-2
  unloaded = lora.merge_and_unload(model)
  np.testing.assert_allclose(np.asarray(_logits(unloaded, IDS)), out, atol=2e-5, rtol=1e-5)


@pytest.mark.slow  # quantising the tiny model at init takes seconds
def test_dora_on_a_quantised_base_is_dora_on_its_dequantised_weights():
  """NF4 base (double quantisation): the magnitudes start at the dequantised rows' norms, and the model with
  moved adapters gives the logits of the same adapters on a 16-bit base holding the dequantised kernels."""
  hf = {**TINY, "head_dim": 32}  # every innermost input axis (64, 32, 96) a multiple of the block
  quantised = lora.apply_lora(
    _model(hf, quantize="nf4", quant_block=32, double_quant=True), rank=4, alpha=8.0, use_dora=True, rngs=nnx.Rngs(1)
  )
  _randomize_b(quantised)
  plain = _model(hf)
  for (_, q), (_, p) in zip(lora._linears(quantised), lora._linears(plain), strict=True):
    if q.quantized:
      p.kernel.set_value(q.kernel_value())
    else:  # the LM head stays 16-bit
      p.kernel.set_value(q.kernel[...])
  q = quantised.layers.attn.q
  assert q.quantized
  np.testing.assert_allclose(
    np.asarray(q.adapter.lora_magnitude[...]), np.linalg.norm(np.asarray(q.kernel_value()), axis=1), rtol=1e-6
  )
  twin = lora.apply_lora(plain, rank=4, alpha=8.0, use_dora=True, rngs=nnx.Rngs(1))
  nnx.update(twin, nnx.state(quantised, lora.LoRAParam))
  np.testing.assert_allclose(np.asarray(_logits(quantised, IDS)), np.asarray(_logits(twin, IDS)), atol=1e-5)


def test_dora_keeps_nothing_weight_sized_for_the_backward(capsys):
  """The weight norm is computed without forming B A, so remat's dots policy finds no weight-sized product to
  keep per layer (keeping B A would cost a copy of every adapted weight)."""
  model = _with_lora(_model(TINY, remat="dots_no_batch", attention_impl="chunked"), use_dora=True)
  kernels = {tuple(m.kernel.shape) for _, m in nnx.iter_modules(model) if isinstance(m, Linear)}
  shapes = _saved_layer_residuals(model, capsys)
  assert shapes and not kernels & set(shapes), shapes


def test_forward_and_export_match_peft(tmp_path, peft):
  """Our adapters exported with peft_state_dict, loaded into PEFT, give the same logits as our model."""
  import torch

  hf_model = tiny_hf.build("llama", tmp_path)  # head_dim != hidden / heads, llama3 rope
  model = lora.apply_lora(load_model(tmp_path), rank=4, alpha=6.0, use_rslora=True, rngs=nnx.Rngs(3))
  _randomize_b(model)
  config = lora.peft_config(model)
  assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
  peft_model = peft.get_peft_model(
    hf_model, peft.LoraConfig(r=4, lora_alpha=6.0, use_rslora=True, target_modules="all-linear", lora_dropout=0.0)
  )
  tensors = lora.peft_state_dict(model)
  assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
  assert tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"].shape == (4 * 24, 4)
  result = peft.set_peft_model_state_dict(peft_model, {k: torch.from_numpy(v) for k, v in tensors.items()})
  assert not [k for k in result.unexpected_keys if "lora" in k]
  assert len(tensors) == 2 * 7 * 3
  peft_model.eval()
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(_logits(model, IDS)), ref, atol=1e-4, rtol=1e-4)  # B != 0: adapters matter


def _saved_layer_residuals(model, capsys, ids=IDS, with_dtypes=False) -> list:
  """Shapes (or (dtype, shape)) of what the backward of the adapters' gradient keeps from the layer scan ([L, ...]
  each)."""
  graphdef, adapters, rest = nnx.split(model, lora.LoRAParam, ...)
  jax.ad_checkpoint.print_saved_residuals(
    lambda p: nnx.merge(graphdef, p, rest)(jnp.asarray(ids)).astype(jnp.float32).sum(), adapters
  )
  out = []
  for line in capsys.readouterr().out.splitlines():
    if "output of scan" in line:
      dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
      shape = tuple(int(d) for d in dims.split(",") if d)
      out.append((dtype, shape) if with_dtypes else shape)
  return out


@pytest.mark.parametrize("remat", ["dots_no_batch", "dots"])
def test_remat_saves_each_adapted_output_once(remat, capsys):
  """Under the dots policies the backward keeps base + delta as one array per projection, not both products,
  and q, k and v only as the attention reads them (after rope, grouped by KV head)."""
  shapes = _saved_layer_residuals(_with_lora(_model(TINY, remat=remat, attention_impl="chunked")), capsys)
  sizes = [math.prod(s) for s in shapes]
  L, (B, T), D, F = TINY["num_hidden_layers"], IDS.shape, TINY["hidden_size"], TINY["intermediate_size"]
  N, K, H = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["head_dim"]
  assert N * H == F  # so q's output and gate's and up's have one size
  # One saved array per adapted output, not two (the base product and the adapter's): only their sum is read back.
  assert sizes.count(L * B * T * N * H) == 4  # q, gate, up, and the attention output (its own name)
  assert sizes.count(L * B * T * K * H) == 2  # k, v
  assert sizes.count(L * B * T * D) == 2  # o, down
  # q, k and v are kept after rope, in the attention's grouped layout, so the backward recomputes
  # neither rope nor the transposes; the projections' own outputs are not kept besides.
  assert shapes.count((L, B, K, N // K, T, H)) == 2  # q and the attention output
  assert shapes.count((L, B, K, T, H)) == 2  # k, v


def test_remat_keeps_sixteen_bit_outputs_as_bits_on_cpu(capsys):
  """A bfloat16 model on CPU keeps its named arrays and each layer's input as their uint16 bits: XLA's CPU backend
  writes a layer into a uint16 stack in place, where it converts a whole bfloat16 stack to float32 and back for
  every layer (a bf16 LoRA step on an AMD EPYC Zen 4: 3.18 s with bf16 stacks, 2.73 s with uint16)."""
  model = _model(
    TINY, remat="dots_no_batch", dtype="bfloat16", param_dtype="bfloat16", kernels="cpu", attention_impl="chunked"
  )
  kept = _saved_layer_residuals(_with_lora(model), capsys, with_dtypes=True)
  L, (B, T), D, F = TINY["num_hidden_layers"], IDS.shape, TINY["hidden_size"], TINY["intermediate_size"]
  N, K, H = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["head_dim"]
  bits = sorted(shape for dtype, shape in kept if dtype == "u16")
  assert bits == sorted(
    [(L, B, K, N // K, T, H)] * 2
    + [(L, B, K, T, H)] * 2  # q and the attention output; k, v
    + [(L, B, T, D)] * 2
    + [(L, B, T, F)] * 2
  ), kept  # the layer input and an adapted o; gate, up
  assert "bf16" not in {dtype for dtype, _ in kept}, kept  # the rest: float32 softmax statistics and LoRA x A


def test_remat_with_qk_norms_keeps_q_and_k_once(capsys):
  """q/k norms read the projections' outputs in the backward, so those are kept, and q, k and v are
  not kept a second time after rope (Qwen3 and Gemma 3 keep the recompute and save the memory)."""
  model = _with_lora(_model({**TINY, "model_type": "qwen3"}, remat="dots_no_batch", attention_impl="chunked"))
  shapes = _saved_layer_residuals(model, capsys)
  L, (B, T) = TINY["num_hidden_layers"], IDS.shape
  N, K, H = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["head_dim"]
  assert shapes.count((L, B, K, N // K, T, H)) == 1  # the attention output only
  assert shapes.count((L, B, K, T, H)) == 0
  assert [math.prod(s) for s in shapes].count(L * B * T * K * H) == 2  # k and v, as projected


def test_remat_keeps_cudnn_attention_outputs(monkeypatch, capsys):
  """cuDNN's attention names none of its residuals: the dots policies keep its forward's output and
  softmax statistics by primitive, so the backward does not rerun the forward. Traced on CPU (no
  compile), with jax's cuDNN version probe answered."""
  from jax._src.cudnn import fused_attention_stablehlo

  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
  model = _model(TINY, remat="dots_no_batch", attention_impl="cudnn", dtype="bfloat16", param_dtype="bfloat16")
  shapes = _saved_layer_residuals(_with_lora(model), capsys)
  L, (B, T) = TINY["num_hidden_layers"], IDS.shape
  N, K, H = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["head_dim"]
  assert (L, B, N, T) in shapes  # the softmax statistics
  assert shapes.count((L, B, T, N, H)) == 2  # q after rope, and the attention output
  assert shapes.count((L, B, T, K, H)) == 2  # k after rope, v


def test_remat_keeps_splash_inputs_as_the_kernel_reads_them(capsys):
  """Splash attention (traced on CPU) keeps q scaled and head-major, and k and v before their heads are
  repeated, in place of the projections' outputs; its forward's statistics are not kept."""
  model = _model({**TINY, "head_dim": 128}, remat="dots_no_batch", attention_impl="splash", interpret=True)
  ids = np.random.default_rng(0).integers(3, 128, size=(1, 128)).astype(np.int32)  # splash: T % 128 == 0
  shapes = _saved_layer_residuals(_with_lora(model), capsys, ids)
  L, N, K = TINY["num_hidden_layers"], TINY["num_attention_heads"], TINY["num_key_value_heads"]
  assert (L, 1, N, 128, 128) in shapes  # q: [B, N, T, H]
  assert (L, 1, 128, N, 128) not in shapes  # not the projection's [B, T, N, H] besides
  assert shapes.count((L, 1, 128, K, 128)) == 2  # k, v
  assert (L, N, 128, 128) not in shapes  # the kernel's output and [N, T, lanes] statistics: rerun in the backward
