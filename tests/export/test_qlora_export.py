"""QLoRA adapters export in PEFT's layout: PEFT on a base holding our dequantised weights gives our logits.

The adapters were fitted to the NF4 base, so on the original 16-bit base PEFT gives other logits by the
quantisation error; the test measures that difference too, so the closing figures come from a run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

from jaxtune.export import export_adapter, export_merged
from jaxtune.hf.load import load_model

import tiny_configs
import tiny_hf
from export_helpers import assert_close_logits, lora_model

pytestmark = pytest.mark.filterwarnings("ignore:.*holds no tokenizer files")  # tiny_hf saves no tokenizer
NF4 = dict(quantize="nf4", double_quant=True)


def _logits(hf_model, ids):
  with torch.no_grad():
    return hf_model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("family", tiny_configs.QUANT_FAMILIES)
def test_qlora_adapter_loads_in_peft_on_the_dequantised_base(family, tmp_path, peft):
  source = tmp_path / "base"
  hf_base = tiny_hf.build(family, source, **tiny_configs.QUANT_SIZES)
  model = lora_model(source, rank=4, alpha=8.0, seed=1, load=NF4)
  ids = np.random.default_rng(0).integers(3, 128, size=(2, 16))
  ours = np.asarray(model(ids))

  dequantised = export_merged(load_model(source, **NF4), source, tmp_path / "dequantised")  # no adapters: the base
  hf_dequantised = transformers.AutoModelForCausalLM.from_pretrained(dequantised, dtype=torch.float32).eval()
  adapter = export_adapter(model, tmp_path / "adapter", str(source))
  peft_model = peft.PeftModel.from_pretrained(hf_dequantised, adapter).eval()
  assert_close_logits(_logits(peft_model, ids), ours, what=family)

  merged = export_merged(model, source, tmp_path / "merged")  # merged into the dequantised base
  hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
  assert_close_logits(_logits(hf_merged, ids), ours, what=f"{family} merged")

  on_original = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), adapter).eval(), ids)
  gap = np.abs(on_original - ours).max() / np.abs(ours).max()
  print(f"{family}: PEFT on the 16-bit base differs by {gap:.3g} x max |logit| (NF4 rounding)")
  assert gap > 1e-3  # the base the adapter loads onto matters: the check above is not vacuous
