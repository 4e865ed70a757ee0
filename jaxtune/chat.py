"""Chat in the terminal with a run's checkpoint or an HF model (with or without a PEFT LoRA adapter).

    jaxtune chat --run runs/quickstart [--step 200]
    jaxtune chat --model smollm2-gguf --system "Answer in one sentence."
    jaxtune chat --model ./base --adapter ./my-adapter --temperature 0
    jaxtune chat --run runs/quickstart --prompt-file prompts.txt > transcript.txt

Every line typed after `you> ` is a user turn of one conversation: the whole history (and the
system prompt) goes through the tokenizer's chat template, and the answer is printed after
`model> ` token by token as it is decoded. Commands:

    /reset          start a new conversation; the system prompt stays
    /system TEXT    set the system prompt; `/system` alone removes it. Either starts a new
                    conversation: the earlier answers were given under another system prompt.
    /exit           quit (so do Ctrl-D and the end of the input)

Ctrl-C stops an answer (what was shown of it stays in the history) or clears the line.

--prompt-file FILE answers the file instead of the keyboard: each non-blank line is the next
user turn of the same conversation (or a command: a `/reset` line starts a new one), printed as
the same `you> ` / `model> ` transcript; an error there ends the command with code 2.

Sampling: temperature 0.7 with top-p 0.9 by default, the usual setting for chat models (greedy
decoding makes small models repeat themselves); --temperature 0 is greedy and deterministic.
Answer N of a session samples with seed --seed + N, so a session replays exactly.

When the history no longer fits the model (its max_position_embeddings less --max_new_tokens),
the oldest turns are dropped, and the chat says so the first time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import signal
import sys
from typing import Any, Iterator

from jaxtune import cli
from jaxtune.errors import UserError
from jaxtune.train import host

PROMPT, ANSWER = "you> ", "model> "
COMMANDS = "/reset, /system [TEXT], /exit"


class ChatError(UserError, ValueError):
  """A chat that cannot go on as asked: a template without a system role, a message too long, a bad command."""


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = cli.parser("jaxtune chat", __doc__.splitlines()[0])
  p.epilog = __doc__.split("\n", 1)[1]
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--run", type=pathlib.Path, metavar="RUN_DIR", help="a training run's directory (its output_dir)")
  source.add_argument(
    "--model", metavar="DIR", help="an HF checkpoint directory, hub id or built-in model (tiny-random)"
  )
  p.add_argument("--step", type=int, metavar="N", help="with --run: the checkpoint step (default: the latest)")
  p.add_argument("--adapter", type=pathlib.Path, metavar="DIR", help="with --model: a PEFT LoRA adapter to apply")
  p.add_argument("--system", metavar="TEXT", help="the system prompt")
  p.add_argument("--max_new_tokens", type=int, default=256, help="the longest answer, in tokens (default 256)")
  p.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default 0.7)")
  p.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens only")
  p.add_argument(
    "--top_p", type=float, default=0.9, help="sample among the likeliest tokens of this mass (default 0.9)"
  )
  p.add_argument("--seed", type=int, default=0, help="answer N samples with seed + N (default 0)")
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    help="with --model: weights and compute (default float32 on CPU, bfloat16 elsewhere); a run keeps its own",
  )
  p.add_argument(
    "--prompt-file", type=pathlib.Path, metavar="FILE", help="answer this file's lines (one prompt a line), then exit"
  )
  args = p.parse_args(argv)
  if args.step is not None and args.run is None:
    p.error("--step needs --run")
  if args.model is None and (args.adapter is not None or args.dtype is not None):
    p.error("--adapter and --dtype go with --model (a run is loaded with its adapters, in its training dtype)")
  if args.max_new_tokens < 1:
    p.error("--max_new_tokens must be at least 1")
  return args


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
  """(model, tokenizer, what to call them) from --run, or --model and --adapter."""
  import jax

  from jaxtune.hf.load import load_model

  if args.run is not None:
    from jaxtune.export.run import load_run

    run = load_run(args.run, args.step)
    return run.model, _tokenizer(run.source_dir), f"{args.run} step {run.step}"
  from jaxtune.train import builtin_models

  path = builtin_models.resolve(args.model, builtin_models.DEFAULT_CACHE)
  tokenizer = _tokenizer(path)  # before the weights: a checkpoint without a chat template fails at once
  model = load_model(path, dtype=args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
  if args.adapter is not None:
    from jaxtune.peft.import_adapter import load_adapter

    model = load_adapter(model, args.adapter)
  return model, tokenizer, args.model + (f" + {args.adapter}" if args.adapter is not None else "")


def _tokenizer(path):
  from jaxtune.hf.load import load_tokenizer

  try:
    tokenizer = load_tokenizer(path)
  except (OSError, ValueError) as e:
    raise ChatError(
      f"{path}: no tokenizer could be loaded ({e}); chat needs the checkpoint's tokenizer files."
    ) from None
  if not tokenizer.chat_template:
    raise ChatError(
      f"{path}: the tokenizer has no chat template (chat_template in tokenizer_config.json or chat_template.jinja); "
      "chat needs a model tuned for chat, or a template added to the checkpoint."
    )
  return tokenizer


@dataclasses.dataclass
class Chat:
  """One conversation's state: the system prompt, the turns so far, and how answers are sampled."""

  model: Any
  tokenizer: Any
  max_new_tokens: int
  sampling: dict  # temperature, top_k, top_p
  seed: int = 0
  system: str | None = None
  turns: list[dict] = dataclasses.field(default_factory=list)  # user and assistant, alternating
  answered: int = 0
  warned: bool = False

  def messages(self, turns: list[dict] | None = None) -> list[dict]:
    system = [{"role": "system", "content": self.system}] if self.system else []
    return system + (self.turns if turns is None else turns)

  def encode(self, messages: list[dict]) -> list[int]:
    """Token ids of the templated messages, ready for the assistant's answer."""
    import jinja2

    from jaxtune.generation import encode_prompts

    try:
      return encode_prompts(self.tokenizer, [messages], chat=True)[0]
    except jinja2.TemplateError as e:
      raise ChatError(f"the model's chat template refuses this conversation: {e}") from e

  def set_system(self, text: str | None) -> None:
    """A new system prompt (None: none), checked against the template; the conversation starts over."""
    if text:
      probe = [{"role": "user", "content": "hi"}]
      try:
        self.encode([{"role": "system", "content": text}] + probe)
      except ChatError as e:
        self.encode(probe)  # the template fails without a system message too: that is the error to show
        raise ChatError(
          f"the model's chat template has no system role ({e.__cause__}); chat without --system / /system, or put "
          "the instructions in your first message."
        ) from e
    self.system, self.turns = text or None, []

  def prompt(self, text: str) -> list[int]:
    """The prompt's ids with `text` as the next user turn; drops the oldest turns to fit the model."""
    positions = self.model.config.max_position_embeddings
    limit = positions - self.max_new_tokens
    history, message = self.turns, [{"role": "user", "content": text}]
    ids = self.encode(self.messages(history + message))
    while len(ids) > limit and history:
      history = history[2:]  # the oldest exchange: a user turn and its answer
      ids = self.encode(self.messages(history + message))
    if len(ids) > limit:
      raise ChatError(
        f"the message is {len(ids)} tokens with the template and system prompt; the model takes {limit} "
        f"({positions} positions less --max_new_tokens {self.max_new_tokens}). Send a shorter one, or lower "
        "--max_new_tokens."
      )
    if len(history) < len(self.turns) and not self.warned:
      print(
        f"(the conversation outgrew the {limit} tokens a prompt can have: its oldest turns are dropped from now on)"
      )
      self.warned = True
    self.turns = history + message
    return ids

  def answer(self, text: str) -> str:
    """Streams the answer to `text` to stdout and records both turns; Ctrl-C keeps what was shown of it."""
    from jaxtune.generation import stop_token_ids, stream_ids, stream_text

    ids = self.prompt(text)
    seed, self.answered = self.seed + self.answered, self.answered + 1
    tokens = stream_ids(
      self.model,
      ids,
      max_new_tokens=self.max_new_tokens,
      stop_ids=stop_token_ids(self.tokenizer),
      seed=seed,
      **self.sampling,
    )
    tokens = _until_ctrl_c(tokens)
    print(ANSWER, end="", flush=True)
    shown, stopped = [], True
    try:
      for chunk in stream_text(self.tokenizer, tokens):
        print(chunk, end="", flush=True)
        shown.append(chunk)
      stopped = False
    finally:
      if shown or not stopped:
        self.turns.append({"role": "assistant", "content": "".join(shown)})
      else:  # stopped before a word: as if never asked
        self.turns.pop()
    return "".join(shown)


def handle(chat: Chat, line: str) -> bool:
  """Acts on one input line (a message or a command); False to quit."""
  text = line.strip()
  if not text:
    return True
  if text.startswith("/"):
    command, _, arg = text.partition(" ")
    if command == "/exit":
      return False
    if command == "/reset":
      chat.turns = []
      print("(new conversation)")
    elif command == "/system":
      chat.set_system(arg.strip() or None)
      print("(system prompt set: new conversation)" if chat.system else "(no system prompt: new conversation)")
    else:
      raise ChatError(f"unknown command {command}; the commands are {COMMANDS}.")
    return True
  chat.answer(text)
  print("\n", flush=True)
  return True


# Ctrl-C. The terminal sends SIGINT to the process, and the kernel hands it to any thread that does not block it.
# Taken by one of XLA's worker threads, it would reach the main thread, waiting in readline for a key, only at the
# next key: Ctrl-C at the prompt would seem ignored. So every thread blocks SIGINT (threads inherit the mask of the
# thread that starts them): the main thread lets it in only while it waits at the prompt, and otherwise looks for a
# pending one between decoded tokens.
_SIGINT = {signal.SIGINT}
_MASKS = hasattr(signal, "pthread_sigmask")  # POSIX


@contextlib.contextmanager
def ctrl_c_blocked():
  """SIGINT blocked in this thread and every thread it starts, then the caller's mask again.

  Inside, Ctrl-C raises KeyboardInterrupt (where it is let in) even when this process inherited SIGINT
  ignored, as a command started in the background by a non-interactive shell does.
  """
  handler = signal.signal(signal.SIGINT, signal.default_int_handler)
  before = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT) if _MASKS else None
  try:
    yield
  finally:
    if before is not None:
      signal.pthread_sigmask(signal.SIG_SETMASK, before)
    if handler is not None:  # None: one installed outside Python, which Python cannot put back
      signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def ctrl_c_allowed():
  """SIGINT delivered at once (as KeyboardInterrupt) inside the block: the prompt's wait for a key."""
  if not _MASKS:
    yield
    return
  signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGINT)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT)


def raise_if_ctrl_c() -> None:
  """KeyboardInterrupt when a blocked Ctrl-C is pending (and consumes it)."""
  if _MASKS and signal.SIGINT in signal.sigpending():
    signal.sigtimedwait(_SIGINT, 0)
    raise KeyboardInterrupt


def _until_ctrl_c(tokens: Iterator[int]) -> Iterator[int]:
  for token in tokens:
    raise_if_ctrl_c()
    yield token


def repl(chat: Chat) -> None:
  interactive = sys.stdin.isatty()
  try:
    import readline  # noqa: F401  line editing and history for input()
  except ImportError:
    pass
  while True:
    try:
      with ctrl_c_allowed():
        line = input(PROMPT)
      if not interactive:  # piped input: show it, so the output reads as a transcript
        print(line)
    except EOFError:
      print()
      return
    except KeyboardInterrupt:
      print()
      continue
    try:
      if not handle(chat, line):
        return
    except KeyboardInterrupt:
      print(" [stopped]\n", flush=True)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)


def answer_file(chat: Chat, path: pathlib.Path) -> None:
  for line in path.read_text().splitlines():
    if line.strip():
      print(PROMPT + line.strip(), flush=True)
      if not handle(chat, line):
        return


@cli.guard
def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if args.prompt_file is not None and not args.prompt_file.is_file():
    raise ChatError(f"{args.prompt_file}: no such file; --prompt-file takes a text file with one prompt a line.")
  with ctrl_c_blocked():
    return _chat(args)


def _chat(args: argparse.Namespace) -> int:
  import jax

  if not jax.config.jax_compilation_cache_dir:  # as `jaxtune train` does: the next chat with a model starts faster
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxtune/xla"))
  model, tokenizer, name = load(args)
  raise_if_ctrl_c()  # pressed while the model loaded: quit now
  sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  chat = Chat(model, tokenizer, args.max_new_tokens, sampling, seed=args.seed)
  if args.max_new_tokens >= model.config.max_position_embeddings:
    raise ChatError(
      f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt: the model has "
      f"{model.config.max_position_embeddings} positions."
    )
  chat.set_system(args.system)
  if args.prompt_file is not None:
    answer_file(chat, args.prompt_file)
  else:
    print(f"chatting with {name}; commands: {COMMANDS}; Ctrl-D quits.", flush=True)
    repl(chat)
  return 0


if __name__ == "__main__":
  host.reexec_with_huge_pages("jaxtune.chat")  # CPU: huge pages for XLA's per-call buffers (host.py)
  sys.exit(main())
