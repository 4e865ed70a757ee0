"""One host of a two-host TPU VM slice, on CPU: JAX's own TPU detection reads a stand-in metadata server.

    python tests/parallel/tpu_pod.py PROCESS_ID PORT

Nothing names the peers but the metadata JAX reads on a plain TPU VM (`agent-worker-number`,
`worker-network-endpoints`); no TPU_WORKER_HOSTNAMES, no JAX_* variables. The entry point's
start-up must join the two hosts from that alone. Then both step along, asking
`preemption.Notice` after every step; host 1 gets a SIGTERM at step 3, and both must stop at
one and the same later step, as jaxtune's loop saves its checkpoint there.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

PID, PORT = int(sys.argv[1]), sys.argv[2]
os.environ["JAX_COORDINATOR_PORT"] = PORT  # JAX's TPU detection uses a fixed port otherwise

import jax  # noqa: E402
from jax._src.clusters import cloud_tpu_cluster  # noqa: E402

METADATA = {"agent-worker-number": str(PID), "worker-network-endpoints": "127.0.0.1,127.0.0.1", "tpu-env": ""}
os.environ.pop("TPU_SKIP_MDS_QUERY", None)  # set by JAX on machines without TPU chips
cloud_tpu_cluster.running_in_cloud_tpu_vm = True
cloud_tpu_cluster.get_metadata = lambda key: (METADATA[key], 200)

from jaxtune.parallel import distributed  # noqa: E402
from jaxtune.train import preemption  # noqa: E402

spec = distributed.DistributedSpec.from_env(os.environ)
joined = distributed.initialize(spec)
stopped_at = None
with preemption.Notice() as notice:
  for step in range(1, 200):
    time.sleep(0.05)  # a training step
    if PID == 1 and step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    if notice.reached(step):
      stopped_at = step
      break
result = {
  "mode": spec.mode,
  "joined": joined,
  "process": jax.process_index(),
  "processes": jax.process_count(),
  "synced": notice.synced,
  "stopped_at": stopped_at,
}
print("RESULTS " + json.dumps(result), flush=True)
