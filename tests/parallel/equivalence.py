"""Run as a script with 8 fake CPU devices: 3 train steps per preset mesh vs one device; prints JSON results.

XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel/equivalence.py [lora|dora|qlora|full ...]
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import optax
from flax import nnx

from jaxtune import parallel
from jaxtune.hf.load import init_model
from jaxtune.models.config import from_hf_dict
from jaxtune.models.options import ModelOptions
from jaxtune.peft import ia3, lora, virtual
from jaxtune.train import optim
from jaxtune.train import step as step_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: tests/ for tiny_configs
import tiny_configs

TINY = tiny_configs.LLAMA  # divisible by 8 (fsdp) and 2 (tensor) where the rules split
TINY_QUANT = {**tiny_configs.LLAMA, **tiny_configs.QUANT_SIZES}  # NF4 blocks whole on every shard
MESHES = {"dp": dict(preset="dp"), "fsdp": dict(preset="fsdp"), "fsdp_tp": dict(preset="fsdp_tp", data=2)}
STEPS, ACCUM, ROWS, T = 3, 1, 8, 16
# what each run trains -> peft.method
PEFT_METHOD = {"lora": "lora", "dora": "lora", "qlora": "lora", "full": "full", "ia3": "ia3", "prefix": "prefix"}
VIRTUAL = 4  # prefix tuning's virtual tokens at the start of every row


def batches(virtual_tokens: int = 0) -> list[dict[str, np.ndarray]]:
  """STEPS batches; virtual_tokens > 0: each row starts with prefix tuning's slots -1..-P, untrained."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    ids = rng.integers(3, 128, size=(ACCUM, ROWS, T)).astype(np.int32)
    ids[..., :virtual_tokens] = -np.arange(1, virtual_tokens + 1)
    seg = np.ones_like(ids)
    seg[..., 12:] = 0  # padding at the end of every row
    out.append(
      {
        "input_ids": ids,
        "loss_mask": ((rng.random(ids.shape) < 0.7) & (ids >= 0)).astype(np.int32),
        "segment_ids": seg,
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape).copy(),
      }
    )
  return out


def setup(method: str, options: ModelOptions | None = None):
  """method: lora | dora | full | qlora (LoRA on an NF4 base with double quantisation) | ia3 | prefix."""
  tiny = TINY
  if method == "qlora":
    tiny = TINY_QUANT
    options = (options or ModelOptions()).replace(quantize="nf4", double_quant=True)
  model = init_model(from_hf_dict(tiny), seed=0, options=options)
  if method == "ia3":
    ia3.apply_ia3(model)
  if method == "prefix":
    virtual.apply_prefix_tuning(model, num_virtual_tokens=VIRTUAL, rngs=nnx.Rngs(1))
  if PEFT_METHOD[method] == "lora":
    lora.apply_lora(model, rank=4, alpha=8.0, use_dora=method == "dora", rngs=nnx.Rngs(1))
    # B starts at zero; give it values so the adapters' gradients are not trivially zero at step 1.
    for _, m in nnx.iter_modules(model):
      if isinstance(m, lora.LoRA):
        m.lora_b.set_value(0.01 * jax.random.normal(jax.random.key(2), m.lora_b.shape))
  cfg = optim.optim_config()
  cfg.lr, cfg.schedule, cfg.weight_decay = 1e-2, "constant", 0.01
  opt = optim.make_optimizer(cfg, STEPS)
  graphdef, frozen, state = step_lib.init_train_state(model, opt, method=PEFT_METHOD[method])
  host = jax.tree.map(np.asarray, (frozen, state))  # every run starts from copies of the same values
  return model, opt, graphdef, host


def run(method: str, mesh_name: str | None) -> dict:
  shardings, options = None, None
  if mesh_name is not None:  # each layer's input constrained by logical axes, as the training loop does
    mcfg = parallel.mesh_config()
    mcfg.update(MESHES[mesh_name])
    mesh = parallel.make_mesh(mcfg)
    options = ModelOptions(constrain=parallel.ActivationSharding(mesh, mcfg.rules))
  model, opt, graphdef, (frozen, state) = setup(method, options)
  if mesh_name is not None:
    sh = parallel.train_shardings(model, opt, mesh, mcfg.rules, method=PEFT_METHOD[method])
    frozen, state = parallel.place(frozen, sh.frozen), parallel.place(state, sh.state)
    shardings = sh.step_args
  else:
    frozen, state = jax.tree.map(jax.numpy.asarray, (frozen, state))
  train_step = step_lib.make_train_step(graphdef, frozen, opt, shardings=shardings)
  losses = []
  for batch in batches(VIRTUAL if method == "prefix" else 0):
    if shardings is not None:
      batch = parallel.shard_batch(batch, shardings[2])
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  out = {"losses": losses, "params": {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in flat}}
  if mesh_name is not None and "codes" in str(jax.tree_util.tree_structure(frozen)):  # a quantised base's shards
    codes = jax.tree_util.tree_flatten_with_path(frozen)[0]
    out["frozen_shards"] = {
      jax.tree_util.keystr(p): [list(x.shape), list(x.addressable_shards[0].data.shape)]
      for p, x in codes
      if "codes" in jax.tree_util.keystr(p) or "absmax" in jax.tree_util.keystr(p)
    }
  if mesh_name is not None:  # shard shape on device 0 vs the whole parameter, and the optimizer state's
    out["shards"] = {
      jax.tree_util.keystr(p): [list(x.shape), list(x.addressable_shards[0].data.shape)] for p, x in flat
    }
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    out["mu_shards"] = {
      jax.tree_util.keystr(p): list(x.addressable_shards[0].data.shape)
      for p, x in jax.tree_util.tree_flatten_with_path(mu)[0]
    }
  return out


def main() -> None:
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  methods = sys.argv[1:] or ["lora", "full"]
  meshes = {m: [name for name in MESHES if m != "qlora" or name != "dp"] for m in methods}  # dp splits no base
  results = {m: {"single": run(m, None), **{name: run(m, name) for name in meshes[m]}} for m in methods}
  print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
  main()
