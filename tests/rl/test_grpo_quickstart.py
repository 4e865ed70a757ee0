"""(slow) configs/grpo_quickstart.py on the real SmolLM2-135M-Instruct: rewards alone teach it the JSON answers."""

import pytest

from jaxtune.train import loop

import tiny_runs


@pytest.mark.slow
def test_grpo_quickstart_raises_the_reward_and_the_held_out_exact_match(tmp_path, smollm2_dir):
  cache = tmp_path / "models"
  cache.mkdir()
  (cache / "smollm2-gguf").symlink_to(smollm2_dir)
  config = tiny_runs.load_config("grpo_quickstart")
  config.update_from_flattened_dict(
    {"model.cache_dir": str(cache), "output_dir": str(tmp_path / "run"), "logging.progress": False}
  )
  result = loop.train(config)
  rewards = [m["train/reward"] for m in tiny_runs.metrics(tmp_path / "run") if "train/reward" in m]
  first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
  print(f"reward: first 10 steps {first:.3f}, last 10 {last:.3f}; exact match {result['eval/exact_match_after']:.0%}")
  assert last >= max(2 * first, 1.5)  # of 4: object 0.5, valid JSON 0.5, fields 2, time 1
  assert result["eval/exact_match_after"] > result["eval/exact_match_before"]
