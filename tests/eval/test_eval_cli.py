"""`python -m jaxtune.eval` on a tiny run: it reproduces the run's after-training score, writes eval.json and
predictions.jsonl, takes a split of the run's data, and refuses bad input with one line and exit code 2."""

import json

import pytest

from jaxtune.eval import __main__ as eval_main
from jaxtune.eval import run as run_lib
from jaxtune.tasks import meeting_json
from jaxtune.train import loop

import tiny_runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("eval_run")
  test = tmp / "test.jsonl"
  test.write_text("\n".join((meeting_json.DATA / "test.jsonl").read_text().splitlines()[:6]) + "\n")
  config = tiny_runs.tiny(
    tmp / "run",
    tmp / "cache",
    **{
      "train.steps": 4,
      "train.eval": False,
      "train.eval_every": 0,
      "checkpoint.every": 0,
      "data.test_fraction": 0.01,  # 8 of the 800 training records held out
      "task.test_file": str(test),
      "task.metrics": "squad_f1",
      "task.max_new_tokens": 8,
      "task.before": False,
    },
  )
  return tmp / "run", test, loop.train(config)


def test_eval_reproduces_the_runs_figure_and_writes_its_files(tiny_run, capsys):
  run_dir, test, result = tiny_run
  args = ["--run", str(run_dir), "--data", str(test), "--metrics", "json,squad_f1", "--max-new-tokens", "8"]
  assert eval_main.main(args) == 0
  out_dir = run_dir / "eval" / "step_4"
  report = json.loads((out_dir / run_lib.EVAL_FILE).read_text())
  assert report["source"]["step"] == 4 and report["examples"] == 6
  assert report["metrics"]["json"]["value"] == result["eval/exact_match_after"]
  assert report["metrics"]["squad_f1"]["value"] == pytest.approx(result["eval/squad_f1_after"])
  assert report["metrics"]["squad_f1"]["ci95"] == pytest.approx(
    [result["eval/squad_f1_after_ci_low"], result["eval/squad_f1_after_ci_high"]]
  )
  token = report["token_metrics"]
  assert token["tokens"] > 6 and token["perplexity"] > 1 and 0 <= token["token_accuracy"] <= 1
  rows = [json.loads(line) for line in (out_dir / run_lib.PREDICTIONS_FILE).read_text().splitlines()]
  assert len(rows) == 6 and set(rows[0]) == {"prompt", "reference", "prediction", "scores"}
  assert set(rows[0]["scores"]) == {"json", "squad_f1"}
  out = capsys.readouterr().out
  assert "squad_f1" in out and "perplexity" in out and "95% interval (6 examples)" in out


def test_eval_without_data_scores_the_runs_own_task(tiny_run, tmp_path):
  run_dir, _, result = tiny_run
  assert eval_main.main(["--run", str(run_dir), "--out", str(tmp_path)]) == 0
  report = json.loads((tmp_path / run_lib.EVAL_FILE).read_text())
  assert list(report["metrics"]) == ["json", "squad_f1"] and report["settings"]["max_new_tokens"] == 8
  assert report["metrics"]["json"]["value"] == result["eval/exact_match_after"]
  assert report["metrics"]["squad_f1"]["value"] == pytest.approx(result["eval/squad_f1_after"])


def test_eval_on_the_runs_test_split(tiny_run, tmp_path):
  run_dir, _, _ = tiny_run
  args = ["--run", str(run_dir), "--split", "test", "--metrics", "exact", "--max-new-tokens", "2"]
  assert eval_main.main(args + ["--out", str(tmp_path)]) == 0
  report = json.loads((tmp_path / run_lib.EVAL_FILE).read_text())
  assert report["examples"] == 8 and report["settings"]["split"] == "test"


def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
  run_dir, test, _ = tiny_run
  assert eval_main.main(["--run", str(run_dir), "--data", str(test), "--metrics", "f1,blue"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: unknown metric 'blue'; did you mean 'bleu'?") and "squad_f1" in err
  no_reference = tmp_path / "no_reference.jsonl"
  no_reference.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  assert eval_main.main(["--run", str(run_dir), "--data", str(no_reference), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert f"{no_reference}:1: a task record needs messages ending with an assistant turn" in err
  assert err.count("\n") == 1 and not (tmp_path / "o").exists()  # nothing half-written
