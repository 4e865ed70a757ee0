"""`jaxtune chat --run`: a run trained for real answers as `generate` does with the run's model."""

import pytest

from jaxtune.chat import ANSWER, main
from jaxtune.export.run import load_run
from jaxtune.generation import generate
from jaxtune.hf.load import load_tokenizer
from jaxtune.train import loop

import tiny_runs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """configs/tiny.py (LoRA on tiny-random) trained 2 steps, a checkpoint after each."""
  run_dir, cache = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("cache")
  overrides = {"train.steps": 2, "train.eval": False, "train.eval_every": 0, "checkpoint.every": 1}
  loop.train(tiny_runs.tiny(run_dir, cache, **overrides))
  return run_dir


def test_chat_with_a_run_answers_as_its_model_does(run_dir, tmp_path, capsys):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Hi!\n")
  args = [
    "--run",
    str(run_dir),
    "--step",
    "1",
    "--prompt-file",
    str(prompts),
    "--max_new_tokens",
    "8",
    "--temperature",
    "0",
  ]
  assert main(args) == 0
  got = [line.removeprefix(ANSWER) for line in capsys.readouterr().out.splitlines() if line.startswith(ANSWER)]
  run = load_run(run_dir, 1)
  assert run.method == "lora" and run.step == 1
  want = generate(run.model, load_tokenizer(run.source_dir), [[{"role": "user", "content": "Hi!"}]], max_new_tokens=8)
  assert got == want and want[0]


def test_missing_step(run_dir, capsys):
  assert main(["--run", str(run_dir), "--step", "7"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "no checkpoint for step 7; it holds steps 1, 2" in err and err.count("\n") == 1
