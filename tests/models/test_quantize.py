"""Quantised frozen bases: NF4 and int8 codes and scales equal bitsandbytes', the loader quantises as it reads,
products read the dequantised kernel, the backward keeps no 16-bit copy, and bad settings fail naming the fix."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.hf.load import load_model
from jaxtune.hf.safetensors_io import Checkpoint
from jaxtune.models import quantize as q
from jaxtune.models.config import ModelConfigError, from_hf_dict, load_config
from jaxtune.models.options import ModelOptions
from jaxtune.models.transformer import CausalLM, Linear

import tiny_configs
import tiny_hf

bnb = pytest.importorskip("bitsandbytes.functional", reason="the test extra installs bitsandbytes")


def test_dynamic_code_is_bitsandbytes():
  np.testing.assert_array_equal(q.DYNAMIC, bnb.create_dynamic_map().numpy())


@pytest.mark.parametrize(
  "out_dim, in_dim, block, double, dtype",
  [
    (96, 128, 64, False, torch.float32),
    (96, 128, 64, True, torch.float32),
    (300, 512, 64, True, torch.bfloat16),  # 2,400 absmax values: a partial last block of 256
    (64, 4096, 128, True, torch.float16),
    (1000, 256, 32, True, torch.float32),
  ],
)
def test_nf4_codes_and_scales_are_bitsandbytes(out_dim, in_dim, block, double, dtype):
  rng = np.random.default_rng(out_dim)
  hf = torch.from_numpy(0.02 * rng.standard_normal((out_dim, in_dim)).astype(np.float32)).to(dtype)
  packed, state = bnb.quantize_4bit(hf, blocksize=block, compress_statistics=double, quant_type="nf4")
  # ours: the kernel [in, out] (HF's transpose); the offset is bitsandbytes' own, whose float32 mean depends
  # on torch's summation order (tested apart below)
  offset = state.offset.item() if double else None
  ours = q.quantize_layer(
    jnp.asarray(hf.float().numpy().T), kind="nf4", n_ins=1, block=block, double=double, offset=offset
  )
  np.testing.assert_array_equal(np.asarray(ours["codes"]).T.reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(ours["absmax"]).T.reshape(-1), state.absmax.numpy())
  if double:
    np.testing.assert_array_equal(np.asarray(ours["absmax2"]), state.state2.absmax.numpy())
    mean = q.quantize_layer(jnp.asarray(hf.float().numpy().T), kind="nf4", n_ins=1, block=block, double=True)["offset"]
    assert abs(float(mean) - offset) <= 2 * np.spacing(np.float32(offset))
  deq = q.dequantize_layer(ours, kind="nf4", n_ins=1, block=block).astype(str(dtype).removeprefix("torch."))
  np.testing.assert_array_equal(np.asarray(deq, np.float32).T, bnb.dequantize_4bit(packed, state).float().numpy())


def test_int8_is_bitsandbytes_vectorwise():
  rng = np.random.default_rng(0)
  hf = (0.02 * rng.standard_normal((96, 256))).astype(np.float32)
  hf[5] = 0.0  # an all-zero row
  codes, stats, _ = bnb.int8_vectorwise_quant(torch.from_numpy(hf.copy()))
  ours = q.quantize_layer(jnp.asarray(hf.T), kind="int8", n_ins=1)
  np.testing.assert_array_equal(np.asarray(ours["codes"]).T, codes.numpy())
  np.testing.assert_array_equal(np.asarray(ours["absmax"]), stats.numpy())
  deq = bnb.int8_vectorwise_dequant(codes, stats).numpy()
  np.testing.assert_array_equal(
    np.asarray(q.dequantize_layer(ours, kind="int8", n_ins=1)).T[np.arange(96) != 5], deq[np.arange(96) != 5]
  )


@pytest.fixture(scope="module")
def quant_llama(tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("quant_llama")
  tiny_hf.build("llama", directory, **tiny_configs.QUANT_SIZES)
  return directory


def _hf(x: np.ndarray, n_ins: int) -> np.ndarray:
  """One layer's [ins..., outs...] array in HF's [out, in] layout."""
  return x.reshape(int(np.prod(x.shape[:n_ins])), -1).T


@pytest.mark.parametrize("kind, double", [("nf4", False), ("nf4", True), ("int8", False)])
def test_loader_quantises_every_layer_weight_as_bitsandbytes(quant_llama, kind, double):
  model = load_model(quant_llama, quantize=kind, double_quant=double)
  source = dict(Checkpoint(quant_llama).items())
  weights = {  # ours, its number of input axes, HF's module
    "q": (model.layers.attn.q, 1, "self_attn.q_proj"),
    "o": (model.layers.attn.o, 2, "self_attn.o_proj"),  # [N, H, D]: blocks along head_dim
    "up": (model.layers.mlp.up, 1, "mlp.up_proj"),
    "down": (model.layers.mlp.down, 1, "mlp.down_proj"),
  }
  for linear, n_ins, hf_name in weights.values():
    assert linear.quantized and linear.kernel.kind == kind
    for i in range(model.config.num_layers):
      w = torch.from_numpy(source[f"model.layers.{i}.{hf_name}.weight"])
      if kind == "int8":
        codes, stats, _ = bnb.int8_vectorwise_quant(w.clone())
        want = bnb.int8_vectorwise_dequant(codes, stats).numpy()
      else:
        packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type="nf4")
        want = bnb.dequantize_4bit(packed, state).numpy()
      if kind == "nf4":  # the NF4 codes themselves, in HF's flat order, with or without double quantisation
        stored = _hf(np.asarray(linear.kernel.codes[...][i]), n_ins)
        np.testing.assert_array_equal(stored.reshape(-1), packed.numpy().reshape(-1), err_msg=f"{hf_name} {i}")
      got = _hf(np.asarray(linear.kernel_value(i)), n_ins)
      if not double:
        np.testing.assert_array_equal(got, want, err_msg=f"{hf_name} {i}")
      else:  # the absmax mean can differ from torch's in its last bit (above): every absmax moves by about that
        # much, and the few whose 8-bit code sits on a rounding edge move one code step
        stepped = np.abs(got - want) > 1e-6
        assert stepped.mean() < 0.005 and np.abs(got - want).max() < 2e-4, (hf_name, i, stepped.mean())
  assert not model.lm_head.quantized and model.embed[...].dtype == jnp.float32  # head and embeddings stay as loaded


@pytest.mark.slow  # also shown, through PEFT, by tests/export/test_qlora_export.py
def test_quantised_product_is_the_dequantised_kernels_product(quant_llama):
  model = load_model(quant_llama, quantize="nf4", double_quant=True)
  plain = load_model(quant_llama)  # given the dequantised kernels, a plain model computes the same logits
  plain_linears = dict(nnx.iter_modules(plain))
  for path, ours in nnx.iter_modules(model):
    if isinstance(ours, Linear) and ours.quantized:
      plain_linears[path].kernel.set_value(ours.kernel.value())
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 12)))
  np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(plain(ids)), rtol=0, atol=1e-5)


def test_backward_keeps_no_dequantised_kernel_per_layer():
  """XLA's temporaries of a LoRA step without remat grow per layer by far less than one layer's kernels: the
  backward dequantises again instead of saving each layer's kernel (saved, they would add 7.9 MB a layer here)."""
  from jaxtune.parallel import dry_run
  from jaxtune.parallel import mesh as mesh_lib
  from jaxtune.train import optim

  mesh = mesh_lib.make_mesh(mesh_lib.mesh_config(), jax.devices()[:1])
  opt = optim.make_optimizer(optim.optim_config(), 10)
  sizes = {**tiny_configs.LLAMA, **tiny_configs.QUANT_SIZES, "intermediate_size": 1024}  # large kernels, few tokens
  temps = []
  for layers in (1, 3):
    cfg = from_hf_dict({**sizes, "num_hidden_layers": layers})
    options = ModelOptions(quantize="nf4", remat="none", kernels="cpu")
    report = dry_run.compile_report(
      cfg, options, mesh, mesh_lib.RULES, method="lora", lora_rank=4, optimizer=opt, rows=1, seq=8, constrain=False
    )
    temps.append(report.temp)
  kernel_bytes = 4 * sum(np.prod(s) for s in [(512, 4, 64)] * 2 + [(512, 2, 64)] * 2 + [(512, 1024)] * 3)
  assert (temps[1] - temps[0]) / 2 < 0.1 * kernel_bytes, (temps, kernel_bytes)


# --- bad input -------------------------------------------------------------------------------------------------


def test_a_block_that_does_not_fit_names_the_tensor_and_the_blocks_that_do(quant_llama):
  with pytest.raises(
    ConfigError,
    match=r"128 does not divide model\.layers\.0\.self_attn\.o_proj\.weight's innermost input axis "
    r"\(head_dim, 64\).*\(32, 64\)",
  ):
    load_model(quant_llama, quantize="nf4", quant_block=128)


def test_a_mesh_that_splits_a_block_is_refused():
  kernel = nnx.eval_shape(
    lambda: q.QuantizedKernel(
      jnp.zeros((2, 512, 4, 64)), ("layers", "embed", "heads", "head_dim"), kind="nf4", n_ins=1, n_stack=1
    )
  )

  class Split:  # a sharding that splits the codes' input axis 16 ways: 32 weights per shard < 64
    def shard_shape(self, shape):
      return (shape[0], shape[1] // 16) + tuple(shape[2:])

  problem = q.shard_problem(kernel, Split())
  assert "splits its innermost input axis (embed, 512) into 16 shards of 32" in problem
  assert q.shard_problem(kernel, type("Whole", (), {"shard_shape": lambda self, s: s})()) is None


def test_config_refuses_full_fine_tuning_unknown_kinds_and_blocks(tmp_path):
  from jaxtune.train import config as config_lib

  def check(**changes):
    config = config_lib.default_config()
    config.output_dir, config.model.path = str(tmp_path), "tiny-random"
    for key, value in changes.items():
      section, leaf = key.split("__")
      config[section][leaf] = value
    config_lib.validate(config)

  with pytest.raises(ConfigError, match="model.quantize.*a quantised base is frozen.*peft.method=lora"):
    check(model__quantize="nf4", peft__method="full")
  with pytest.raises(ConfigError, match="model.quantize"):
    check(model__quantize="nf3")
  with pytest.raises(ConfigError, match="model.quantize_block.*48 is not a bitsandbytes block size"):
    check(model__quantize="nf4", model__quantize_block=48)


def test_pre_quantised_checkpoints_are_refused_not_misread(tmp_path):
  config = {**tiny_configs.COMMON, **tiny_configs.FAMILIES["llama"]}
  config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ModelConfigError, match=r"pre-quantised \(bitsandbytes, nf4\).*model.quantize=nf4"):
    load_config(tmp_path)


def test_weight_count_counts_quantised_weights_not_bytes():
  cfg = from_hf_dict({**tiny_configs.LLAMA, **tiny_configs.QUANT_SIZES})
  plain = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  quantised = nnx.eval_shape(lambda: CausalLM(cfg, ModelOptions(quantize="nf4"), rngs=nnx.Rngs(0)))
  assert q.weight_count(quantised) == q.weight_count(plain)
