"""Mesh, shardings, multi-host and sharded loading: 8 fake CPU devices and two processes on 127.0.0.1.

The multi-device runs are subprocesses (XLA_FLAGS must be set before JAX starts its backend,
and other test folders start it first with one device); each prints its results as JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtune.parallel import distributed, sharding
from jaxtune.parallel import mesh as mesh_lib

import tiny_configs

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import checkpoints  # noqa: E402

LLAMA = tiny_configs.LLAMA_UNTIED
QWEN = {**LLAMA, "model_type": "qwen2"}  # q/k/v biases


def _env(devices: int) -> dict[str, str]:
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(REPO),
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_COMPILATION_CACHE_DIR": str(REPO / ".pytest_cache" / "jaxtune-xla"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
  }


def _results(text: str) -> dict:
  line = next((s for s in text.splitlines() if s.startswith("RESULTS ")), None)
  assert line is not None, text[-3000:]
  return json.loads(line.removeprefix("RESULTS "))


def _script(args: list[str], devices: int, timeout: float = 240) -> dict:
  out = subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, env=_env(devices), timeout=timeout, cwd=REPO
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return _results(out.stdout)


def _two_processes(args: list[str], tmp_path: pathlib.Path, timeout: float = 240) -> list[dict]:
  """Runs `args + [pid, port]`-style scripts as processes 0 and 1 of one jax.distributed job."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, *[a.format(pid=i, port=port) for a in args]],
      cwd=REPO,
      env=_env(2),
      stdout=logs[i].open("w"),
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  try:
    for p in procs:
      p.wait(timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log.read_text()[-4000:]
  return [_results(log.read_text()) for log in logs]


# --- in-process: sizes, rules, specs ---------------------------------------------------------------------------


def _cfg(**kw):
  cfg = mesh_lib.mesh_config()
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize(
  "kw, devices, expected",
  [
    (dict(preset="dp"), 8, dict(data=8, fsdp=1, tensor=1)),
    (dict(preset="fsdp"), 8, dict(data=1, fsdp=8, tensor=1)),
    (dict(preset="fsdp_tp"), 8, dict(data=1, fsdp=4, tensor=2)),
    (dict(preset="fsdp_tp", data=2), 8, dict(data=2, fsdp=2, tensor=2)),
    (dict(preset="fsdp", data=2), 256, dict(data=2, fsdp=128, tensor=1)),
  ],
)
def test_axis_sizes(kw, devices, expected):
  assert mesh_lib.axis_sizes(_cfg(**kw), devices) == expected


@pytest.mark.parametrize(
  "kw, devices, match",
  [
    (dict(preset="fsdp_tp", tensor=3), 8, "do not split"),
    (dict(preset="dp", fsdp=-1), 8, "at most one -1"),
    (dict(preset="nope"), 8, "unknown"),
    (dict(preset="dp", data=2), 8, "set one axis to -1"),
  ],
)
def test_axis_sizes_errors(kw, devices, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.axis_sizes(_cfg(**kw), devices)


def test_spec_follows_rules_and_drops_axes_that_do_not_divide():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), mesh_lib.AXES)
  rules = mesh_lib.RULES
  P = jax.sharding.PartitionSpec
  assert sharding.spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 24), mesh, rules) == P(
    None, "fsdp", "tensor", None
  )
  assert sharding.spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 1, 24), mesh, rules) == P(
    None, "fsdp", None, None
  )  # one KV head: replicated over tensor
  assert sharding.spec(("batch", "length"), (8, 16), mesh, rules) == P(("data", "fsdp"), None)
  assert sharding.spec(("batch", "length"), (2, 16), mesh, rules) == P("data", None)  # 2 rows: data only
  with pytest.raises(ValueError, match="no rule for logical axis 'experts'"):
    sharding.spec(("experts",), (8,), mesh, rules)


def test_distributed_spec_from_env():
  assert distributed.DistributedSpec.from_env({}).mode == "none"
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  spec = distributed.DistributedSpec.from_env(env)
  assert (spec.mode, spec.coordinator_address, spec.num_processes, spec.process_id) == (
    "explicit",
    "10.0.0.1:1234",
    4,
    3,
  )
  assert distributed.DistributedSpec.from_env(env, process_id=1).process_id == 1  # flags win over the environment
  with pytest.raises(ValueError, match="process id"):
    distributed.DistributedSpec.from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  assert distributed.DistributedSpec.from_env({}, tpu_hosts=lambda: 4).why == "a TPU slice of 4 hosts"
  assert distributed.DistributedSpec.from_env({}, tpu_hosts=lambda: 1).mode == "none"  # one TPU VM
  assert distributed.DistributedSpec.from_env({"SLURM_NTASKS": "16"}).mode == "auto"


def test_tpu_slice_hosts_is_jax_own_detection(monkeypatch):
  """A plain TPU VM pod names its hosts only through the metadata server; GKE through TPU_WORKER_HOSTNAMES."""
  from jax._src.clusters import cloud_tpu_cluster

  assert distributed.tpu_slice_hosts() == 0  # this machine: no TPU, no question asked
  metadata = {"agent-worker-number": "2", "worker-network-endpoints": "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4"}
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata.get(key, ""), 200))
  for name in ("TPU_SKIP_MDS_QUERY", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_NUM_SLICES"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.tpu_slice_hosts() == 4
  assert distributed.DistributedSpec.from_env({}).why == "a TPU slice of 4 hosts"
  # GKE: no TPU VM metadata, the hosts in TPU_WORKER_HOSTNAMES
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: ("", 404))
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
  monkeypatch.setenv("TPU_WORKER_ID", "1")
  assert distributed.tpu_slice_hosts() == 2


def test_tpu_pod_joins_from_metadata_and_stops_both_hosts_at_one_step(tmp_path):
  """Two hosts of a TPU VM slice known only to JAX's metadata reads join; a SIGTERM to one stops both together."""
  procs = _two_processes([str(HERE / "tpu_pod.py"), "{pid}", "{port}"], tmp_path, timeout=120)
  for pid, result in enumerate(procs):
    assert result["mode"] == "auto" and result["joined"].startswith(f"a TPU slice of 2 hosts: process {pid} of 2")
    assert (result["process"], result["processes"], result["synced"]) == (pid, 2, True)
  assert procs[0]["stopped_at"] == procs[1]["stopped_at"] > 3, procs


# --- 8 fake devices ---------------------------------------------------------------------------------------------


def _max_diff(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def test_presets_match_one_device_and_split_parameters():
  results = _script([str(HERE / "equivalence.py")], devices=8)
  fractions = {"dp": 1, "fsdp": 8, "fsdp_tp": 4}  # fsdp_tp: 2 data x 2 fsdp x 2 tensor
  for method in ("lora", "full"):
    single = results[method]["single"]
    moved = _max_diff(single["params"], {k: 0 * np.asarray(v) for k, v in single["params"].items()})
    for name, frac in fractions.items():
      got = results[method][name]
      np.testing.assert_allclose(got["losses"], single["losses"], rtol=2e-6, err_msg=f"{method} {name}")
      # Adam normalises each update, so reduction-order noise on near-zero gradients shows up at ~1e-4 of lr.
      assert _max_diff(got["params"], single["params"]) < 5e-4, (method, name)
      # every parameter with a dimension the mesh splits: 1/frac of it on a device
      for key, (whole, shard) in got["shards"].items():
        split = np.prod(whole) // np.prod(shard)
        if method == "full" and name != "dp" and "norm" not in key:
          assert split == frac, (method, name, key, whole, shard)
        else:  # an adapter splits along the dimensions it shares with its weight: B of q has no `embed`
          assert frac % split == 0, (method, name, key, whole, shard)
      if method == "lora" and name != "dp":
        assert got["shards"]["['layers']['attn']['q']['adapter']['lora_a']"][1][1] == 64 // (
          8 // frac * 0 + (8 if name == "fsdp" else 2)
        )  # A [L, D, r]: D over fsdp
      assert got["mu_shards"] == {k: s for k, (_, s) in got["shards"].items()}  # Adam moments split like params
  assert moved > 1e-3  # the params did train (LoRA B and full weights moved)


@pytest.mark.slow
def test_dora_presets_match_one_device_and_split_magnitudes_like_outputs():
  results = _script([str(HERE / "equivalence.py"), "dora"], devices=8)["dora"]
  single = results["single"]
  for name, fsdp, tensor in (("fsdp", 8, 1), ("fsdp_tp", 2, 2)):
    got = results[name]
    np.testing.assert_allclose(got["losses"], single["losses"], rtol=2e-6, err_msg=name)
    assert _max_diff(got["params"], single["params"]) < 5e-4, name
    # a magnitude splits like its weight's outputs: o's [embed] over fsdp, q's [heads, head_dim] over tensor
    magnitude = lambda linear: got["shards"][f"['layers']['attn']['{linear}']['adapter']['lora_magnitude']"]
    assert magnitude("o") == [[2, 64], [2, 64 // fsdp]], name
    assert magnitude("q") == [[2, 4, 24], [2, 4 // tensor, 24]], name
    assert got["mu_shards"] == {k: s for k, (_, s) in got["shards"].items()}


@pytest.mark.slow  # 37 s on 2 cores: one device and two meshes of a d=512 model
def test_qlora_presets_match_one_device_with_nf4_blocks_whole_on_each_shard():
  results = _script([str(HERE / "equivalence.py"), "qlora"], devices=8)["qlora"]
  single = results["single"]
  for name in ("fsdp", "fsdp_tp"):
    got = results[name]
    np.testing.assert_allclose(got["losses"], single["losses"], rtol=2e-6, err_msg=name)
    assert _max_diff(got["params"], single["params"]) < 5e-4, name
    # q's NF4 codes [L, D/2, N, H] (two per byte along D, its input) split like its kernel: D over fsdp, N over tensor
    codes = got["frozen_shards"][".weights['layers']['attn']['q']['kernel']['codes']"]
    absmax = got["frozen_shards"][".weights['layers']['attn']['q']['kernel']['absmax']"]
    assert codes == ([[2, 256, 4, 64], [2, 32, 4, 64]] if name == "fsdp" else [[2, 256, 4, 64], [2, 128, 2, 64]])
    assert absmax[1][1] * 64 == codes[1][1] * 2  # each device holds the absmax of exactly its own blocks


@pytest.mark.slow
def test_ia3_and_prefix_presets_match_one_device():
  results = _script([str(HERE / "equivalence.py"), "ia3", "prefix"], devices=8)
  for method in ("ia3", "prefix"):
    single = results[method]["single"]
    for name in ("dp", "fsdp", "fsdp_tp"):
      got = results[method][name]
      np.testing.assert_allclose(got["losses"], single["losses"], rtol=2e-6, err_msg=f"{method} {name}")
      assert _max_diff(got["params"], single["params"]) < 5e-4, (method, name)
  # prefix keys and values [L, 2, P, K, H] split their KV heads over `tensor`, like the k and v projections
  assert results["prefix"]["fsdp_tp"]["shards"]["['virtual']['prefix']"] == [[2, 2, 4, 2, 24], [2, 2, 4, 1, 24]]


def test_sharded_loader_matches_plain_loader(tmp_path):
  checkpoints.write(tmp_path / "qwen", QWEN, max_file_bytes=100_000)  # several files + index, biases
  results = _script([str(HERE / "loader_check.py"), "equal", str(tmp_path / "qwen")], devices=8)
  model_bytes = results["dp"]["stats"]["read_bytes"]
  for name, r in results.items():
    assert r["stats"]["read_bytes"] == model_bytes  # replicas of a block are read once
  assert results["fsdp"]["q_shard"] == [2, 8, 4, 24]  # [L, D/8, N, H]
  assert results["fsdp_tp"]["q_shard"] == [2, 32, 2, 24]  # [L, D/2, N/2, H]
  # On one host every device is addressable: the host stages one layer's tensor at a time, never the model.
  assert results["fsdp"]["stats"]["peak_staged_bytes"] <= 128 * 64 * 4


# --- two processes ----------------------------------------------------------------------------------------------


def test_two_processes_train_save_restore_match_one_process(tmp_path):
  procs = _two_processes([str(HERE / "multihost.py"), "{pid}", "2", "{port}", str(tmp_path)], tmp_path)
  ref = _script([str(HERE / "multihost.py"), "0", "0", "0", str(tmp_path)], devices=1)
  assert procs[0]["refused"].startswith(f"output_dir {tmp_path} is in use by another run (pid ")
  assert procs[1]["refused"] == f"output_dir {tmp_path}: process 0 could not lock it; its log says why."
  for got in procs:
    assert got["devices"] == 4
    assert got["embed_shard"] == [128, 32]  # [V, D/2]: the fsdp axis spans the two processes
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=2e-6)

    def flat(t):
      leaves = jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: isinstance(x, list))[0]
      return {jax.tree_util.keystr(p): v for p, v in leaves}

    assert _max_diff(flat(got["params"]), flat(ref["params"])) < 5e-4


def test_sharded_loader_host_memory_is_a_fraction_of_the_model(tmp_path):
  """Two processes, FSDP over their 4 devices: each holds and stages about half the model, never all of it."""
  cfg = dict(
    model_type="llama",
    vocab_size=8000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    tie_word_embeddings=False,
  )
  model_bytes = checkpoints.write(tmp_path / "ckpt", cfg, dtype="bfloat16")  # float32 size of the model
  # A 64-wide model loaded first takes the runtime's one-time costs (~15 MB) out of the measured growth.
  checkpoints.write(tmp_path / "warm", {**cfg, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 176})
  procs = _two_processes(
    [str(HERE / "loader_check.py"), "memory", str(tmp_path / "ckpt"), "{pid}", "{port}", str(tmp_path / "warm")],
    tmp_path,
  )
  for r in procs:
    assert abs(r["held"] - model_bytes / 2) < 0.01 * model_bytes  # this process's shards: half the model
    assert r["read_bytes"] < 0.51 * model_bytes  # it read only its slices
    assert r["peak_staged_bytes"] <= 8000 * 1024 * 4 / 2  # at most half of the largest tensor at once
    # Measured 0.59-0.66 over 12 runs: its half of the model, one staged slice and its device copy, and XLA's
    # buffers. Loading all of the model would be >= 1.0; the staging bound itself is the line above.
    assert r["growth"] < 0.8 * model_bytes, (r["growth"] / model_bytes, r)


def test_dry_run_reports_memory_from_a_config_json(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(LLAMA))
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxtune.parallel.dry_run",
      "--model_config",
      str(tmp_path / "config.json"),
      "--num_devices",
      "1,8",
      "--method",
      "full",
      "--seq",
      "32",
      "--batch_per_device",
      "1",
      "--json",
    ],
    capture_output=True,
    text=True,
    env=_env(1),
    cwd=REPO,
    timeout=240,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  reports = [json.loads(s) for s in out.stdout.splitlines() if s.startswith("{")]
  one, eight = reports
  assert eight["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert one["params"] / eight["params"] > 6  # FSDP: ~1/8 of the weights per device (norms stay whole)
  assert one["optimizer"] / eight["optimizer"] > 6
  assert eight["temp"] > 0 and eight["peak"] >= eight["argument"]
  # By default the program a TPU runs: bf16, the plain kernels, chunked attention (not the CPU layout).
  assert "bfloat16 compute" in out.stdout and "attention chunked, plain kernels" in out.stdout, out.stdout
  assert "the tpu program" in out.stdout


# --- both loaders equally strict (one device, in-process) -------------------------------------------------------


@pytest.mark.parametrize(
  "change, match",
  [
    ("missing", r"tensor 'model.layers.1.mlp.up_proj.weight' is missing \(needed for layers.mlp.up.kernel\)"),
    ("unexpected", r"unexpected tensors model.layers.0.self_attn.q_proj.lora_A.weight"),
    (
      "misshapen",
      r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(47, 64\), but config.json implies "
      r"\(48, 64\)",
    ),
    ("ignored", None),  # rotary inv_freq buffers carry no weights and are allowed
  ],
)
def test_sharded_and_plain_loaders_are_equally_strict(tmp_path, change, match):
  from safetensors.numpy import load_file, save_file

  from jaxtune.hf.load import load_model
  from jaxtune.hf.safetensors_io import CheckpointError
  from jaxtune.parallel.load import load_model_sharded

  checkpoints.write(tmp_path, LLAMA)
  tensors = load_file(tmp_path / "model.safetensors")
  if change == "missing":
    del tensors["model.layers.1.mlp.up_proj.weight"]
  elif change == "unexpected":
    tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 64), np.float32)
  elif change == "misshapen":
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
  else:
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(12, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  cfg = _cfg()
  mesh = mesh_lib.make_mesh(cfg)
  for load in (lambda: load_model(tmp_path), lambda: load_model_sharded(tmp_path, mesh, cfg.rules)):
    if match is None:
      assert load().config.num_layers == 2
    else:
      with pytest.raises(CheckpointError, match=match):
        load()
