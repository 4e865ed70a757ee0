"""IA3, prompt tuning and prefix tuning against PEFT 0.21: each exported adapter loads with
`PeftModel.from_pretrained` and gives PEFT's logits and greedy generation, on tiny random Llama, Qwen2 and
Gemma 2 (float32), the adapters moved away from their init; IA3's merged export equals PEFT's merge."""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxtune.export import export_adapter
from jaxtune.generation import generate_ids
from jaxtune.hf.load import load_model
from jaxtune.peft import ia3 as ia3_lib
from jaxtune.peft import virtual as virtual_lib

import tiny_hf
from export_helpers import assert_close_logits

FAMILIES = ("llama", "qwen2", "gemma2")
P = 4  # virtual tokens
pytestmark = pytest.mark.filterwarnings("ignore:.*holds no tokenizer files", "ignore:.*inference_mode")


@nnx.jit
def _logits(model, ids):
  return model(ids)


def _adapt(method: str, model, seed: int = 1):
  if method == "ia3":
    ia3_lib.apply_ia3(model)
  elif method == "prompt":
    virtual_lib.apply_prompt_tuning(model, num_virtual_tokens=P, init_ids=[5, 6, 7, 8], rngs=nnx.Rngs(seed))
  elif method == "prefix":
    virtual_lib.apply_prefix_tuning(model, num_virtual_tokens=P, rngs=nnx.Rngs(seed))
    model.virtual.prefix.set_value(0.5 * model.virtual.prefix[...])
  elif method == "prefix_mlp":
    virtual_lib.apply_prefix_tuning(model, num_virtual_tokens=P, projection=True, hidden=32, rngs=nnx.Rngs(seed))
  if method == "ia3":
    rng = np.random.default_rng(seed)
    for _, m in ia3_lib.ia3_modules(model):
      scale = m.adapter.ia3_l
      scale.set_value(jnp.asarray(1.0 + 0.3 * rng.standard_normal(scale.shape), jnp.float32))
  elif method == "prompt":
    rng = np.random.default_rng(seed)
    e = model.virtual.embeddings
    e.set_value(e[...] + jnp.asarray(0.05 * rng.standard_normal(e.shape), jnp.float32))
  return model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
  source = tmp_path_factory.mktemp(request.param)
  return request.param, source, tiny_hf.build(request.param, source)


IDS = np.random.default_rng(0).integers(3, 128, size=(2, 12))


def _ours(model, method):
  """Our logits over the text's positions (the virtual slots come first and are dropped)."""
  count = virtual_lib.num_virtual_tokens(model)
  ids = np.asarray([virtual_lib.with_virtual(row, count) for row in IDS.tolist()], np.int32)
  return np.asarray(_logits(model, ids))[:, count:]


@pytest.mark.parametrize("method", ["ia3", "prompt", "prefix", pytest.param("prefix_mlp", marks=pytest.mark.slow)])
def test_exported_adapter_gives_peft_logits_and_generation(family, method, tmp_path, peft):
  name, source, hf_base = family
  model = _adapt(method, load_model(source))
  adapter = export_adapter(model, tmp_path / "adapter", str(source))
  config = json.loads((adapter / "adapter_config.json").read_text())
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), adapter).eval()
  assert type(peft_model.peft_config["default"]).__name__.upper().startswith(config["peft_type"].replace("_", ""))
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.tensor(IDS)).logits.numpy()
    base = hf_base(input_ids=torch.tensor(IDS)).logits.numpy()
  theirs = theirs[:, -IDS.shape[1] :]  # prompt tuning's logits cover its virtual tokens too
  ours = _ours(model, method)
  assert_close_logits(ours, theirs, what=f"{name} {method}")
  assert np.abs(base - ours).max() > 0.05 * np.abs(ours).max(), "the adapter must change the logits"
  new = 6
  assert generate_ids(model, IDS.tolist(), max_new_tokens=new) == _peft_greedy(peft_model, method, new), (
    f"{name} {method}"
  )


def _peft_greedy(peft_model, method: str, new: int) -> list[list[int]]:
  """PEFT's greedy continuation of IDS: IA3's from `generate`; prompt and prefix tuning's from a greedy loop over
  PEFT's forward pass: with transformers 5, PEFT 0.21's `generate` for these two disagrees with its own forward
  pass on these models (prompt tuning from the second new token, prefix tuning from the first)."""
  ids = torch.tensor(IDS)
  with torch.no_grad():
    if method == "ia3":
      out = peft_model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False
      )
      return out[:, -new:].tolist()
    for _ in range(new):
      ids = torch.cat([ids, peft_model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
  return ids[:, -new:].tolist()


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
  source = tmp_path_factory.mktemp("gemma2_packed")
  tiny_hf.build("gemma2", source)
  return "gemma2", source, None


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_packed_examples_each_get_their_virtual_tokens(gemma2, method):
  """Two examples through the data pipeline's virtual slots, packed in one row (segments 1, 2; positions from 0
  in each) give the logits each gives alone; on Gemma 2, whose sliding window (8) the 20-slot row exceeds."""
  from jaxtune.data.examples import Examples
  from jaxtune.data.pipeline import with_virtual_tokens

  name, source, _ = gemma2
  model = _adapt(method, load_model(source))
  a, b = IDS[0, :7], IDS[1, :9]
  flat = Examples(
    np.concatenate([a, b]).astype(np.int32),
    np.ones(16, np.int8),
    np.array([0, 7, 16]),
    np.zeros(2, np.uint64),
    ["a", "b"],
  )
  examples = with_virtual_tokens(flat, P)
  alone = [examples[i][0] for i in range(2)]
  assert alone[0].tolist() == virtual_lib.with_virtual(a.tolist(), P) and examples[1][1][:P].sum() == 0
  row = np.concatenate(alone)[None]
  segments = np.concatenate([np.full(len(x), i + 1) for i, x in enumerate(alone)])[None]
  positions = np.concatenate([np.arange(len(x)) for x in alone])[None]
  packed = np.asarray(nnx.jit(lambda m, r, s, p: m(r, segment_ids=s, positions=p))(model, row, segments, positions))
  for i, ids in enumerate(alone):
    want = np.asarray(_logits(model, ids[None]))[0]
    start = sum(len(x) for x in alone[:i])
    assert_close_logits(packed[0, start : start + len(ids)], want, rel=1e-5, what=f"{name} {method} example {i}")
