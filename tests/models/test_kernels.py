"""Execution policies: every choice of kernels and attention computes the plain program's logits and gradients,
on every family, and the plain policy is what it says (no custom derivatives, no optimization barriers)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.hf.load import init_model
from jaxtune.models.config import from_hf_dict
from jaxtune.models.options import ModelOptions
from jaxtune.peft import lora

import tiny_configs

B, T = 2, 16
# The reference is the plain program (plain kernels, xla attention); each default must match it: chunked
# attention under the plain kernels (TPU, GPU without cuDNN) and under the CPU kernels (CPU). The CPU
# kernels under xla attention differ from the plain program only in products test_attention.py covers.
POLICIES = {
  "plain-chunked": dict(kernels="plain", attention_impl="chunked"),
  "cpu-chunked": dict(kernels="cpu", attention_impl="chunked"),
}


def _config(family):
  return from_hf_dict({**tiny_configs.COMMON, **tiny_configs.FAMILIES[family]})


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 128, size=(B, T)).astype(np.int32)
  segments = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * T], np.int32)  # packed, with a padding tail
  positions = np.array([list(range(6)) + list(range(7)) + [0] * 3, list(range(T))], np.int32)
  cot = rng.standard_normal((B, T, 128)).astype(np.float32)
  return ids, segments, positions, cot


def _model(family, options):
  """The family's tiny model with LoRA on every linear layer, B non-zero: the base and adapter paths both run."""
  model = init_model(_config(family), seed=0, options=ModelOptions(remat="dots_no_batch", **options))
  lora.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  for _, m in nnx.iter_modules(model):
    if isinstance(m, lora.LoRA):
      m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(2), m.lora_b.shape))
  return model


def _logits_and_grads(model):
  ids, segments, positions, cot = _batch()
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def run(params):
    def loss(params):
      logits = nnx.merge(graphdef, params)(ids, segment_ids=segments, positions=positions)
      real = (segments != 0)[..., None]  # padding positions' logits are never read
      return jnp.sum(logits * cot * real), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits * (segments != 0)[..., None], grads

  return run(params)


@pytest.mark.parametrize("family", list(tiny_configs.FAMILIES))
def test_every_policy_matches_the_plain_program(family):
  """Logits and the gradients of every weight (base kernels, norms, embeddings, LoRA factors), float32:
  max |diff| <= 1e-5 x max |reference| per array."""
  want_logits, want_grads = _logits_and_grads(_model(family, {}))
  want = dict(nnx.to_flat_state(want_grads))
  for name, options in POLICIES.items():
    got_logits, got_grads = _logits_and_grads(_model(family, options))
    ref = float(np.abs(want_logits).max())
    assert float(np.abs(got_logits - want_logits).max()) <= 1e-5 * ref, (name, "logits")
    got = dict(nnx.to_flat_state(got_grads))
    assert got.keys() == want.keys()
    for path, var in want.items():
      ref = float(np.abs(var[...]).max())
      diff = float(np.abs(got[path][...] - var[...]).max())
      assert diff <= 1e-5 * ref, (name, ".".join(map(str, path)), diff, ref)


def _primitives(fn, *args) -> set[str]:
  """Every primitive in fn's jaxpr at args, nested jaxprs (scans, remat, custom rules) included."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      found.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_the_plain_policy_traces_no_custom_derivative_and_no_barrier(family):
  """Under kernels="plain", attention "xla", a layer is einsums differentiated by JAX: its forward holds no
  custom_vjp and its backward no optimization barrier. The CPU policy holds both (so the check can see them)."""
  ids, segments, positions, _ = _batch()

  def traces(options):
    graphdef, params = nnx.split(_model(family, options), nnx.Param)

    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params)(ids, segment_ids=segments, positions=positions))

    return _primitives(loss, params) | _primitives(jax.grad(loss), params)

  plain = traces({})
  assert not {p for p in plain if "custom_vjp" in p or "optimization_barrier" in p}, sorted(plain)
  tuned = traces(POLICIES["cpu-chunked"])
  assert any("custom_vjp" in p for p in tuned) and "optimization_barrier" in tuned, sorted(tuned)


def test_options_compare_by_value_and_reject_unknown_choices():
  assert ModelOptions(kernels="cpu") == ModelOptions(kernels="cpu") != ModelOptions()
  assert hash(ModelOptions(kernels="cpu")) == hash(ModelOptions(kernels="cpu"))
  with pytest.raises(ValueError, match="kernels 'gpu' is unknown; choose one of plain, cpu"):
    ModelOptions(kernels="gpu")
  with pytest.raises(ValueError, match="attention_impl 'flash' is unknown"):
    ModelOptions(attention_impl="flash")
