"""The `jaxtune` command: one subcommand per entry point, each also `python -m jaxtune.X`.

    jaxtune train --config quickstart
    jaxtune data --config quickstart --show 2
    jaxtune chat --run runs/quickstart

`COMMANDS` is the registry: a subcommand is a module whose `main(argv) -> int` parses its own
arguments. A new entry point adds one line here. Every `main` is wrapped by `guard`, which turns a
`UserError` (and a missing or unreadable file) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import sys
from typing import Callable, Sequence

from jaxtune.errors import UserError, write_failure, write_fix

# Commands that run a model on XLA's CPU backend: they re-execute once with glibc's huge pages for XLA's large
# per-execution buffers (jaxtune/train/host.py), as their `python -m` forms do.
HUGE_PAGE_COMMANDS = ("train", "chat", "eval")
DEBUG_ENV = "JAXTUNE_DEBUG"  # "1": every error shows its traceback, as --debug does
EXIT_USER_ERROR = 2


@dataclasses.dataclass(frozen=True)
class Command:
  module: str  # has main(argv) -> int
  summary: str  # one line for `jaxtune --help`


COMMANDS = {
  "train": Command(
    "jaxtune.train.__main__", "fine-tune a model: --config NAME_OR_FILE | --axolotl PATH.yml [--config.KEY=VALUE ...]"
  ),
  "data": Command("jaxtune.data.__main__", "look at a dataset as training sees it: statistics, masks, a dump"),
  "chat": Command("jaxtune.chat", "chat in the terminal with a run's checkpoint or an HF model"),
  "export": Command("jaxtune.export.__main__", "export a run: merged HF checkpoint, PEFT adapter or GGUF"),
  "merge": Command("jaxtune.merge.__main__", "merge models as a mergekit recipe says: linear, slerp, ties, dare, ..."),
  "convert": Command("jaxtune.hf.gguf", "convert a GGUF file into an HF checkpoint directory"),
  "eval": Command("jaxtune.eval.__main__", "score a run or a model on data: EM/F1, ROUGE, BLEU, ... with intervals"),
  "sweep": Command("jaxtune.sweep.__main__", "hyper-parameter search: grid, random or Bayesian trials with pruning"),
  "dry-run": Command("jaxtune.parallel.dry_run", "compile a config's train step for N devices: memory per device"),
}


def debug_requested(argv: Sequence[str]) -> bool:
  return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_message(error: BaseException) -> str | None:
  """The one-line message for an error the user can fix, or None for a bug (keep its traceback)."""
  if isinstance(error, UserError):
    return str(error)
  # A full disk or a read-only file system where no call site reported it (a cache, say); a
  # PermissionError can come from a read too, and is reported as it is, below.
  why = write_failure(error)
  if isinstance(error, OSError) and not isinstance(error, PermissionError) and why is not None:
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}could not write ({why}); {write_fix(why)}."
  if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
    where = error.filename or ""
    return f"{where}: {error.strerror or error}" if where else str(error)
  return None


def guard(main: Callable[[list[str]], int | None]) -> Callable[[Sequence[str] | None], int]:
  """`main(argv)` that reports a user's error as `error: MESSAGE` on stderr and returns 2.

  `--debug` in argv (removed before `main` sees it) or JAXTUNE_DEBUG=1 re-raises instead.
  """

  @functools.wraps(main)
  def guarded(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
      return main(argv) or 0
    except Exception as e:
      message = user_message(e)
      if message is None or debug:
        raise
      print(f"error: {message}", file=sys.stderr, flush=True)
      return EXIT_USER_ERROR
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return 130

  return guarded


def parser(prog: str, doc: str, *, config: str | None = None) -> argparse.ArgumentParser:
  """A subcommand's parser: its module docstring as help, --debug, and with `config` the config flags.

  `--config NAME_OR_FILE` and `--config.KEY=VALUE` are taken out of argv before parsing
  (`parse_with_config`); they are declared here so that --help lists them.
  """
  p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  if config:
    p.add_argument("--config", metavar="NAME_OR_FILE", help=config)
    p.add_argument(
      "--config.KEY", metavar="VALUE", dest="_override", help="set one setting, e.g. --config.train.steps=9"
    )
  p.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
  return p


def parse_with_config(p: argparse.ArgumentParser, argv: Sequence[str]):
  """(the loaded config, the other arguments): --config is required."""
  from jaxtune import configs

  spec, overrides, rest = configs.split_argv(argv)
  args = p.parse_args(rest)
  if spec is None:
    p.error("--config is required: a config file or a shipped config (" + ", ".join(configs.shipped()) + ")")
  return configs.load(spec, overrides), args


def usage() -> str:
  width = max(len(name) for name in COMMANDS)
  lines = ["usage: jaxtune COMMAND [ARGS ...]   (jaxtune COMMAND --help for its arguments)", "", "commands:"]
  lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
  lines += ["", "Every command takes --debug to show the traceback of an error (or set JAXTUNE_DEBUG=1)."]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0 if argv else EXIT_USER_ERROR
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    import difflib

    near = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    print(f"error: unknown command '{name}'; {hint}commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return EXIT_USER_ERROR
  if name in HUGE_PAGE_COMMANDS:
    from jaxtune.train import host

    host.reexec_with_huge_pages("jaxtune")  # `jaxtune train` or `python -m jaxtune train`: ours to repeat
  module = importlib.import_module(COMMANDS[name].module)
  return module.main(rest)


if __name__ == "__main__":
  sys.exit(main())
