"""DoRA against PEFT: exported adapters give PEFT's logits and gradients, merged exports equal PEFT's merge, and
adapters saved by PEFT load; on tiny random Llama, Qwen2 and Gemma 2 (float32), with A, B and the magnitudes
moved away from their init so that every term of DoRA's output shows."""

import copy
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxtune.export import export_adapter, export_merged
from jaxtune.hf.load import load_model
from jaxtune.merge import sources
from jaxtune.models.options import ModelOptions
from jaxtune.models.transformer import Linear
from jaxtune.peft.import_adapter import load_adapter
from jaxtune.peft.lora import LoRA, LoRAParam, adapter_settings, lora_weights, peft_state_dict, weight_row_norms

import tiny_hf
from export_helpers import assert_close_logits, lora_model, read_checkpoint

FAMILIES = ("llama", "qwen2", "gemma2")  # untied + llama3 rope; q/k/v biases + tied; softcaps + sliding window
pytestmark = pytest.mark.filterwarnings("ignore:.*holds no tokenizer files")  # tiny_hf saves no tokenizer


@nnx.jit
def _logits(model, ids):  # eager calls would compile the layer scan at every call
  return model(ids)


def _hf_grads(peft_model) -> dict[str, np.ndarray]:
  """The gradients of PEFT's trainable parameters under the names its adapter files use."""
  return {
    name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad.numpy()
    for name, p in peft_model.named_parameters()
    if p.requires_grad
  }


def _torch_logits(hf_model, ids):
  with torch.no_grad():
    return hf_model(input_ids=torch.tensor(ids)).logits.numpy()


@dataclasses.dataclass
class Case:
  family: str
  source: pathlib.Path
  hf_base: torch.nn.Module
  model: object  # jaxtune CausalLM with perturbed DoRA adapters on every linear layer
  adapter: pathlib.Path  # its export
  peft_model: torch.nn.Module  # the export loaded by PEFT, trainable
  ids: np.ndarray


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory, peft):
  family = request.param
  source = tmp_path_factory.mktemp(family)
  hf_base = tiny_hf.build(family, source)
  model = lora_model(source, rank=4, alpha=8.0, seed=1, use_dora=True)  # A, B and the magnitudes moved
  adapter = export_adapter(model, tmp_path_factory.mktemp(f"{family}_dora"), str(source))
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), adapter, is_trainable=True).eval()
  ids = np.random.default_rng(0).integers(3, 128, size=(2, 16))
  return Case(family, source, hf_base, model, adapter, peft_model, ids)


def test_exported_adapter_gives_peft_logits(case):
  logits = np.asarray(_logits(case.model, case.ids))
  assert_close_logits(_torch_logits(case.peft_model, case.ids), logits, what=case.family)
  base = _torch_logits(case.hf_base, case.ids)  # the adapters must matter, or this test proves nothing
  assert np.abs(base - logits).max() > 0.05 * np.abs(logits).max(), case.family
  config = json.loads((case.adapter / "adapter_config.json").read_text())
  assert config["use_dora"] is True and config["peft_type"] == "LORA"


def test_merged_export_equals_peft_merge_and_unload(case, tmp_path):
  """`--format merged`, and `jaxtune merge` reading BASE+ADAPTER, both give PEFT's merged weights."""
  ours = read_checkpoint(export_merged(case.model, case.source, tmp_path / "merged"))
  adapted = sources.Adapted("base+dora", sources.Model("base", case.source), case.adapter)
  theirs = copy.deepcopy(case.peft_model).merge_and_unload().state_dict()
  assert set(ours) <= set(theirs)  # tied models write no lm_head
  for name, value in ours.items():
    want = theirs[name].numpy()
    np.testing.assert_allclose(value, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=name)
    np.testing.assert_allclose(adapted.get(name), want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=name)


@pytest.mark.slow  # test_dropout_reruns_the_base_product_on_the_dropped_input checks one layer's gradients
def test_gradients_equal_peft_with_the_norm_detached(case):
  """One batch, loss = sum(logits * R): the magnitudes' and the factors' gradients are PEFT's (which holds the
  weight norm constant), read back through the export's names and layouts."""
  r = np.random.default_rng(1).standard_normal((*case.ids.shape, case.hf_base.config.vocab_size)).astype(np.float32)
  peft_model = copy.deepcopy(case.peft_model)
  (peft_model(input_ids=torch.tensor(case.ids)).logits * torch.tensor(r)).sum().backward()
  theirs = _hf_grads(peft_model)

  graphdef, params, rest = nnx.split(case.model, LoRAParam, ...)
  loss = lambda params: jnp.sum(nnx.merge(graphdef, params, rest)(case.ids) * r)
  ours = peft_state_dict(nnx.merge(graphdef, jax.grad(loss)(params), rest))
  assert sorted(ours) == sorted(theirs) and any(k.endswith("lora_magnitude_vector") for k in ours)
  for name, want in theirs.items():
    scale = np.abs(want).max()
    assert scale > 0, name
    assert np.abs(ours[name] - want).max() <= 1e-4 * scale, name


def test_exported_adapter_loads_back(case):
  loaded = load_adapter(load_model(case.source), case.adapter)
  assert adapter_settings(loaded)["use_dora"] is True
  for got, want in zip(lora_weights(loaded), lora_weights(case.model), strict=True):
    assert got.path == want.path
    for x, y in ((got.a, want.a), (got.b, want.b), (got.magnitude, want.magnitude)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(got.path))


def test_adapter_saved_by_peft_gives_peft_logits(tmp_path, peft):
  hf = tiny_hf.build("qwen2", tmp_path / "base")
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False)
  peft_model = peft.get_peft_model(hf, config).eval()  # init_lora_weights=False: B random, so the norm moves
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1 + 0.2 * torch.randn_like(p))
  peft_model.save_pretrained(tmp_path / "adapter")
  ids = np.random.default_rng(0).integers(3, 128, size=(2, 16))
  model = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
  assert_close_logits(
    np.asarray(_logits(model, ids)), _torch_logits(peft_model, ids), what="jaxtune + PEFT's DoRA adapter"
  )


def test_dropout_reruns_the_base_product_on_the_dropped_input(peft):
  """One adapted layer in training, dropout 0.5 with the same mask on both sides: PEFT's output and gradients."""
  d_in, d_out, p = 16, 12, 0.5
  rng = np.random.default_rng(0)
  linear = Linear(
    "BTD,DF->BTF", (d_in, d_out), ("embed", "mlp"), bias_shape=(d_out,), options=ModelOptions(), rngs=nnx.Rngs(0)
  )
  linear.bias.set_value(jnp.asarray(0.1 * rng.standard_normal(d_out), jnp.float32))
  adapter = LoRA(
    linear.einsum,
    linear.kernel_shape,
    linear.kernel_axes,
    rank=4,
    alpha=8.0,
    dropout=p,
    magnitude=weight_row_norms(linear),
    dtype=jnp.float32,
    rngs=nnx.Rngs(0),
  )
  adapter.lora_b.set_value(jnp.asarray(0.05 * rng.standard_normal(adapter.lora_b.shape), jnp.float32))
  adapter.lora_magnitude.set_value(adapter.lora_magnitude[...] * (1 + 0.2 * rng.standard_normal(d_out)))
  adapter.deterministic = False
  linear.adapter = adapter
  x = rng.standard_normal((2, 3, d_in)).astype(np.float32)
  keep = np.asarray(jax.random.bernoulli(jax.random.wrap_key_data(adapter.dropout_key[...]), 1 - p, x.shape))

  class Layer(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.proj = torch.nn.Linear(d_in, d_out, bias=True)

  class Mask(torch.nn.Module):
    def forward(self, x):
      return x * torch.tensor(keep) / (1 - p)

  config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["proj"], use_dora=True)
  layer = peft.get_peft_model(Layer(), config).base_model.model.proj
  kernel, bias, a, b, m = (
    np.asarray(v[...]) for v in (linear.kernel, linear.bias, adapter.lora_a, adapter.lora_b, adapter.lora_magnitude)
  )
  with torch.no_grad():
    for param, value in (
      (layer.base_layer.weight, kernel.T),
      (layer.base_layer.bias, bias),
      (layer.lora_A["default"].weight, a.T),
      (layer.lora_B["default"].weight, b.T),
      (layer.lora_magnitude_vector["default"].weight, m),
    ):
      param.copy_(torch.tensor(value))
  layer.lora_dropout["default"] = Mask()
  layer.train()
  r = rng.standard_normal((2, 3, d_out)).astype(np.float32)
  out = layer(torch.tensor(x))
  (out * torch.tensor(r)).sum().backward()

  graphdef, params, rest = nnx.split(linear, LoRAParam, ...)
  forward = lambda params: nnx.merge(graphdef, params, rest)(x)
  np.testing.assert_allclose(np.asarray(forward(params)), out.detach().numpy(), rtol=1e-5, atol=1e-6)
  grads = nnx.to_pure_dict(jax.grad(lambda params: jnp.sum(forward(params) * r))(params))["adapter"]
  for ours, theirs in (
    (grads["lora_a"], layer.lora_A["default"].weight.grad.numpy().T),
    (grads["lora_b"], layer.lora_B["default"].weight.grad.numpy().T),
    (grads["lora_magnitude"], layer.lora_magnitude_vector["default"].weight.grad.numpy()),
  ):
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-6)
