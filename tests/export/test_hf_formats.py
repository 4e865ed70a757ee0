"""Every family: LoRA model -> merged HF checkpoint and PEFT adapter, checked by loading them in transformers/PEFT.

For each family of tests/models/tiny_hf.py: load with jaxtune, add LoRA with random B, export,
then compare against jaxtune's own LoRA model (float32 logits within 1e-4 of the logit scale,
greedy tokens equal). One jaxtune forward per family serves all checks: its batch holds
random ids and transformers' greedy generation, whose every token must be jaxtune's argmax.
"""

import copy
import dataclasses
import json
import pathlib

import numpy as np
import pytest
import torch
import transformers

from jaxtune.export import export_adapter, export_merged
from jaxtune.generation import generate_ids
from jaxtune.hf.safetensors_io import SafetensorsFile

import tiny_configs
import tiny_hf
from export_helpers import assert_close_logits, lora_model, read_checkpoint

PROMPT, NEW, SEQ = 8, 16, 24
pytestmark = pytest.mark.filterwarnings("ignore:.*holds no tokenizer files")  # tiny_hf saves no tokenizer


@dataclasses.dataclass
class Case:
  family: str
  source: pathlib.Path
  hf_base: torch.nn.Module
  model: object  # jaxtune CausalLM with LoRA
  merged_dir: pathlib.Path
  hf_merged: torch.nn.Module
  ids: np.ndarray  # [2, SEQ]: random ids; prompt + transformers' greedy continuation
  logits: np.ndarray  # jaxtune LoRA model's logits for ids


@pytest.fixture(scope="module", params=sorted(tiny_configs.FAMILIES))
def case(request, tmp_path_factory):
  family = request.param
  source = tmp_path_factory.mktemp(family)
  hf_base = tiny_hf.build(family, source)
  model = lora_model(source, rank=4, alpha=8.0, seed=1)
  merged_dir = export_merged(model, source, tmp_path_factory.mktemp(f"{family}_merged"))
  hf_merged = transformers.AutoModelForCausalLM.from_pretrained(
    merged_dir, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, 128, size=(1, PROMPT))
  with torch.no_grad():
    gen = hf_merged.generate(
      torch.tensor(prompt),
      attention_mask=torch.ones(1, PROMPT, dtype=torch.long),
      max_new_tokens=NEW,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    ).numpy()
  ids = np.concatenate([rng.integers(3, 128, size=(1, SEQ)), gen], axis=0)
  logits = np.asarray(model(ids))
  return Case(family, source, hf_base, model, merged_dir, hf_merged, ids, logits)


def _torch_logits(hf_model, ids):
  with torch.no_grad():
    return hf_model(input_ids=torch.tensor(ids)).logits.numpy()


def test_merged_logits_match_jaxtune_lora_model(case):
  assert_close_logits(_torch_logits(case.hf_merged, case.ids), case.logits, what=case.family)
  base = _torch_logits(case.hf_base, case.ids)  # the adapters must matter, or this test proves nothing
  assert np.abs(base - case.logits).max() > 0.05 * np.abs(case.logits).max(), case.family  # 500x the tolerance


def test_merged_greedy_generation_matches_jaxtune(case):
  continuation = case.ids[1, PROMPT:]
  ours = case.logits[1, PROMPT - 1 : SEQ - 1].argmax(-1)  # jaxtune's greedy choice after each prefix
  assert ours.tolist() == continuation.tolist(), case.family
  if case.family == "llama":  # and once through jaxtune's own KV-cache generation loop
    assert generate_ids(case.model, [case.ids[1, :PROMPT].tolist()], max_new_tokens=NEW) == [continuation.tolist()]


def test_merged_files(case):
  tensors = read_checkpoint(case.merged_dir)
  source = read_checkpoint(case.source)
  assert set(tensors) == set(source), case.family  # same names; tied models have no lm_head (vLLM rejects it)
  config = json.loads((case.merged_dir / "config.json").read_text())
  assert config["dtype"] == "float32" and "torch_dtype" not in config
  if config.get("tie_word_embeddings", True):
    assert "lm_head.weight" not in tensors
  assert SafetensorsFile(case.merged_dir / "model.safetensors").metadata == {"format": "pt"}


def test_adapter_loads_in_peft_with_same_logits(case, tmp_path, peft):
  out = export_adapter(case.model, tmp_path / "adapter", str(case.source))
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(case.hf_base), out).eval()
  assert_close_logits(_torch_logits(peft_model, case.ids), case.logits, what=case.family)
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
  assert config["base_model_name_or_path"] == str(case.source)
