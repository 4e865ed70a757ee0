"""Run as a script: the sharded loader against the plain loader (8 fake devices), or its host memory (2 processes).

python tests/parallel/loader_check.py equal CKPT_DIR
python tests/parallel/loader_check.py memory CKPT_DIR PROCESS_ID PORT [WARM_DIR]   (two processes, 2 devices each;
  WARM_DIR, a small checkpoint loaded before the measurement, takes the one-time runtime costs out of it)
"""

from __future__ import annotations

import json
import sys
import threading
import time

import jax
import numpy as np
from flax import nnx

from jaxtune import parallel
from jaxtune.parallel import distributed
from jaxtune.parallel.load import load_model_sharded

MESHES = {"dp": dict(preset="dp"), "fsdp": dict(preset="fsdp"), "fsdp_tp": dict(preset="fsdp_tp", data=2)}


def mesh_of(name: str):
  cfg = parallel.mesh_config()
  cfg.update(MESHES[name])
  return parallel.make_mesh(cfg), cfg.rules


def equal(directory: str) -> dict:
  from jaxtune.hf.load import load_model

  ref = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_model(directory))))
  out = {}
  for name in MESHES:
    mesh, rules = mesh_of(name)
    stats = {}
    got = nnx.to_pure_dict(nnx.state(load_model_sharded(directory, mesh, rules, stats=stats)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), ref, got)
    out[name] = {"stats": stats, "q_shard": list(got["layers"]["attn"]["q"]["kernel"].addressable_shards[0].data.shape)}
  return out


def anon() -> int:
  return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1]) * 1024


def memory(directory: str, pid: int, port: int, warm: str | None = None) -> dict:
  distributed.initialize(distributed.DistributedSpec.from_env({}, f"127.0.0.1:{port}", 2, pid))
  cfg = parallel.mesh_config()  # fsdp over the 4 devices of both processes: each process holds half
  mesh = parallel.make_mesh(cfg)
  jax.numpy.ones(1).block_until_ready()
  if warm:
    jax.block_until_ready(nnx.state(load_model_sharded(warm, mesh, cfg.rules)))
  before, peak, done = anon(), [0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], anon())
      time.sleep(0.002)

  thread = threading.Thread(target=sample)
  thread.start()
  stats = {}
  model = load_model_sharded(directory, mesh, cfg.rules, stats=stats)
  jax.block_until_ready(nnx.state(model))
  done.set()
  thread.join()
  held = sum(s.data.nbytes for x in jax.tree.leaves(nnx.state(model)) for s in x.addressable_shards)
  return {"growth": max(peak[0], anon()) - before, "held": held, **stats}


if __name__ == "__main__":
  if sys.argv[1] == "equal":
    result = equal(sys.argv[2])
  else:
    result = memory(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
  print("RESULTS " + json.dumps(result), flush=True)
