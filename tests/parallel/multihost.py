"""One process of the multi-host test: lock the run directory, train 2 steps, save with Orbax, restore, train 2 more.

    python tests/parallel/multihost.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

NUM_PROCESSES=0 is the reference: one process, one device, no mesh, 4 steps straight.
Each process runs with 2 fake CPU devices (XLA_FLAGS set by the test); the mesh is
data 2 x fsdp 2 over both processes, so every weight is split across the processes.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from jaxtune import parallel
from jaxtune.parallel import distributed
from jaxtune.train import checkpoint as ckpt_lib
from jaxtune.train import run_lock
from jaxtune.train import step as step_lib

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import equivalence  # the same tiny model, optimizer and batches

STEPS = 4


def global_batches() -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(1)
  out = []
  for _ in range(STEPS):
    ids = rng.integers(3, 128, size=(1, 8, 16)).astype(np.int32)
    out.append(
      {
        "input_ids": ids,
        "loss_mask": (rng.random(ids.shape) < 0.7).astype(np.int32),
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), ids.shape).copy(),
      }
    )
  return out


def reference() -> dict:
  _, opt, graphdef, (frozen, state) = equivalence.setup("full")
  train_step = step_lib.make_train_step(graphdef, jax.tree.map(jax.numpy.asarray, frozen), opt)
  state = jax.tree.map(jax.numpy.asarray, state)
  losses = []
  for batch in global_batches():
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return {"losses": losses, "params": jax.tree.map(lambda x: np.asarray(x).tolist(), state.params)}


def multi(pid: int, count: int, port: int, workdir: str) -> dict:
  spec = distributed.DistributedSpec.from_env({}, f"127.0.0.1:{port}", count, pid)
  distributed.initialize(spec)
  assert jax.process_count() == count and jax.device_count() == 2 * count, (jax.process_count(), jax.device_count())
  lock = run_lock.acquire_for_run(workdir, pid, count)  # one lock for the run, held by process 0
  assert (lock is not None) == (pid == 0), lock
  try:  # a second run on the directory: process 0 is refused, and every process stops with it
    run_lock.acquire_for_run(workdir, pid, count)
    refused = ""
  except run_lock.RunLockedError as e:
    refused = str(e)
  model, opt, graphdef, (frozen_host, state_host) = equivalence.setup("full")
  mcfg = parallel.mesh_config()
  mcfg.update(dict(preset="fsdp", data=2))
  mesh = parallel.make_mesh(mcfg)
  sh = parallel.train_shardings(model, opt, mesh, mcfg.rules, method="full")
  frozen, state = parallel.place(frozen_host, sh.frozen), parallel.place(state_host, sh.state)
  train_step = step_lib.make_train_step(graphdef, frozen, opt, shardings=sh.step_args)
  rows = slice(pid * 8 // count, (pid + 1) * 8 // count)  # grain gives process p the p-th block of rows
  local = [{k: v[:, rows] for k, v in b.items()} for b in global_batches()]
  losses = []
  ckpts = ckpt_lib.Checkpoints(f"{workdir}/checkpoints", keep=2, async_save=True)
  for i, batch in enumerate(local):
    if i == 2:  # save, then drop the live state and restore it into fresh shards of the initial values
      ckpts.save(2, state, data_state={"step": 2}, config={"peft": {"method": "full"}})
      ckpts.wait()
      saved = jax.tree.map(np.asarray, jax.experimental.multihost_utils.process_allgather(state.params, tiled=True))
      restored = ckpts.restore(parallel.place(state_host, sh.state), {"peft": {"method": "full"}})
      assert restored is not None and restored.step == 2 and restored.data_state == {"step": 2}
      state = restored.state
      leaf = jax.tree.leaves(state.params)[0]
      assert leaf.sharding == jax.tree.leaves(sh.state.params)[0], leaf.sharding  # restored into the shards
      back = jax.tree.map(np.asarray, jax.experimental.multihost_utils.process_allgather(state.params, tiled=True))
      jax.tree.map(np.testing.assert_array_equal, saved, back)
    state, metrics = train_step(state, parallel.shard_batch(batch, sh.batch))
    losses.append(float(metrics["loss"]))
  ckpts.close()
  if lock is not None:
    lock.release()
  params = jax.experimental.multihost_utils.process_allgather(state.params, tiled=True)
  local_shape = list(jax.tree.leaves(state.params)[0].addressable_shards[0].data.shape)
  return {
    "losses": losses,
    "params": jax.tree.map(lambda x: np.asarray(x).tolist(), params),
    "embed_shard": local_shape,
    "devices": jax.device_count(),
    "refused": refused,
  }


def main() -> None:
  pid, count, port, workdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  import jax.experimental.multihost_utils  # noqa: F401

  out = reference() if count == 0 else multi(pid, count, port, workdir)
  print("RESULTS " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
