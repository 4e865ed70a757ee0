"""Round trips without training: HF in, merged out, every tensor identical in its original dtype.

Also: sharding with an index, the chat template surviving export, generation_config EOS ids,
and refusing to write over an existing model unless asked to.
"""

import json
import tracemalloc

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxtune.export import ExportError, export_merged
from jaxtune.hf.load import load_model
from jaxtune.peft import apply_lora

import tiny_hf
from export_helpers import read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*holds no tokenizer files")  # tiny_hf saves no tokenizer


def _assert_identical(out_dir, source_dir):
  got, want = read_checkpoint(out_dir), read_checkpoint(source_dir)
  assert set(got) == set(want)
  for name, value in want.items():
    assert got[name].dtype == value.dtype, name
    assert np.array_equal(got[name].view(np.uint8), value.view(np.uint8)), name  # bit for bit


@pytest.mark.parametrize("family,dtype", [("llama", None), ("qwen2", None), ("gemma2", torch.bfloat16)])
def test_hf_in_merged_out_is_identical(family, dtype, tmp_path):
  tiny_hf.build(family, tmp_path / "src", dtype=dtype)
  model = load_model(tmp_path / "src")  # float32 in jaxtune: bf16 -> f32 -> bf16 is exact
  out = export_merged(model, tmp_path / "src", tmp_path / "out")
  _assert_identical(out, tmp_path / "src")
  config = json.loads((out / "config.json").read_text())
  assert config["dtype"] == ("bfloat16" if dtype else "float32")


def test_untrained_lora_merges_to_the_base_exactly(tmp_path):
  tiny_hf.build("gemma2", tmp_path / "src", dtype=torch.bfloat16)
  model = apply_lora(
    load_model(tmp_path / "src"), rank=2, alpha=4.0, targets=["q_proj", "down_proj"], rngs=nnx.Rngs(0)
  )  # B = 0 at init
  _assert_identical(export_merged(model, tmp_path / "src", tmp_path / "out"), tmp_path / "src")


def test_sharded_export_has_an_index_and_loads(tmp_path):
  hf_model = tiny_hf.build("llama", tmp_path / "src")
  model = load_model(tmp_path / "src")
  out = export_merged(model, tmp_path / "src", tmp_path / "out", max_shard_bytes=60_000)
  shards = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in read_checkpoint(out).values())
  _assert_identical(out, tmp_path / "src")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  ids = torch.tensor([[5, 9, 17, 33, 2]])
  with torch.no_grad():
    assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)

  # A second export into the same directory is refused, then replaces every old shard when allowed.
  with pytest.raises(ExportError, match=r"already holds a model .*--overwrite"):
    export_merged(model, tmp_path / "src", out)
  export_merged(model, tmp_path / "src", out, overwrite=True)
  assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
  assert not (out / "model.safetensors.index.json").exists()  # a stale index would point at deleted shards
  _assert_identical(out, tmp_path / "src")


def test_smollm2_round_trip_keeps_weights_and_chat_template(smollm2_dir, smollm2_lora, tmp_path):
  tracemalloc.start()  # numpy registers its buffers with tracemalloc: this sees every host copy the export makes
  try:
    out = export_merged(smollm2_lora, smollm2_dir, tmp_path / "out")  # adapters at init: the base function
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  _assert_identical(out, smollm2_dir)
  sizes = [v.nbytes for v in read_checkpoint(out).values()]
  assert peak < 2 * max(sizes) < 0.5 * sum(sizes), (peak, max(sizes), sum(sizes))  # one tensor at a time
  before = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  after = transformers.AutoTokenizer.from_pretrained(out)
  messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
  ]
  rendered = before.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert "<|im_start|>assistant" in rendered  # a real template, not a fallback
  assert after.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
  assert after("Hello world 123")["input_ids"] == before("Hello world 123")["input_ids"]
  generation = json.loads((out / "generation_config.json").read_text())
  vocab = after.get_vocab()
  assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= set(generation["eos_token_id"])


def test_export_refuses_another_architecture_and_its_own_source(smollm2_dir, tmp_path):
  tiny_hf.build("llama", tmp_path / "src")
  model = load_model(tmp_path / "src")
  with pytest.raises(ExportError, match=r"config.json: describes a different model"):
    export_merged(model, smollm2_dir, tmp_path / "out")
  with pytest.raises(ExportError, match=r"src: is the source checkpoint directory itself"):
    export_merged(model, tmp_path / "src", tmp_path / "src", overwrite=True)
  assert (tmp_path / "src" / "model.safetensors").is_file()
