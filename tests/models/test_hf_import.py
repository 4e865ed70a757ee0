"""HF checkpoint import: layouts, hub cache, bad input, streaming memory."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy

import jaxtune
from jaxtune.hf.safetensors_io import CheckpointError, SafetensorsFile

import tiny_configs
import tiny_hf


@pytest.fixture
def llama_dir(tmp_path):
  tiny_hf.build("llama", tmp_path)
  return tmp_path


def _tensors(directory: pathlib.Path) -> dict:
  return safetensors.numpy.load_file(directory / "model.safetensors")


def _save(directory: pathlib.Path, tensors: dict) -> None:
  safetensors.numpy.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_reader_matches_safetensors_library(llama_dir):
  ours = SafetensorsFile(llama_dir / "model.safetensors")
  for name, ref in _tensors(llama_dir).items():
    np.testing.assert_array_equal(ours.get(name), ref)
    np.testing.assert_array_equal(ours.get_slice(name, (slice(0, 1),)), ref[0:1])


def test_sharded_checkpoint_with_index(tmp_path):
  hf_model = tiny_hf.build("qwen2", tmp_path)
  hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
  ids = np.arange(3, 20)[None]
  np.testing.assert_array_equal(
    np.asarray(jaxtune.load_model(tmp_path / "sharded")(ids)), np.asarray(jaxtune.load_model(tmp_path)(ids))
  )


def test_hub_id_resolves_from_local_cache_offline(llama_dir, tmp_path, monkeypatch):
  import huggingface_hub.constants

  cache = tmp_path / "hub"
  snapshot = cache / "models--someorg--tiny-llama" / "snapshots" / ("a" * 40)
  snapshot.mkdir(parents=True)
  for f in [f for f in llama_dir.iterdir() if f.is_file()]:
    (snapshot / f.name).write_bytes(f.read_bytes())
  (cache / "models--someorg--tiny-llama" / "refs").mkdir()
  (cache / "models--someorg--tiny-llama" / "refs" / "main").write_text("a" * 40)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  ids = np.arange(3, 9)[None]
  np.testing.assert_array_equal(
    np.asarray(jaxtune.load_model("someorg/tiny-llama")(ids)), np.asarray(jaxtune.load_model(llama_dir)(ids))
  )


def test_pickle_only_directory_is_refused(llama_dir):
  (llama_dir / "model.safetensors").unlink()
  (llama_dir / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(
    CheckpointError,
    match=r"only pickle checkpoints \(pytorch_model.bin\).*runs arbitrary code"
    r".*save_pretrained",
  ):
    jaxtune.load_model(llama_dir)


def test_missing_tensor_is_named(llama_dir):
  tensors = _tensors(llama_dir)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  _save(llama_dir, tensors)
  with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
    jaxtune.load_model(llama_dir)


def test_wrongly_shaped_tensor_is_named(llama_dir):
  tensors = _tensors(llama_dir)
  tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
  _save(llama_dir, tensors)
  with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(47, 64\)"):
    jaxtune.load_model(llama_dir)


def test_unexpected_tensor_is_named(llama_dir):
  tensors = _tensors(llama_dir)
  tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 64), np.float32)
  _save(llama_dir, tensors)
  with pytest.raises(CheckpointError, match=r"unexpected tensors model.layers.0.self_attn.q_proj.lora_A.weight"):
    jaxtune.load_model(llama_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_safetensors_file(llama_dir, damage):
  path = llama_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(
    {
      "truncate": data[: len(data) // 2],
      "garbage_header": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + data[20:],
      "empty": b"",
    }[damage]
  )
  with pytest.raises(CheckpointError, match=r"model.safetensors: .*(truncated|corrupt|too short).*re-download"):
    jaxtune.load_model(llama_dir)


def test_missing_directory_and_bad_hub_id(tmp_path):
  with pytest.raises(CheckpointError, match="not a directory"):
    jaxtune.load_model(tmp_path / "nope")
  with pytest.raises(Exception, match="config.json"):
    jaxtune.load_model(tmp_path)


def test_streaming_load_peak_memory_stays_near_one_model(tmp_path):
  """Loading a bf16 checkpoint into float32 costs about the float32 model, never twice it."""
  cfg = dict(
    model_type="llama",
    vocab_size=8000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    tie_word_embeddings=False,
  )
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  from jaxtune.hf.mapping import tensor_maps
  from jaxtune.models.config import from_hf_dict

  rng = np.random.default_rng(0)
  shapes = {"model.embed_tokens.weight": (8000, 1024), "lm_head.weight": (8000, 1024), "model.norm.weight": (1024,)}
  per_layer = {
    "input_layernorm.weight": (1024,),
    "post_attention_layernorm.weight": (1024,),
    "self_attn.q_proj.weight": (1024, 1024),
    "self_attn.k_proj.weight": (1024, 1024),
    "self_attn.v_proj.weight": (1024, 1024),
    "self_attn.o_proj.weight": (1024, 1024),
    "mlp.gate_proj.weight": (2816, 1024),
    "mlp.up_proj.weight": (2816, 1024),
    "mlp.down_proj.weight": (1024, 2816),
  }
  for i in range(8):
    shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
  assert {n for m in tensor_maps(from_hf_dict(cfg)) for n in m.hf_names(8)} == set(shapes)
  import ml_dtypes

  tensors = {k: rng.standard_normal(v, np.float32).astype(ml_dtypes.bfloat16) for k, v in shapes.items()}
  _save(tmp_path, tensors)
  model_bytes = sum(np.prod(v) for v in shapes.values()) * 4
  del tensors
  # Anonymous memory (RssAnon), sampled every 2 ms: the process's own allocations. File pages the kernel maps in
  # for reading are cache, not memory the loader holds, and vary with what ran before.
  script = textwrap.dedent(f"""
      import threading, time, jax.numpy as jnp, jaxtune
      def anon():
        return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024
      jnp.ones(1).block_until_ready()
      before, peak, done = anon(), [0], threading.Event()
      def sample():
        while not done.is_set():
          peak[0] = max(peak[0], anon())
          time.sleep(0.002)
      thread = threading.Thread(target=sample)
      thread.start()
      model = jaxtune.load_model({str(tmp_path)!r})
      done.set()
      thread.join()
      print(max(peak[0], anon()) - before)
  """)
  # A fixed mmap threshold makes glibc return freed per-tensor buffers to the OS at once; with its dynamic
  # threshold it keeps a varying amount cached in the heap, which is not memory the loader holds.
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "1000000"}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
  growth = int(out.stdout.split()[-1])
  # Measured 1.25x: the float32 model plus one tensor in flight and XLA's own buffers.
  assert growth < 1.4 * model_bytes, (growth / 2**20, model_bytes / 2**20)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_weight_table_covers_the_model_and_its_layouts_agree(model_type):
  """Each entry's shape is the model's; to_jax inverts to_hf; every block reads as that block of to_jax."""
  from flax import nnx

  from jaxtune.hf.mapping import tensor_maps
  from jaxtune.models.config import from_hf_dict
  from jaxtune.models.transformer import CausalLM

  cfg = from_hf_dict(dict(tiny_configs.ANY_FAMILY_UNTIED, model_type=model_type))
  state = nnx.state(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  shapes = {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}
  table = tensor_maps(cfg)
  assert {m.path for m in table} == set(shapes)
  rng = np.random.default_rng(0)
  for m in table:
    assert shapes[m.path] == ((2,) if m.stacked else ()) + m.shape, m.path
    ours = rng.standard_normal(m.shape)
    hf = m.to_hf(ours)
    assert hf.shape == m.hf_shape
    np.testing.assert_array_equal(m.to_jax(hf), ours)
    block = tuple(slice(*sorted(rng.choice(n + 1, 2, replace=False))) for n in m.shape)
    hf_index, to_ours = m.hf_block(block)
    np.testing.assert_array_equal(to_ours(hf[hf_index]), ours[block])
