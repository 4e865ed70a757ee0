"""The quickstart (configs/quickstart.py) in reduced form: real SmolLM2-135M, 10 LoRA steps, 8 held-out sentences.

The full command (50 steps, 50 sentences) takes about five minutes on 2 CPU cores; this keeps
the same model, data and settings but fewer steps and examples, and checks the direction of
the gain: no exact answers before, some after.
"""

import json

from jaxtune.tasks import meeting_json
from jaxtune.train import loop

import tiny_runs


def test_quickstart_data_is_made_by_the_script(tmp_path):
  paths = meeting_json.write(tmp_path)
  for split in ("train", "validation", "test"):
    assert paths[split].read_text() == (meeting_json.DATA / f"{split}.jsonl").read_text()
  sentences = {
    split: {json.loads(line)["messages"][1]["content"] for line in paths[split].read_text().splitlines()}
    for split in paths
  }
  assert not sentences["test"] & sentences["train"] and not sentences["validation"] & sentences["train"]


def test_reduced_quickstart_learns_the_task(tmp_path, smollm2_dir, capsys):
  cache = tmp_path / "models"
  cache.mkdir()
  (cache / "smollm2-gguf").symlink_to(smollm2_dir)  # the session's conversion stands in for the built-in one
  config = tiny_runs.load_config("quickstart")
  config.model.cache_dir = str(cache)
  config.data.cache_dir = str(tmp_path / "data")
  config.output_dir = str(tmp_path / "run")
  config.train.steps = 10
  config.optim.warmup_steps = 2
  config.train.eval = False  # validation loss is covered on the tiny config
  config.checkpoint.every = 0
  config.logging.progress = False
  config.task.num_examples = config.task.batch_size = 8
  result = loop.train(config)

  out = capsys.readouterr().out
  assert result["eval/exact_match_before"] <= 0.125
  assert result["eval/exact_match_after"] >= result["eval/exact_match_before"] + 0.25, out
  logged = {k: v for m in tiny_runs.metrics(tmp_path / "run") for k, v in m.items()}
  assert logged["eval/exact_match_before"] == result["eval/exact_match_before"]
  assert logged["eval/exact_match_after"] == result["eval/exact_match_after"]
  # F1 and ROUGE-L on the same answers, each inside its bootstrap interval, in the log line too.
  for name in ("squad_f1", "rougeL"):
    low, high = result[f"eval/{name}_after_ci_low"], result[f"eval/{name}_after_ci_high"]
    assert low <= result[f"eval/{name}_after"] <= high and logged[f"eval/{name}_after"] == result[f"eval/{name}_after"]
  assert "json after training:" in out and "squad_f1 " in out and "rougeL " in out
  assert "attention: chunked (auto: cpu" in out and "kernels: cpu (auto: CPU" in out  # resolved "auto"s reported
  assert "before:" in out and "after:" in out and f"checkpoint: {tmp_path / 'run' / 'checkpoints' / '10'}" in out
  state = tiny_runs.saved_state(tmp_path / "run", 10)
  assert all("lora" in k for k in state if k.startswith("params/"))  # adapters only: a small checkpoint
