"""PEFT LoRA adapter directories onto a base model: PEFT's own logits, jaxtune's exports read back, and refusals."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune.errors import UserError
from jaxtune.export import export_adapter
from jaxtune.hf.load import load_model
from jaxtune.peft.import_adapter import AdapterError, load_adapter
from jaxtune.peft.lora import lora_weights

import tiny_hf
import tiny_runs
from export_helpers import assert_close_logits, lora_model

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_adapter_saved_by_peft_gives_peft_logits(tmp_path, peft):
  import torch

  hf = tiny_hf.build("llama", tmp_path / "base")  # untied, head_dim 24 != hidden / heads, llama3 rope
  config = peft.LoraConfig(
    r=4, lora_alpha=8, target_modules=LINEAR + ["lm_head"], use_rslora=True, init_lora_weights=False
  )
  peft_model = peft.get_peft_model(hf, config).eval()  # init_lora_weights=False: B is random, not zero
  peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)  # the adapters alone
  ids = np.random.default_rng(0).integers(3, 128, size=(2, 16))
  with torch.no_grad():
    want = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
  base = load_model(tmp_path / "base")
  model = load_adapter(base, tmp_path / "adapter")
  assert_close_logits(np.asarray(model(ids)), want, what="jaxtune + adapter vs PEFT")
  assert np.abs(np.asarray(base(ids)) - want).max() > 0.05 * np.abs(want).max()  # the adapter matters
  assert not lora_weights(base)  # the base is left as it was


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
  """jaxtune LoRA (rsLoRA, three module kinds) on tiny-random with random A and B, and its exported adapter."""
  model = lora_model(tiny_dir, rank=4, alpha=8.0, seed=1, use_rslora=True, targets=["q", "v", "down"])
  return model, export_adapter(model, tmp_path_factory.mktemp("adapter"), str(tiny_dir))


def test_exported_adapter_loads_back_to_the_same_parameters(tiny, exported):
  model, out = exported
  loaded = lora_weights(load_adapter(tiny[0], out))
  want = lora_weights(model)
  assert (
    [w.path for w in loaded]
    == [w.path for w in want]
    == [("layers", "attn", "q"), ("layers", "attn", "v"), ("layers", "mlp", "down")]
  )
  for got, ref in zip(loaded, want):
    assert got.scale == ref.scale == 8.0 / 2.0  # rsLoRA: alpha / sqrt(r)
    np.testing.assert_array_equal(np.asarray(got.a), np.asarray(ref.a))
    np.testing.assert_array_equal(np.asarray(got.b), np.asarray(ref.b))


def _damaged(src, dst, config=None, tensors=None):
  shutil.copytree(src, dst)
  if config is not None:
    path = dst / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
  if tensors is not None:
    path = dst / "adapter_model.safetensors"
    save_file(tensors(load_file(path)), str(path))
  return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
  "config, tensors, match",
  [
    ({"peft_type": "IA3"}, None, r"adapter_config.json: peft_type is 'IA3'; only LORA adapters"),
    ({"use_dora": True}, None, rf"tensor '{Q0}.lora_magnitude_vector' is missing"),
    (
      None,
      lambda t: {**t, Q0 + ".lora_magnitude_vector": np.ones(32, np.float32)},
      rf"adapter_config.json: use_dora is not true, but tensor '{Q0}.lora_magnitude_vector' is a DoRA magnitude",
    ),
    ({"modules_to_save": ["lm_head"]}, None, r"modules_to_save is \['lm_head'\]: modules trained in full"),
    ({"layers_to_transform": [0]}, None, r"layers_to_transform is \[0\]: adapters on some layers only"),
    ({"rank_pattern": {"q_proj": 8}}, None, r"rank_pattern is \{'q_proj': 8\}: a rank per module"),
    ({"bias": "all"}, None, r"bias is 'all': trained biases are not supported"),
    ({"r": 8}, None, rf"{Q0}.lora_A.weight has shape \(4, 32\), expected \(8, 32\) for r=8"),
    (
      None,
      lambda t: {**t, Q0 + ".lora_B.weight": t[Q0 + ".lora_B.weight"][:16]},
      rf"{Q0}.lora_B.weight has shape \(16, 4\), expected \(32, 4\)",
    ),
    (
      None,
      lambda t: {k: v for k, v in t.items() if "layers.1.mlp" not in k},
      r"'base_model.model.model.layers.1.mlp.down_proj.lora_A.weight' is missing",
    ),
    (
      None,
      lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 128), np.float32)},
      r"tensor 'base_model.model.model.embed_tokens.lora_embedding_A' is not a LoRA factor",
    ),
    (
      None,
      lambda t: {**t, Q0.replace(".0.", ".2.") + ".lora_A.weight": t[Q0 + ".lora_A.weight"]},
      r"layers.2.self_attn.q_proj.lora_A.weight' is for no layer of this model \(2 layers\)",
    ),
  ],
  ids=[
    "ia3",
    "dora_without_magnitudes",
    "magnitude_without_dora",
    "modules_to_save",
    "some_layers",
    "rank_pattern",
    "bias",
    "rank",
    "shape",
    "missing",
    "embedding",
    "extra_layer",
  ],
)
def test_refusals_name_the_key_or_tensor(tiny, exported, tmp_path, config, tensors, match):
  adapter = _damaged(exported[1], tmp_path / "adapter", config, tensors)
  with pytest.raises(AdapterError, match=match) as info:
    load_adapter(tiny[0], adapter)
  assert isinstance(info.value, UserError) and str(adapter) in str(info.value)


def test_missing_files(tiny, exported, tmp_path):
  adapter = _damaged(exported[1], tmp_path / "adapter")
  (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
  with pytest.raises(AdapterError, match=r"adapter_model.safetensors: not found; it holds adapter_model.bin, a pickle"):
    load_adapter(tiny[0], adapter)
  with pytest.raises(AdapterError, match=r"nowhere: not a directory; pass a PEFT adapter directory"):
    load_adapter(tiny[0], tmp_path / "nowhere")


def test_an_adapter_for_another_base_is_refused_naming_both(tiny, exported, tmp_path):
  adapter = _damaged(exported[1], tmp_path / "adapter", {"base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
  with pytest.raises(AdapterError, match=r"is 'meta-llama/Llama-3.2-1B', but the model is 'me/tiny'.*model.hub_id"):
    load_adapter(tiny[0], adapter, base="me/tiny")
  load_adapter(tiny[0], adapter, base="Meta-Llama/llama-3.2-1b")  # the same id, however it is cased
  load_adapter(tiny[0], adapter, base=str(tmp_path))  # a local base: nothing to compare the name with


def test_peft_adapter_continues_training_and_exports_the_same_tensors(tmp_path, peft):
  """PEFT -> jaxtune (`model.adapter`, one step at learning rate 0) -> PEFT: the same names, dtypes and values,
  the base named by model.hub_id, and a model card."""
  import transformers

  from jaxtune.export.run import export_run
  from jaxtune.train import builtin_models, loop

  cache = tmp_path / "cache"
  base_dir = builtin_models.resolve("tiny-random", str(cache / "models"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
  lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
  peft.get_peft_model(hf, lora).save_pretrained(tmp_path / "theirs")
  config = tiny_runs.tiny(tmp_path / "run", cache, **{"train.steps": 1, "optim.lr": 0.0, "optim.warmup_steps": 0})
  config.model.adapter, config.model.hub_id = str(tmp_path / "theirs"), "me/tiny-random"
  config.train.eval, config.checkpoint.every = False, 0
  loop.train(config)
  out = export_run(tmp_path / "run", tmp_path / "ours", "adapter")
  theirs, ours = (
    load_file(tmp_path / "theirs" / "adapter_model.safetensors"),
    load_file(out / "adapter_model.safetensors"),
  )
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    assert ours[name].dtype == value.dtype, name
    np.testing.assert_allclose(ours[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
  assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/tiny-random"
  assert "base_model: me/tiny-random" in (out / "README.md").read_text()


def test_a_builtin_base_is_named_by_its_hub_id_and_its_provenance(exported, tmp_path):
  from jaxtune.train import builtin_models

  assert builtin_models.base_name("smollm2-gguf", "", "/cache/smollm2-gguf") == "HuggingFaceTB/SmolLM2-135M-Instruct"
  assert builtin_models.base_name("smollm2-gguf", "me/mine", "/cache") == "me/mine"
  assert builtin_models.base_name("/data/my-llama", "", "/data/my-llama") == "/data/my-llama"
  note = builtin_models.PROVENANCE["smollm2-gguf"]
  out = export_adapter(exported[0], tmp_path / "adapter", "HuggingFaceTB/SmolLM2-135M-Instruct", provenance=note)
  card = (out / "README.md").read_text()
  assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "4-bit (Q4_1) GGUF" in card
