"""The front door: the `jaxtune` command, strict configs, and one-line errors for everything a user can get wrong.

Every malformed record and config mistake goes through the real `train` and `data` entry points
(their `main(argv)`, in-process) and must come back as exit code 2 and exactly one line on stderr,
`error: ...`, with no traceback; a few subprocess runs check the installed `jaxtune` script itself.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxtune import cli, configs
from jaxtune.data.__main__ import main as data_main
from jaxtune.errors import ConfigError, UserError
from jaxtune.train.__main__ import main as train_main

from malformed import MALFORMED, MALFORMED_BY_FORMAT, msgs

GOOD = msgs(("user", "a"), ("assistant", "b"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> pathlib.Path:
  """One model cache for the module: tiny-random is built into it once."""
  return tmp_path_factory.mktemp("models")


def tiny_args(tmp_path: pathlib.Path, models: pathlib.Path, *extra: str) -> list[str]:
  return [
    "--config",
    "tiny",
    f"--config.output_dir={tmp_path / 'run'}",
    f"--config.model.cache_dir={models}",
    "--config.data.cache_dir=",
    *extra,
  ]


def one_line_error(capsys, main, argv: list[str]) -> str:
  """Runs `main(argv)`; asserts exit code 2 and one `error: ...` line on stderr; returns the message."""
  code = main(argv)
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
  return err[len("error: ") : -1]


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


# ----------------------------------------------------------------------------------------------------------------
# The command


def test_jaxtune_lists_every_command_and_suggests_the_nearest(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name, command in cli.COMMANDS.items():
    assert f"  {name}" in out and command.summary in out
  assert cli.main(["trian"]) == 2
  assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_answers_help(name, capsys):
  import importlib

  with pytest.raises(SystemExit) as e:
    importlib.import_module(cli.COMMANDS[name].module).main(["--help"])
  assert e.value.code == 0
  assert f"usage: jaxtune {name}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Malformed records: the reader's exact message, alone, from both entry points


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_chat_records_fail_in_one_line(case, tmp_path, models, capsys):
  bad, expected = MALFORMED[case]
  data = write_jsonl(tmp_path / "chats.jsonl", [GOOD, bad])
  argv = tiny_args(
    tmp_path, models, f"--config.data.train={data}", "--config.data.validation=()", "--config.train.eval_every=0"
  )
  for main in (train_main, data_main):
    assert one_line_error(capsys, main, argv) == f"{data}:2: {expected}"
  assert not list((tmp_path / "run").glob("checkpoints/[0-9]*"))  # stopped before the first step


@pytest.mark.parametrize("fmt, good, bad, expected", MALFORMED_BY_FORMAT, ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_records_of_each_format_fail_in_one_line(fmt, good, bad, expected, tmp_path, models, capsys):
  data = write_jsonl(tmp_path / "records.jsonl", [bad])
  argv = tiny_args(
    tmp_path,
    models,
    f"--config.data.train={data}",
    "--config.data.validation=()",
    "--config.train.eval_every=0",
    f"--config.data.format={fmt}",
  )
  for main in (train_main, data_main):
    assert one_line_error(capsys, main, argv) == f"{data}:1: {expected}"


# ----------------------------------------------------------------------------------------------------------------
# Config mistakes, in a file and on the command line

FILE_MISTAKES = {
  "misspelt key": ("config.optim.learning_rate = 1e-4", "optim.learning_rate is not a setting; did you mean optim.lr?"),
  "misspelt section": ("config.trian.steps = 3", "trian is not a setting; did you mean train?"),
  "misspelt key read": ("config.optim.lr = config.optim.lrr", "optim.lrr is not a setting; did you mean optim.lr?"),
  "wrong type": ('config.data.train = "a.jsonl"', "data.train takes a tuple, not the str 'a.jsonl'"),
  "error in the file": ("config.train.steps = undefined", "NameError: name 'undefined' is not defined"),
}


@pytest.mark.parametrize("case", sorted(FILE_MISTAKES))
def test_mistakes_in_a_config_file_name_its_line_and_the_nearest_key(case, tmp_path, capsys):
  body, expected = FILE_MISTAKES[case]
  path = tmp_path / "my_run.py"
  path.write_text(
    "from jaxtune.train.config import default_config\n\n\ndef get_config():\n"
    f"  config = default_config()\n  {body}\n  return config\n"
  )
  for main in (train_main, data_main):
    assert one_line_error(capsys, main, ["--config", str(path)]) == f"{path}:6: {expected}"


def test_config_file_without_get_config_or_with_a_syntax_error(tmp_path, capsys):
  empty, broken = tmp_path / "empty.py", tmp_path / "broken.py"
  empty.write_text("x = 1\n")
  broken.write_text("def get_config(:\n")
  assert "defines no get_config()" in one_line_error(capsys, train_main, ["--config", str(empty)])
  assert one_line_error(capsys, data_main, ["--config", str(broken)]).startswith(f"{broken}:1: SyntaxError")


def test_a_config_built_from_scratch_is_checked_key_by_key(tmp_path, capsys):
  path = tmp_path / "scratch.py"
  path.write_text(
    "import ml_collections\nfrom jaxtune.train.config import default_config\n\n\ndef get_config():\n"
    "  c = ml_collections.ConfigDict(default_config().to_dict())\n  c.optim.learnig_rate = 1.0\n  return c\n"
  )
  assert one_line_error(capsys, train_main, ["--config", str(path)]) == (
    f"{path}: optim.learnig_rate is not a setting; did you mean optim.lr?"
  )


COMMAND_LINE_MISTAKES = {
  "misspelt key": (["--config.train.stpes=3"], "--config.train.stpes: not a setting; did you mean train.steps?"),
  "name from another tool": (["--config.peft.lora.lora_alpha=8"], "did you mean peft.lora.alpha?"),
  "misspelt section": (["--config.trian.steps=3"], "--config.trian.steps: not a setting; did you mean train.steps?"),
  "not a number": (["--config.data.max_seq_len=long"], "--config.data.max_seq_len=long: expected an integer"),
  "not a bool": (["--config.data.packing=maybe"], "--config.data.packing=maybe: expected true or false"),
  "no value": (["--config.data.max_seq_len"], "--config.data.max_seq_len needs a value"),
  "unknown format": (["--config.data.format=xml"], "format must be 'auto' or one of"),
  "unknown field_map key": (["--config.data.field_map.questin=q"], "field_map key 'questin' is not a field jaxtune"),
  "unknown template name": (["--config.data.chat_template=llama4"], "'llama4' is neither a named template (gemma,"),
}


@pytest.mark.parametrize("case", sorted(COMMAND_LINE_MISTAKES))
def test_command_line_mistakes_fail_in_one_line(case, tmp_path, models, capsys):
  extra, expected = COMMAND_LINE_MISTAKES[case]
  for main in (train_main, data_main):
    assert expected in one_line_error(capsys, main, tiny_args(tmp_path, models, *extra))


def test_no_such_config_names_the_shipped_ones(capsys):
  message = one_line_error(capsys, train_main, ["--config", "quickstrat"])
  assert "did you mean 'quickstart'?" in message and "tiny" in message


def test_settings_that_cannot_work_and_missing_files(tmp_path, models, capsys):
  run = tiny_args(tmp_path, tmp_path / "no-models")
  assert (
    one_line_error(capsys, train_main, run + ["--config.train.steps=0"])
    == "train.steps: 0 trains data.num_epochs epochs, but that is 0; set train.steps >= 1 or data.num_epochs >= 1."
  )
  assert not (tmp_path / "run").exists() and not (tmp_path / "no-models").exists()  # nothing built or written
  missing = tmp_path / "nope.jsonl"
  assert f"data.train: {missing} does not exist" in one_line_error(
    capsys, train_main, run + [f"--config.data.train={missing}"]
  )
  assert str(missing) in one_line_error(capsys, data_main, run + [f"--config.data.train={missing}"])
  assert "is neither a directory nor a hub id" in one_line_error(
    capsys, train_main, run + [f"--config.model.path={tmp_path}/no/model"]
  )


def test_an_unsupported_model_type_fails_in_one_line(tmp_path, models, capsys):
  model = tmp_path / "gpt2"
  model.mkdir()
  (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
  message = one_line_error(capsys, train_main, tiny_args(tmp_path, models, f"--config.model.path={model}"))
  assert message.startswith(f"{model / 'config.json'}: ") and "gpt2" in message


def test_debug_shows_the_traceback(tmp_path, models, capsys, monkeypatch):
  with pytest.raises(ConfigError, match="train.steps: 0 trains data.num_epochs epochs, but that is 0"):
    train_main(tiny_args(tmp_path, models, "--config.train.steps=0", "--debug"))
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(ConfigError, match="not a setting"):
    data_main(tiny_args(tmp_path, models, "--config.data.nope=1"))


def test_errors_users_cause_are_user_errors():
  """The guard prints these alone; any other exception is a bug and keeps its traceback."""
  from jaxtune.chat import ChatError
  from jaxtune.data.records import DataError
  from jaxtune.export.files import ExportError
  from jaxtune.hf.gguf import GGUFImportError
  from jaxtune.hf.safetensors_io import CheckpointError
  from jaxtune.models.config import ModelConfigError
  from jaxtune.peft.import_adapter import AdapterError
  from jaxtune.train.checkpoint import CheckpointMismatchError
  from jaxtune.train.loop import NonFiniteLossError
  from jaxtune.train.memory import DoesNotFitError

  kinds = (DataError, ExportError, GGUFImportError, CheckpointError, ModelConfigError, CheckpointMismatchError)
  kinds += (AdapterError, ChatError)
  assert all(issubclass(k, UserError) for k in kinds + (NonFiniteLossError, DoesNotFitError, ConfigError))
  assert cli.user_message(FileNotFoundError(2, "No such file or directory", "x.jsonl")) == (
    "x.jsonl: No such file or directory"
  )
  assert cli.user_message(KeyError("bug")) is None
  assert cli.user_message(OSError(28, "No space left on device", "cache/x.arrow")) == (
    "cache/x.arrow: could not write (no space left on the device); free space there (or choose a disk with room)."
  )
  from jaxtune.errors import WriteError
  from jaxtune.train.faults import RunWriteError
  from jaxtune.train.run_lock import RunLockedError

  assert all(issubclass(k, UserError) for k in (WriteError, RunWriteError, RunLockedError))


# ----------------------------------------------------------------------------------------------------------------
# Strict configs: what stays open, what the start of a run says


def test_overrides_parse_as_the_settings_type_and_field_map_stays_open():
  config = configs.load(
    "tiny",
    [
      ("train.steps", "7"),
      ("optim.lr", "3e-4"),
      ("data.packing", "false"),
      ("data.train", "a.jsonl,b.jsonl"),
      ("data.bucket_lengths", "(64, 128)"),
      ("data.field_map.question", "query"),
    ],
  )
  assert (config.train.steps, config.optim.lr, config.data.packing) == (7, 3e-4, False)
  assert config.data.train == ("a.jsonl", "b.jsonl") and config.data.bucket_lengths == (64, 128)
  assert config.data.field_map.to_dict() == {"question": "query"}
  configs.update(config, {"train.steps": 9, "data.field_map.answer": "reply"})  # Python values, from a notebook
  assert config.train.steps == 9 and config.data.field_map.answer == "reply"
  with pytest.raises(ConfigError, match="optim.learnig_rate: not a setting; did you mean optim.lr"):
    configs.update(config, {"optim.learnig_rate": 1e-3})
  spec, overrides, rest = configs.split_argv(["--config=tiny", "--config.train.steps", "3", "--show", "2"])
  assert (spec, overrides, rest) == ("tiny", [("train.steps", "3")], ["--show", "2"])


def test_print_config_shows_the_resolved_config_and_starts_nothing(tmp_path, models, capsys):
  assert train_main(tiny_args(tmp_path, models, "--print_config", "--config.train.steps=5")) == 0
  out = capsys.readouterr().out
  assert "train.steps = 5" in out and "model.dtype = 'float32'" in out and "model.kernels = 'cpu'" in out
  assert not (tmp_path / "run").exists()


def test_the_data_inspector_takes_a_training_config(tmp_path, models, capsys):
  assert data_main(tiny_args(tmp_path, models, "--show=1", "--config.data.max_seq_len=256")) == 0
  out = capsys.readouterr().out
  assert "records 800" in out and "trainable tokens" in out and out.count("\n--- ") == 1


# ----------------------------------------------------------------------------------------------------------------
# The installed script


def _script_env() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def test_the_jaxtune_script_prints_one_line_and_a_traceback_only_with_debug(tmp_path):
  script = pathlib.Path(sys.executable).with_name("jaxtune")
  path = tmp_path / "typo.py"
  path.write_text(
    "from jaxtune.train.config import default_config\n\n\ndef get_config():\n"
    "  config = default_config()\n  config.optim.learning_rate = 1e-4\n  return config\n"
  )
  plain = subprocess.run(
    [str(script), "train", "--config", str(path)], capture_output=True, text=True, env=_script_env(), timeout=120
  )
  assert plain.returncode == 2
  assert plain.stderr == f"error: {path}:6: optim.learning_rate is not a setting; did you mean optim.lr?\n"
  debug = subprocess.run(
    [sys.executable, "-m", "jaxtune.data", "--config", str(path)],
    capture_output=True,
    text=True,
    env={**_script_env(), cli.DEBUG_ENV: "1"},
    timeout=120,
  )
  assert debug.returncode == 1 and "Traceback" in debug.stderr and "optim.learning_rate" in debug.stderr


def test_dry_run_reads_a_built_in_models_shape(models):
  from jaxtune.parallel import dry_run

  cfg = dry_run.model_config(config_model_path="tiny-random", cache_dir=str(models))
  assert (cfg.hidden_size, cfg.num_layers) == (32, 2)
