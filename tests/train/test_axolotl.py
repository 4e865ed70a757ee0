"""Axolotl YAML configs (jaxtune/train/axolotl.py): Axolotl's published Llama 3 LoRA, QLoRA and DPO examples
(fixtures/axolotl, verbatim but for base_model and the dataset paths) translate to the config they mean and
run on the tiny model; every key is translated, listed as unsupported, or refused by name."""

import json
import pathlib
import re
import shutil

import pytest
import yaml

from jaxtune.errors import ConfigError
from jaxtune.tasks import meeting_json, meeting_prefs
from jaxtune.train import __main__ as train_main
from jaxtune.train import axolotl

import tiny_runs  # noqa: F401  (the tests' persistent XLA cache: the runs compile what the tiny runs compile)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "axolotl"
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "axolotl.md"
# The keys of the published examples we do not translate: the one warning lists exactly these.
NOT_TRANSLATED = {
  "eval_sample_packing",
  "tf32",
  "attn_implementation",
  "loss_watchdog_threshold",
  "loss_watchdog_patience",
  "evals_per_epoch",
  "saves_per_epoch",
  "special_tokens",
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
  """A directory holding the examples and their local data (alpaca records, Axolotl's chat_template pairs), as cwd."""
  data = tmp_path / "data"
  data.mkdir()
  with (data / "alpaca.jsonl").open("w") as out:
    for line in (meeting_json.DATA / "train.jsonl").read_text().splitlines()[:64]:
      system, user, answer = json.loads(line)["messages"]
      out.write(json.dumps({"instruction": system["content"], "input": user["content"], "output": answer["content"]}))
      out.write("\n")
  with (data / "pairs.jsonl").open("w") as out:
    for line in (meeting_prefs.DATA / "train.jsonl").read_text().splitlines()[:64]:
      pair = json.loads(line)  # Axolotl's chat_template.default pairs: one message object per answer
      record = {"conversation": pair["prompt"], "chosen": pair["chosen"][0], "rejected": pair["rejected"][0]}
      out.write(json.dumps(record) + "\n")
  for path in FIXTURES.glob("*.yml"):
    shutil.copy(path, tmp_path)
  monkeypatch.chdir(tmp_path)
  return tmp_path


def translate(name_or_raw, devices=1):
  raw = yaml.safe_load((FIXTURES / name_or_raw).read_text()) if isinstance(name_or_raw, str) else name_or_raw
  return axolotl.translate(raw, devices=devices)


def test_lora_example_translates_with_axolotl_semantics(workdir):
  result = translate("lora-1b.yml", devices=4)
  c = result.config
  assert set(result.unsupported) == NOT_TRANSLATED
  assert (c.model.path, c.peft.method, c.model.quantize) == ("tiny-random", "lora", "none")
  assert (c.peft.lora.rank, c.peft.lora.alpha, c.peft.lora.dropout, c.peft.lora.targets) == (
    16,
    32.0,
    0.05,
    "all-linear",
  )
  assert c.data.train == ("./data/alpaca.jsonl",) and (c.data.format, c.data.train_on) == ("alpaca", "assistant")
  assert (c.data.max_seq_len, c.data.packing, c.data.truncation, c.data.validation_fraction) == (
    2048,
    True,
    "drop",
    0.1,
  )
  assert c.data.batch_size == 2 * 2 * 4 and c.train.grad_accum == 2  # micro-batch per device x accumulation x devices
  assert (c.train.steps, c.data.num_epochs) == (0, 1)
  assert (c.optim.name, c.optim.schedule, c.optim.lr, c.optim.warmup_ratio) == ("adamw", "cosine", 2e-4, 0.1)
  assert (c.optim.clip_norm, c.optim.weight_decay, c.train.seed, c.train.log_every) == (1.0, 0.0, 42, 1)
  assert (c.model.dtype, c.model.remat, c.output_dir, c.resume) == ("auto", "full", "./outputs/lora-out", "never")
  assert (c.checkpoint.every, c.checkpoint.keep, c.train.eval_every) == (0, axolotl.KEEP_ALL, 0)
  assert any("adamw_8bit" in w for w in result.warnings)


def test_qlora_example_is_nf4_with_double_quant(workdir):
  result = translate("qlora-1b.yml")
  c = result.config
  assert set(result.unsupported) == NOT_TRANSLATED
  assert (c.peft.method, c.model.quantize, c.model.double_quant) == ("lora", "nf4", True)
  assert (c.peft.lora.rank, c.peft.lora.alpha, c.peft.lora.dropout, c.peft.lora.targets) == (
    32,
    16.0,
    0.05,
    "all-linear",
  )
  assert (c.data.max_seq_len, c.data.packing, c.data.batch_size, c.train.grad_accum) == (2048, True, 8, 4)
  assert (c.optim.lr, c.data.cache_dir) == (2e-4, "last_run_prepared")


def test_dpo_example_reads_axolotl_pairs(workdir):
  result = translate("instruct-dpo-lora-8b.yml")
  c = result.config
  dropped = {"loss_watchdog_threshold", "loss_watchdog_patience", "eval_sample_packing"}
  assert set(result.unsupported) == NOT_TRANSLATED - dropped | {"model_type", "tokenizer_type"}
  assert (c.objective, c.dpo.loss_type, c.dpo.beta, c.model.quantize) == ("dpo", "sigmoid", 0.1, "int8")
  assert c.data.format == "preference" and c.data.field_map.to_dict() == {"prompt": "conversation"}
  assert (c.data.chat_template, c.data.max_seq_len, c.data.packing, c.data.num_epochs) == ("llama3", 4096, False, 4)
  assert (c.peft.lora.rank, c.peft.lora.alpha, c.peft.lora.targets) == (32, 16.0, "all-linear")
  assert any("LLM.int8" in w for w in result.warnings)  # Axolotl's 8-bit is not ours: the warning says how


def test_absent_keys_take_axolotl_defaults(workdir):
  dataset = {"path": "data/alpaca.jsonl", "type": "alpaca"}
  c = translate({"base_model": "tiny-random", "learning_rate": 1e-4, "datasets": [dataset]}).config
  assert (c.data.max_seq_len, c.data.batch_size, c.train.grad_accum, c.data.num_epochs) == (512, 1, 1, 1)
  assert (c.peft.method, c.data.packing, c.data.validation_fraction, c.data.train_on) == (
    "full",
    False,
    0.0,
    "assistant",
  )
  assert (c.optim.schedule, c.optim.warmup_steps, c.model.remat, c.output_dir) == ("cosine", 0, "none", "./model-out")


def test_rl_methods_and_their_betas(workdir):
  base = {
    "base_model": "m/x",
    "learning_rate": 1e-5,
    "datasets": [{"path": "data/pairs.jsonl", "type": "chat_template"}],
  }
  ipo = translate({**base, "rl": "ipo", "rl_beta": 0.3}).config
  assert (ipo.objective, ipo.dpo.loss_type, ipo.dpo.beta) == ("dpo", "ipo", 0.3)
  orpo = translate({**base, "rl": "orpo", "orpo_alpha": 0.2}).config
  assert (orpo.objective, orpo.orpo.beta) == ("orpo", 0.2)
  simpo = translate({**base, "rl": "simpo", "rl_beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0}).config
  assert (simpo.simpo.beta, simpo.simpo.gamma) == (2.0, 1.0)
  with pytest.raises(ConfigError, match=r"^cpo_alpha: .*NLL|^cpo_alpha: .*negative log-likelihood"):
    translate({**base, "rl": "simpo"})
  kto = translate({**base, "rl": "kto", "kto_undesirable_weight": 1.5}).config
  assert (kto.objective, kto.data.format, kto.kto.undesirable_weight) == ("kto", "kto", 1.5)
  sft = translate(
    {**base, "datasets": [{"path": "data/alpaca.jsonl", "type": "alpaca"}], "rl_beta": 0.1, "trl": {"x": 1}}
  )
  assert sft.config.objective == "sft" and set(sft.unsupported) == {"rl_beta", "trl.x"}
  grpo = translate({**base, "rl": "grpo", "trl": {"beta": 0.04, "num_generations": 4, "reward_funcs": ["r.f"]}})
  assert (grpo.config.grpo.beta, grpo.config.grpo.num_generations, grpo.config.grpo.reward_funcs) == (0.04, 4, ("r:f",))


@pytest.mark.parametrize(
  "change, key",
  [
    (
      {"datasets": [{"path": "data/alpaca.jsonl", "type": "chat_template", "train_on_eos": "none"}]},
      r"datasets\[0\].train_on_eos",
    ),
    (
      {"datasets": [{"path": "data/alpaca.jsonl", "type": "chat_template", "roles_to_train": ["user"]}]},
      r"datasets\[0\].roles_to_train",
    ),
    ({"datasets": [{"path": "data/alpaca.jsonl", "type": "input_output"}]}, r"datasets\[0\].type"),
    ({"datasets": [{"path": "data/missing.jsonl", "type": "alpaca"}]}, r"datasets\[0\].path"),
    ({"optimizer": "muon"}, "optimizer"),
    ({"lr_scheduler": "one_cycle"}, "lr_scheduler"),
    ({"adapter": "qlora", "load_in_4bit": False}, "adapter"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"num_epochs": 1.5}, "num_epochs"),
  ],
)
def test_values_we_cannot_honour_are_errors_naming_the_key(workdir, change, key):
  raw = yaml.safe_load((FIXTURES / "lora-1b.yml").read_text())
  with pytest.raises(ConfigError, match=rf"^{key}: "):
    translate({**raw, **change})


def test_cli_errors_are_one_line_and_unsupported_keys_one_warning(workdir, capsys):
  (workdir / "list.yml").write_text("- base_model: x\n")
  assert train_main.main(["--axolotl", "list.yml"]) == 2
  assert re.fullmatch(
    r"error: list.yml: the Axolotl config is list, not a mapping of keys to values\n", capsys.readouterr().err
  )
  (workdir / "broken.yml").write_text("base_model: [x\n")
  assert train_main.main(["--axolotl", "broken.yml"]) == 2
  assert capsys.readouterr().err.startswith("error: broken.yml:2: not valid YAML")
  assert train_main.main(["--axolotl", "lora-1b.yml", "--strict", "--print_config"]) == 2
  assert "tf32" in capsys.readouterr().err
  argv = ["--axolotl", "lora-1b.yml", "--print_config", "--config.train.steps=3"]
  assert train_main.main(argv) == 0
  out, err = capsys.readouterr()
  [warning] = [line for line in err.splitlines() if "not supported" in line]
  assert all(key in warning for key in NOT_TRANSLATED)
  assert "train.steps = 3" in out.splitlines() and "peft.lora.rank = 16" in out.splitlines()
  assert train_main.main(["--axolotl", "lora-1b.yml", "--config", "tiny"]) == 2


def test_docs_table_lists_every_translated_key():
  table = {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", DOCS.read_text(), re.M)}
  assert set(axolotl.KEYS) <= table, sorted(set(axolotl.KEYS) - table)


def _run(workdir, name, *overrides):
  settings = ["--config.train.steps=2", "--config.model.cache_dir=" + str(workdir / "models")]
  settings += ["--config.data.cache_dir=" + str(workdir / "cache"), "--config.logging.progress=False"]
  assert train_main.main(["--axolotl", name, *settings, *overrides]) == 0


def test_lora_example_runs_on_the_tiny_model(workdir):
  # Shorter rows than the example's 2048 keep a CPU step in milliseconds; the rest is the example's.
  _run(workdir, "lora-1b.yml", "--config.data.max_seq_len=256")
  metrics = [json.loads(line) for line in (workdir / "outputs/lora-out/metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2] and "eval/loss" in metrics[-1]


def test_dpo_example_runs_on_the_tiny_model(workdir):
  # The tiny model's character tokenizer has no Llama 3 tokens: its own ChatML template stands in for llama3.
  _run(workdir, "instruct-dpo-lora-8b.yml", "--config.data.chat_template=")
  metrics = [json.loads(line) for line in (workdir / "outputs/lora-out/metrics.jsonl").read_text().splitlines()]
  assert any("train/rewards/margins" in m for m in metrics)
