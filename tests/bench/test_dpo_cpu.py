"""bench.dpo_cpu: the same pairs on every side, both reference modes, the SFT ratio beside the DPO ones."""

import json
import math

import numpy as np
import pytest

from bench import dpo_cpu


def test_pairs_are_fixed_by_the_seed_and_counted_without_padding():
  pairs = dpo_cpu.make_pairs(3, 5, (2, 4), 100, seed=7)
  assert pairs == dpo_cpu.make_pairs(3, 5, (2, 4), 100, seed=7)
  for p in pairs:
    assert len(p["prompt_ids"]) == 5 and 2 <= len(p["chosen_ids"]) <= 4 and 2 <= len(p["rejected_ids"]) <= 4
    assert min(p["prompt_ids"] + p["chosen_ids"] + p["rejected_ids"]) >= 3
  assert dpo_cpu.pair_tokens(pairs) == sum(10 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def test_a_pair_is_one_example_of_two_sequences_with_the_loss_on_its_completions():
  pair = {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]}
  examples = dpo_cpu.pair_examples([pair])
  assert examples.input_ids.tolist() == [5, 6, 7, 8, 9, 5, 6, 10]
  assert examples.loss_mask.tolist() == [0, 0, 1, 1, 1, 0, 0, 1]
  assert examples.parts.tolist() == [5] and examples.kind == "pairs"


@pytest.mark.slow  # five workers (TRL, two jaxtune DPO, two SFT), each importing its stack: about a minute
def test_smoke_measures_every_side_on_the_same_pairs(capsys):
  result = dpo_cpu.main(["--smoke"])
  sides = result["sides"]
  assert list(sides) == list(dpo_cpu.SIDES)
  assert len({row["trainable"] for row in sides.values()}) == 1  # the same LoRA everywhere
  for s in ("trl", "live", "precomputed"):  # the policy starts as its reference: DPO's loss is log 2
    assert math.isclose(sides[s]["first_loss"], math.log(2), rel_tol=1e-5), (s, sides[s]["first_loss"])
  assert sides["precomputed"]["ref_compile_s"] > 0 and sides["precomputed"]["ref_per_pair_s"] > 0
  pairs = dpo_cpu.make_pairs(2, 8, (8, 16), 256)
  assert result["tokens_per_step"] == dpo_cpu.pair_tokens(pairs)
  for s, row in sides.items():
    assert row["tokens_per_s"] > 0 and row["peak_rss_gb"] > 0, s
    tokens = np.prod(result["sft_shape"]) if s.startswith("sft-") else result["tokens_per_step"]
    assert math.isclose(row["tokens_per_s"] * row["step_s"], tokens), s
  assert set(result["ratios"]) == {"dpo_live", "dpo_precomputed", "sft"}
  out = capsys.readouterr().out
  assert "DPO jaxtune (live reference) / TRL: tokens/s" in out and "SFT jaxtune / HF+PEFT, same run" in out
  assert json.loads(out.strip().splitlines()[-1])["ratios"] == result["ratios"]
