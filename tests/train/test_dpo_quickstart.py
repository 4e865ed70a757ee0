"""The preference demo (configs/dpo_quickstart.py): its data, and (slow) the whole chain on the real SmolLM2-135M:
the quickstart, its adapter exported, then DPO from that adapter."""

import json

import pytest

from jaxtune.export.run import export_run
from jaxtune.tasks import meeting_json, meeting_prefs
from jaxtune.train import loop

import tiny_runs


def test_preference_data_is_made_by_the_script(tmp_path):
  paths = meeting_prefs.write(tmp_path)
  for split in ("train", "validation", "test"):
    assert paths[split].read_text() == (meeting_prefs.DATA / f"{split}.jsonl").read_text()
  quickstart = {
    json.loads(line)["messages"][1]["content"]
    for path in meeting_json.DATA.glob("*.jsonl")
    for line in path.read_text().splitlines()
  }
  pairs = [json.loads(line) for line in paths["train"].read_text().splitlines()]
  assert not {p["prompt"][1]["content"] for p in pairs} & quickstart  # new sentences
  for p in pairs:
    chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
    assert json.loads(chosen) == json.loads(rejected) and " " not in chosen and ", " in rejected


@pytest.mark.slow
def test_dpo_after_the_quickstart_moves_the_answers_to_the_compact_form(tmp_path, smollm2_dir):
  cache = tmp_path / "models"
  cache.mkdir()
  (cache / "smollm2-gguf").symlink_to(smollm2_dir)
  settings = {"model.cache_dir": str(cache), "data.cache_dir": str(tmp_path / "data"), "logging.progress": False}
  sft = tiny_runs.load_config("quickstart")
  sft.update_from_flattened_dict({**settings, "output_dir": str(tmp_path / "sft"), "task.before": False})
  loop.train(sft)
  adapter = export_run(tmp_path / "sft", tmp_path / "adapter", "adapter")
  dpo = tiny_runs.load_config("dpo_quickstart")
  dpo.update_from_flattened_dict({**settings, "output_dir": str(tmp_path / "dpo"), "model.adapter": str(adapter)})
  result = loop.train(dpo)
  assert result["eval/exact_match_before"] == 0.0  # the SFT adapter answers with json.dumps' spaces
  assert result["eval/exact_match_after"] >= 0.9
  assert result["eval/rewards/accuracies"] >= 0.9 and result["eval/rewards/margins"] > 1.0
