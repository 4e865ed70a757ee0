"""JaxtuneLM against lm-eval's own `hf` model on the same tiny model, offline: a local task YAML over a local
data file; per-request log-likelihoods within 1e-4 and the same is_greedy."""

import json

import pytest

from jaxtune.hf import load as hf_load
from jaxtune.train import builtin_models

TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""

DOCS = [
  {"question": "Which day follows Monday?", "choices": [" Tuesday", " Sunday", " Friday"], "answer": 0},
  {"question": "Alice meets Bruno at 2:30pm. In 24-hour time?", "choices": [" 14:30", " 02:30"], "answer": 0},
  {"question": "", "choices": [" a", " bb"], "answer": 1},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lm_eval_task")
  (tmp / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
  (tmp / "tiny_choice.yaml").write_text(TASK.format(data=tmp / "docs.jsonl"))
  return tmp


def _per_request(results):
  return [resp for sample in results["samples"]["tiny_choice"] for resp in sample["filtered_resps"]]


@pytest.mark.slow  # 60 s on 2 cores, most of it importing lm-eval, torch and transformers
def test_loglikelihoods_match_the_hf_model(task_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import lm_eval
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager

  from jaxtune.eval.lm_eval import JaxtuneLM

  model_dir = builtin_models.resolve("tiny-random", str(tmp_path / "models"))
  run = lambda model: lm_eval.simple_evaluate(
    model=model, tasks=["tiny_choice"], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True
  )
  ours = run(JaxtuneLM(hf_load.load_model(model_dir), hf_load.load_tokenizer(model_dir), batch_size=4))
  theirs = run(HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4))
  a, b = _per_request(ours), _per_request(theirs)
  assert len(a) == len(b) == 7
  for (lp, greedy), (ref_lp, ref_greedy) in zip(a, b):
    assert abs(float(lp) - float(ref_lp)) < 1e-4 and bool(greedy) == bool(ref_greedy)
  assert ours["results"]["tiny_choice"]["acc,none"] == theirs["results"]["tiny_choice"]["acc,none"]
