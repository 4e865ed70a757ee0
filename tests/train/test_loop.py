"""The training loop on the tiny config: loss goes down, what a run writes, checkpoints, NaN stop, overlap."""

import json
import math
import pathlib

import numpy as np
import pytest

from jaxtune.models.config import from_hf_dict
from jaxtune.tasks import meeting_json
from jaxtune.train import loop

import tiny_runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache):
  run_dir = tmp_path_factory.mktemp("lora_run")
  config = tiny_runs.tiny(run_dir, cache, **{"train.steps": 30, "train.eval_every": 15, "checkpoint.every": 10})
  return run_dir, loop.train(config)


def _trace(monkeypatch) -> list[str]:
  """From now on, the loop's step dispatches ("d3"), metric reads ("r3") and saves ("s3"), in order."""
  events = []
  make_step, record, save = loop.step_lib.make_train_step, loop._Recorder.__call__, loop.Run.save

  class Traced(loop.step_lib.TrainStep):
    def __call__(self, state, batch):
      events.append(f"d{int(state.step) + 1}")
      return super().__call__(state, batch)

  def traced_make_step(*args, **kwargs):
    step = make_step(*args, **kwargs)
    step.__class__ = Traced
    return step

  def traced_record(self, step, metrics, tokens):
    events.append(f"r{step}")
    return record(self, step, metrics, tokens)

  def traced_save(self, step, metrics=None):
    events.append(f"s{step}")
    return save(self, step, metrics)

  monkeypatch.setattr(loop.step_lib, "make_train_step", traced_make_step)
  monkeypatch.setattr(loop._Recorder, "__call__", traced_record)
  monkeypatch.setattr(loop.Run, "save", traced_save)
  return events


def _short(run_dir, cache, **overrides):
  """7 steps, evals after steps 3 and 6, checkpoints after 4 and 7."""
  return tiny_runs.tiny(
    run_dir,
    cache,
    **{"train.steps": 7, "train.eval_every": 3, "checkpoint.every": 4, "checkpoint.keep": 5, **overrides},
  )


def test_loss_goes_down_and_eval_runs(lora_run):
  run_dir, result = lora_run
  curve = tiny_runs.train_curve(run_dir, keys=("train/loss",))
  first = np.mean([curve[s][0] for s in (1, 2, 3)])
  last = np.mean([curve[s][0] for s in (28, 29, 30)])
  assert last < 0.7 * first, (first, last)
  evals = [m for m in tiny_runs.metrics(run_dir) if "eval/loss" in m]
  assert [m["step"] for m in evals] == [15, 30]
  assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
  assert result["eval/loss"] == pytest.approx(evals[1]["eval/loss"])
  assert result["eval/perplexity"] == pytest.approx(math.exp(result["eval/loss"]))
  assert 0 < result["eval/accuracy"] <= 1


def test_run_directory_contents(lora_run):
  run_dir, result = lora_run
  lines = tiny_runs.metrics(run_dir)
  assert all(isinstance(m["step"], int) for m in lines)
  train_lines = [m for m in lines if "train/loss" in m]
  assert [m["step"] for m in train_lines] == list(range(1, 31))
  assert {"train/lr", "train/grad_norm", "train/accuracy", "train/tokens_per_s"} <= set(train_lines[-1])
  saved = json.loads((run_dir / "config.json").read_text())
  assert saved["model"]["dtype"] == "float32" and saved["model"]["param_dtype"] == "float32"  # "auto" resolved
  assert saved["train"]["steps"] == 30
  assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
  assert tiny_runs.complete_steps(run_dir) == [20, 30]  # keep=2
  assert result["checkpoint"].endswith("checkpoints/30")


def test_lora_checkpoint_holds_adapters_only(lora_run):
  run_dir, _ = lora_run
  state = tiny_runs.saved_state(run_dir, 30)
  params = [k for k in state if k.startswith("params/")]
  assert params and all(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for k in params), params
  assert int(state["step"]) == 30
  assert sum(v.size for k, v in state.items() if k.startswith("params/")) < 20_000  # the base has ~8k + 2 x 4k


def test_full_finetuning_checkpoints_every_weight(tmp_path, cache):
  config = tiny_runs.tiny(
    tmp_path,
    cache,
    **{"peft.method": "full", "train.steps": 4, "train.eval": False, "train.eval_every": 0, "optim.lr": 1e-3},
  )
  result = loop.train(config)
  state = tiny_runs.saved_state(tmp_path, 4)
  params = {k for k in state if k.startswith("params/")}
  assert "params/embed" in params and "params/layers/attn/q/kernel" in params
  assert not any("lora" in k for k in params)
  assert "eval/loss" not in result


def test_nonfinite_streak_stops_with_last_good_checkpoint(tmp_path, cache, monkeypatch):
  # A learning rate of 1e30 makes the first update overflow the forward pass: every later
  # step is non-finite, skipped, and the run stops after max_nan_streak of them.
  events = _trace(monkeypatch)
  config = _short(
    tmp_path,
    cache,
    **{
      "optim.lr": 1e30,
      "optim.warmup_steps": 0,
      "optim.schedule": "constant",
      "train.max_nan_streak": 3,
      "train.eval": False,
      "train.eval_every": 0,
      "checkpoint.every": 0,
    },
  )
  with pytest.raises(loop.NonFiniteLossError, match="3 non-finite"):
    loop.train(config)
  # Step 3 ends a streak of 2, so step 4 could end one of 3: it is read before anything else is dispatched.
  assert events == ["d1", "d2", "r1", "d3", "r2", "d4", "r3", "r4", "s4"]
  assert tiny_runs.complete_steps(tmp_path) == [4]
  state = tiny_runs.saved_state(tmp_path, 4)
  assert int(state["step"]) == 4 and int(state["skipped"]) == 3 and int(state["nonfinite_streak"]) == 3
  assert all(np.isfinite(v).all() for k, v in state.items() if k.startswith("params/"))
  lines = [m for m in tiny_runs.metrics(tmp_path) if "train/loss" in m]
  assert lines[-1]["train/loss"] is None and lines[-1]["train/skipped_total"] == 3  # NaN is written as null


def test_overlap_reads_each_step_after_the_next_dispatch_and_changes_nothing(tmp_path, cache, monkeypatch, capsys):
  events = _trace(monkeypatch)
  overlapped = loop.train(_short(tmp_path / "overlap", cache))
  out = capsys.readouterr().out  # timed from the first step read (it compiles) over the next three
  assert out.count("ETA: ") == 1 and "for the 3 steps left" in out
  # Steps 3 and 6 evaluate, step 4 saves, step 7 is the last: each is read before the next dispatch.
  assert events == ["d1", "d2", "r1", "d3", "r2", "r3", "d4", "r4", "s4", "d5", "d6", "r5", "r6", "d7", "r7", "s7"]
  events.clear()
  synced = loop.train(_short(tmp_path / "sync", cache, **{"train.overlap": False}))
  assert events == ["d1", "r1", "d2", "r2", "d3", "r3", "d4", "r4", "s4", "d5", "r5", "d6", "r6", "d7", "r7", "s7"]

  drop = lambda lines: [{k: v for k, v in m.items() if k != "train/tokens_per_s"} for m in lines]
  assert drop(tiny_runs.metrics(tmp_path / "overlap")) == drop(tiny_runs.metrics(tmp_path / "sync"))
  assert overlapped["eval/loss"] == synced["eval/loss"]
  for step in (4, 7):
    a, b = tiny_runs.saved_state(tmp_path / "overlap", step), tiny_runs.saved_state(tmp_path / "sync", step)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), step


def test_data_running_out_reads_the_last_step(tmp_path, cache, monkeypatch, capsys):
  lines = (meeting_json.DATA / "train.jsonl").read_text().splitlines()
  (tmp_path / "three_batches.jsonl").write_text("\n".join(lines[:24]) + "\n")  # batch_size 8
  events = _trace(monkeypatch)
  result = loop.train(
    _short(
      tmp_path / "run",
      cache,
      **{
        "data.train": (str(tmp_path / "three_batches.jsonl"),),
        "data.num_epochs": 1,
        "train.steps": 10,
        "train.eval": False,
        "train.eval_every": 0,
        "checkpoint.every": 0,
      },
    )
  )
  assert events == ["d1", "d2", "r1", "d3", "r2", "r3", "s3"]
  assert result["step"] == 3 and result["checkpoint"].endswith("checkpoints/3")
  out = capsys.readouterr().out  # the pre-flight summary said so before the first step
  assert "pre-flight: 24 training examples" in out and "3 batches of 8 rows per epoch" in out
  assert "steps 1..10 = 3.33 epochs" in out
  assert "data.num_epochs=1 holds 3 batches, so the run stops there, before train.steps=10" in out
  assert [m["step"] for m in tiny_runs.metrics(tmp_path / "run") if "train/loss" in m] == [1, 2, 3]


def test_the_training_path_model_has_the_checkpoint_config_and_its_own_options(tmp_path, cache):
  """The model the loop trains describes the architecture of its config.json and nothing else; how it runs
  (CPU kernels, dtypes, the activation constraint) is in its options."""
  config = loop.config_lib.resolve(tiny_runs.tiny(tmp_path / "run", cache), "cpu")
  run = loop.setup(config)
  try:
    model = run.model()
    hf = json.loads((pathlib.Path(run.model_path) / "config.json").read_text())
    assert model.config == from_hf_dict(hf)
    assert (model.options.kernels, model.options.dtype, model.options.remat) == ("cpu", "float32", config.model.remat)
    assert model.options.constrain is not None
  finally:
    run.close()
