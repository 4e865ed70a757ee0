"""`python -m jaxtune.chat` in a real pseudo-terminal: prompts, streamed answers, commands, Ctrl-C and exit."""

import os
import pathlib
import pty
import re
import select
import subprocess
import sys
import time

from jaxtune import generation

import tiny_runs

TIMEOUT = 120  # a cold start (imports, load, first compiles) is seconds; this only bounds a hang


# The child makes the pty its controlling terminal, so that Ctrl-C there is a SIGINT, as in a shell. (Popen, not
# pty.fork: forking this process, whose JAX runs threads, is unsafe.)
LAUNCH = (
  "import fcntl, runpy, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
  "runpy.run_module('jaxtune.chat', run_name='__main__')"
)


class Terminal:
  """`python -m jaxtune.chat ARGS` on the far side of a pty: what it writes is read back; typing goes to its stdin."""

  def __init__(self, args: list[str], env: dict[str, str]):
    self.fd, child = pty.openpty()
    self.proc = subprocess.Popen(
      [sys.executable, "-c", LAUNCH, *args],
      stdin=child,
      stdout=child,
      stderr=child,
      start_new_session=True,
      cwd=tiny_runs.REPO,
      env=env,
    )
    os.close(child)
    self.seen, self.typed = "", []

  def read_until(self, marker: str) -> str:
    """Everything written since the last call, up to and including the next `marker`."""
    deadline = time.monotonic() + TIMEOUT
    while marker not in self.seen:
      assert time.monotonic() < deadline, (
        f"no {marker!r} after {TIMEOUT} s of typing {self.typed[-1:]}; the terminal shows:\n{self.seen}"
      )
      if select.select([self.fd], [], [], 1.0)[0]:
        try:
          data = os.read(self.fd, 4096)
        except OSError:  # the child exited and closed its side
          data = b""
        assert data, f"the chat exited before {marker!r}; the terminal shows:\n{self.seen}"
        self.seen += data.decode("utf-8", "replace").replace("\r\n", "\n")
    out, self.seen = self.seen.split(marker, 1)
    return out + marker

  def wait_for_the_prompt_to_wait(self) -> None:
    """Until the chat's main thread sleeps in readline's wait for a key (Linux: its wchan is a poll or select)."""
    deadline = time.monotonic() + TIMEOUT
    while not any(w in pathlib.Path(f"/proc/{self.proc.pid}/wchan").read_text() for w in ("poll", "select")):
      assert time.monotonic() < deadline, f"the chat never waited for a key; the terminal shows:\n{self.seen}"
      time.sleep(0.01)

  def type(self, text: str) -> None:
    os.write(self.fd, text.encode())
    self.typed.append(text)

  def exit_code(self) -> int:
    try:
      return self.proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"the chat did not exit; the terminal shows:\n{self.seen}") from None

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    os.close(self.fd)


def test_chat_in_a_terminal(tiny_dir, request):
  env = {**tiny_runs.env(), "TERM": "dumb"}  # dumb: readline writes no escape sequences
  term = Terminal(["--model", str(tiny_dir), "--max_new_tokens", "8", "--temperature", "0"], env)
  # While the chat starts, the answers it must give (greedy), computed here with the batched loop, one at a time as
  # the chat asks them (the same padded shapes). The model is loaded here too, after the chat was started.
  model, tokenizer = request.getfixturevalue("tiny")
  conversations = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
  ]
  want = [generation.generate(model, tokenizer, [c], max_new_tokens=8)[0] for c in conversations]
  try:
    assert "chatting with" in term.read_until("you> ")
    term.type("hello\n")
    first = term.read_until("you> ")
    term.type("/system be brief\n")
    system = term.read_until("you> ")
    term.type("/reset\n")
    reset = term.read_until("you> ")
    term.type("hi\n")
    second = term.read_until("you> ")
    # Ctrl-C at the prompt: the line is dropped, the chat goes on. (A Ctrl-C that lands between readline's echo of a
    # key and its wait for the next is seen only at the next key: CPython's readline checks signals when its wait is
    # interrupted. No person types within that microsecond, but a test on a loaded machine can: so it waits until
    # the chat waits.)
    term.type("half a line")
    term.read_until("half a line")
    term.wait_for_the_prompt_to_wait()
    term.type("\x03")
    interrupted = term.read_until("you> ")
    term.type("/exit\n")
    assert term.exit_code() == 0
  finally:
    term.close()
  assert re.search(rf"hello\nmodel> {re.escape(want[0])}\n\nyou> $", first), first
  assert "(system prompt set: new conversation)" in system and "(new conversation)" in reset
  assert second.endswith(f"model> {want[1]}\n\nyou> "), second
  assert "model>" not in interrupted + term.seen
  assert "Traceback" not in first + system + reset + second + interrupted + term.seen
