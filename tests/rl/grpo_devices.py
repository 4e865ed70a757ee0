"""Run as a script with 8 fake CPU devices: one GRPO step on fixed completions, on one device and on each preset mesh.

XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/rl/grpo_devices.py [LOSS_TYPES [MESHES]]

Prints JSON: per mesh the loss and the gradient (plain SGD with learning rate 1: params before - after).
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import ml_collections
import numpy as np
import optax

from jaxtune import parallel
from jaxtune.models.options import ModelOptions
from jaxtune.peft import lora as lora_lib
from jaxtune.train import grpo
from jaxtune.train import step as step_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/, for the parallel helpers
from parallel import equivalence

P, N, ROWS, ACCUM = 12, 8, 8, 2


def batch() -> dict[str, np.ndarray]:
  """Fixed prompts (left-padded) and completions (some stopping early), sampler log-probs and advantages."""
  rng = np.random.default_rng(0)
  shape = (ACCUM, ROWS, P + N)
  ids = rng.integers(3, 128, size=shape).astype(np.int32)
  seg = np.ones(shape, np.int32)
  seg[..., :3] = 0  # left padding
  lengths = rng.integers(2, N + 1, size=shape[:2])
  seg[..., P:] = np.arange(N)[None, None] < lengths[..., None]
  loss_mask = np.zeros(shape, np.int32)
  loss_mask[..., P:] = seg[..., P:]
  old = np.where(loss_mask > 0, -rng.uniform(3.0, 6.0, size=shape), 0.0).astype(np.float32)
  adv = np.broadcast_to(rng.normal(size=shape[:2])[..., None], shape).astype(np.float32)
  positions = (np.maximum(np.cumsum(seg, -1) - 1, 0) * seg).astype(np.int32)
  return dict(input_ids=ids, segment_ids=seg, positions=positions, loss_mask=loss_mask, old_logps=old, advantages=adv)


def run(mesh_name: str | None, loss_type: str) -> dict:
  shardings, options = None, None
  if mesh_name is not None:
    mcfg = parallel.mesh_config()
    mcfg.update(equivalence.MESHES[mesh_name])
    mesh = parallel.make_mesh(mcfg)
    options = ModelOptions(constrain=parallel.ActivationSharding(mesh, mcfg.rules))
  model, _, graphdef, (frozen, state) = equivalence.setup("lora", options)
  cfg = grpo.grpo_config()
  cfg.update(dict(loss_type=loss_type, beta=0.04, max_completion_length=N, temperature=0.9))
  objective = step_lib.Objective("grpo", ml_collections.FrozenConfigDict(cfg), lora_lib.base_graphdef(model))
  opt = optax.sgd(1.0)
  _, frozen, state = step_lib.init_train_state(model, opt, method="lora")
  state = jax.tree.map(np.asarray, state)
  before = state.params
  data = batch()
  if mesh_name is not None:
    sh = parallel.train_shardings(model, opt, mesh, mcfg.rules, method="lora")
    frozen, state = parallel.place(frozen, sh.frozen), parallel.place(state, sh.state)
    shardings = sh.step_args
    data = parallel.shard_batch(data, shardings[2])
  else:
    frozen, state = jax.tree.map(jax.numpy.asarray, (frozen, state))
  train_step = step_lib.make_train_step(graphdef, frozen, opt, shardings=shardings, objective=objective)
  state, metrics = train_step(state, data)
  grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), before, state.params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  return {
    "metrics": {k: float(v) for k, v in metrics.items()},
    "grads": {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in flat},
  }


def main() -> None:
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  losses = sys.argv[1].split(",") if len(sys.argv) > 1 else ["dapo", "grpo"]
  meshes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["fsdp", "fsdp_tp"]
  results = {loss: {"single": run(None, loss), **{name: run(name, loss) for name in meshes}} for loss in losses}
  print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
  main()
