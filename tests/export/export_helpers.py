"""Shared by the export tests: LoRA models with random adapters, reading checkpoints back, logit checks."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.hf.load import load_model
from jaxtune.hf.safetensors_io import Checkpoint
from jaxtune.models.transformer import CausalLM
from jaxtune.peft.lora import LoRA, LoRAParam, apply_lora


def lora_model(source: pathlib.Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0, std: float = 0.05,
               **lora) -> CausalLM:
  """The HF checkpoint at `source` in jaxtune with `apply_lora` adapters, A and B random (B is zero at init).

  The adapters' structure comes from apply_lora on an abstract model and their values from
  numpy: apply_lora's random init compiles once per shape, seconds per model on 2 cores.
  """
  base = load_model(source)
  abstract = nnx.eval_shape(lambda: apply_lora(CausalLM(base.config, rngs=nnx.Rngs(0)), rank=rank, alpha=alpha,
                                               rngs=nnx.Rngs(0), **lora))
  graphdef, adapters, rest = nnx.split(abstract, LoRAParam, ...)
  del rest
  rng = np.random.default_rng(seed)
  adapters = jax.tree.map(lambda s: jnp.asarray((std * rng.standard_normal(s.shape)).astype(s.dtype)), adapters)
  return nnx.merge(graphdef, adapters, nnx.state(base))


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
