"""Malformed records of every kind and the exact error each gives: shared by the reader's and the CLI's tests."""


def msgs(*turns):
  return {"messages": [{"role": r, "content": c} for r, c in turns]}


MALFORMED = {
  "invalid JSON": (
    '{"messages": [',
    "line: invalid JSON (Expecting value at column 15); fix the line or skip bad records (on_error='skip')",
  ),
  "not an object": ("[1, 2]", "record: expected a JSON object, got a list; write one object per record"),
  "wrong role order": (
    msgs(("user", "a"), ("user", "b"), ("assistant", "c")),
    "messages[1].role: two 'user' turns in a row; user and assistant turns must alternate",
  ),
  "starts with assistant": (
    msgs(("assistant", "a"), ("user", "b"), ("assistant", "c")),
    "messages[0].role: the conversation must start with a user turn (after an optional system prompt), got 'assistant'",
  ),
  "system not first": (
    msgs(("user", "a"), ("system", "b"), ("assistant", "c")),
    "messages[1].role: 'system' is only allowed as the first message; merge it into the first system message",
  ),
  "empty content": (
    msgs(("user", "a"), ("assistant", "  ")),
    "messages[1].content: empty content; remove the record or fill in the text",
  ),
  "non-string content": (
    {"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
    "messages[0].content: expected a string, got a list",
  ),
  "unknown role": (
    msgs(("user", "a"), ("tool", "b")),
    "messages[1].role: unknown role 'tool'; use one of assistant, model, system, user",
  ),
  "missing role": (
    {"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]},
    "messages[0].role: missing field",
  ),
  "missing content": (
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
    "messages[0].content: missing field",
  ),
  "ends on user": (
    msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
    "messages: the conversation ends on a user turn; the last message must be an assistant answer to learn from",
  ),
  "empty conversation": ({"messages": []}, "messages: empty conversation"),
}

# (format, a good record, a bad one, the error after "path:line: ")
MALFORMED_BY_FORMAT = [
  ("alpaca", {"instruction": "i", "output": "o"}, {"instruction": "i", "input": "x"}, "output: missing field"),
  (
    "alpaca",
    {"instruction": "i", "output": "o"},
    {"instruction": 3, "output": "o"},
    "instruction: expected a string, got a number",
  ),
  (
    "alpaca",
    {"instruction": "i", "output": "o"},
    {"instruction": "i", "output": ""},
    "output: empty content; remove the record or fill in the text",
  ),
  ("completion", {"prompt": "p", "completion": "c"}, {"prompt": "p"}, "completion: missing field"),
  ("text", {"text": "t"}, {"text": None}, "text: missing field"),
  ("text", {"text": "t"}, {"text": {"a": 1}}, "text: expected a string, got an object"),
  (
    "sharegpt",
    {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
    "conversations[1].from: unknown role 'bot'; use one of assistant, gpt, human, model, system, user",
  ),
  (
    "preference",
    {"prompt": "p", "chosen": "a", "rejected": "b"},
    {"prompt": "p", "chosen": "a"},
    "rejected: missing field",
  ),
  (
    "preference",
    {"prompt": "p", "chosen": "a", "rejected": "b"},
    {"chosen": "a", "rejected": "b"},
    "prompt: missing field; a text 'chosen' answer needs a prompt",
  ),
]
