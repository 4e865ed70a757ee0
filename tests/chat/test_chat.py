"""`jaxtune chat` in-process: --prompt-file transcripts, history and its truncation, commands, and the user's errors."""

import shutil

import pytest

from jaxtune import generation
from jaxtune.chat import ANSWER, PROMPT, Chat, ChatError, handle, main, repl

GREEDY = ["--max_new_tokens", "8", "--temperature", "0"]


def answers(out: str) -> list[str]:
  """The answers of a transcript, in order."""
  return [line.removeprefix(ANSWER) for line in out.splitlines() if line.startswith(ANSWER)]


def expected(tiny, conversation: list[dict]) -> str:
  model, tokenizer = tiny
  return generation.generate(model, tokenizer, [conversation], max_new_tokens=8, temperature=0.0)[0]


def test_prompt_file_is_one_conversation_until_reset(tiny, tiny_dir, tmp_path, capsys):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Hello!\n\n  What did I just say?\n/reset\nHello!\n/system be brief\nHi\n")
  assert main(["--model", str(tiny_dir), "--prompt-file", str(prompts), *GREEDY]) == 0
  out = capsys.readouterr().out
  first, second, third, fourth = answers(out)
  assert first == expected(tiny, [{"role": "user", "content": "Hello!"}])
  history = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": first},
    {"role": "user", "content": "What did I just say?"},
  ]
  assert second == expected(tiny, history)
  assert third == first  # /reset: the same question in a new conversation, the same greedy answer
  assert fourth == expected(tiny, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"}])
  assert len({first, second, fourth}) == 3  # the history and the system prompt changed the answers
  assert f"{PROMPT}What did I just say?\n" in out and f"{PROMPT}/reset\n(new conversation)\n" in out


def test_history_drops_the_oldest_turns_when_it_outgrows_the_model(tiny, capsys):
  model, tokenizer = tiny
  # 1024 positions less 944 new tokens: a prompt holds at most 80 tokens (characters here).
  chat = Chat(model, tokenizer, max_new_tokens=944, sampling={})
  chat.set_system("sys")
  chat.turns = [{"role": "user", "content": "a" * 8}, {"role": "assistant", "content": "b" * 8}]
  ids = chat.prompt("c" * 8)
  assert len(ids) <= 80 and len(chat.turns) == 3 and capsys.readouterr().out == ""
  chat.turns.append({"role": "assistant", "content": "d" * 8})
  ids = chat.prompt("e" * 8)
  assert len(ids) <= 80 and [t["content"][0] for t in chat.turns] == ["c", "d", "e"]
  assert chat.system == "sys"  # the system prompt is never dropped
  assert "oldest turns are dropped" in capsys.readouterr().out
  chat.turns.append({"role": "assistant", "content": "f" * 8})
  chat.prompt("g" * 8)
  assert capsys.readouterr().out == ""  # said once
  chat.turns.append({"role": "assistant", "content": "i" * 8})
  with pytest.raises(ChatError, match=r"the message is \d+ tokens .* takes 80 \(1024 positions less --max_new_tokens"):
    chat.prompt("h" * 80)
  assert chat.turns[-1]["content"] == "i" * 8  # a refused message leaves the history as it was


def test_a_template_without_a_system_role(tiny):
  model, tokenizer = tiny
  gemma_like = tokenizer.chat_template.replace(
    "{% for m in messages %}",
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}",
  )
  tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path, chat_template=gemma_like)
  chat = Chat(model, tokenizer, max_new_tokens=8, sampling={})
  with pytest.raises(ChatError, match=r"^the model's chat template has no system role \(System role not supported\)"):
    chat.set_system("be brief")
  assert chat.system is None
  chat.prompt("hi")  # the chat goes on without one


def test_ctrl_c_stops_the_answer_and_keeps_what_was_shown(tiny, monkeypatch, capsys):
  model, tokenizer = tiny
  words = [tokenizer("Hi th")["input_ids"], []]  # Ctrl-C after two words, then before any

  def interrupted(*args, **kwargs):
    yield from words.pop(0)
    raise KeyboardInterrupt

  monkeypatch.setattr(generation, "stream_ids", interrupted)
  lines = iter(["hello", "/bogus", "again", "/exit"])
  monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
  chat = Chat(model, tokenizer, max_new_tokens=8, sampling={})
  repl(chat)
  out, err = capsys.readouterr()
  assert f"{ANSWER}Hi th [stopped]" in out and out.count("[stopped]") == 2
  # What was shown stays in the history; an answer stopped before its first word takes its question with it.
  assert chat.turns == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi th"}]
  assert err == "error: unknown command /bogus; the commands are /reset, /system [TEXT], /exit.\n"
  assert handle(chat, "/exit") is False


def one_line_error(capsys) -> str:
  out, err = capsys.readouterr()
  assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in out + err, err
  return err


def test_errors_are_one_line(tiny_dir, tmp_path, capsys):
  assert main(["--run", str(tmp_path / "nope")]) == 2
  assert "nope: not a directory; pass --run the output_dir of a training run" in one_line_error(capsys)
  assert main(["--model", str(tiny_dir), "--adapter", str(tmp_path / "no_adapter")]) == 2
  assert "no_adapter: not a directory; pass a PEFT adapter directory" in one_line_error(capsys)
  (tmp_path / "adapter").mkdir()
  assert main(["--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter")]) == 2
  assert f"{tmp_path / 'adapter' / 'adapter_config.json'}: not found" in one_line_error(capsys)
  assert main(["--model", str(tmp_path / "no_model"), *GREEDY]) == 2
  assert "no_model: not a directory" in one_line_error(capsys)
  assert main(["--model", str(tiny_dir), "--prompt-file", str(tmp_path / "none.txt")]) == 2
  assert "none.txt: no such file" in one_line_error(capsys)
  no_template = shutil.copytree(tiny_dir, tmp_path / "base_model")
  (no_template / "chat_template.jinja").unlink()
  assert main(["--model", str(no_template)]) == 2
  assert "base_model: the tokenizer has no chat template" in one_line_error(capsys)
  bad = tmp_path / "bad.txt"
  bad.write_text("/sytem be brief\n")
  assert main(["--model", str(tiny_dir), "--prompt-file", str(bad)]) == 2
  assert "unknown command /sytem" in one_line_error(capsys)
  with pytest.raises(SystemExit) as exit_info:
    main(["--model", str(tiny_dir), "--step", "3"])
  assert exit_info.value.code == 2 and "--step needs --run" in capsys.readouterr().err


def test_module_docstring_is_the_help(capsys):
  with pytest.raises(SystemExit):
    main(["--help"])
  out = capsys.readouterr().out
  assert out.startswith("usage: jaxtune chat") and "/system TEXT" in out and "--prompt-file" in out
