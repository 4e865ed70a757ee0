"""The config reference, docs/config-reference.md: every key of `default_config()`, its default and its meaning.

A key's meaning is the comment written where the key is defined (one place): the comment lines directly above
the line that sets it, then the comment at the end of that line. The functions that build the sections are
listed in `SOURCES`; a key they define without a comment, or two keys on one commented line, is an error.

    python -m jaxtune.train.config_reference            # print the reference
    python -m jaxtune.train.config_reference --write    # rewrite docs/config-reference.md

`tests/train/test_config_reference.py` regenerates it and compares, so the page cannot drift from the code.
"""

from __future__ import annotations

import ast
import inspect
import io
import pathlib
import sys
import tokenize
from typing import Any, Callable

from jaxtune import configs
from jaxtune.data import config as data_config_lib
from jaxtune.parallel import mesh
from jaxtune.train import config as config_lib
from jaxtune.train import grpo, objectives, optim

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
# (key prefix, function that defines those keys): every leaf of default_config() is defined in one of them.
SOURCES: tuple[tuple[str, Callable[[], Any]], ...] = (
  ("", config_lib.default_config),
  ("", objectives.objective_config),
  ("grpo.", grpo.grpo_config),
  ("data.", data_config_lib.data_config),
  ("optim.", optim.optim_config),
  ("mesh.", mesh.mesh_config),
)
_LONG = 70  # defaults longer than this are summarised


class ReferenceError(ValueError):
  """A key without a meaning, or a comment that cannot be told apart between keys."""


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
  """({line: comment text}, lines that hold nothing but a comment) of a module's source."""
  text, alone = {}, set()
  code_lines = set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      text[token.start[0]] = token.string.lstrip("#").strip()
    elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
      code_lines.update(range(token.start[0], token.end[0] + 1))
  alone = {line for line in text if line not in code_lines}
  return text, alone


def _dotted(node: ast.expr) -> list[str] | None:
  """["c", "a", "b"] for `c.a.b`, else None."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return [node.id] + list(reversed(parts)) if isinstance(node, ast.Name) else None


def _dict_keywords(value: ast.expr) -> list[ast.keyword] | None:
  """The keywords of `ConfigDict(dict(k=v, ...))` / `dict(...)`, or None for another expression."""
  if isinstance(value, ast.Call) and _dotted(value.func) and _dotted(value.func)[-1] == "ConfigDict" and value.args:
    value = value.args[0]
  if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict":
    return value.keywords
  return None


def _definitions(function: Callable[[], Any]) -> list[tuple[str, int, int]]:
  """(relative key, first line, last line) of every key `function` sets by name, in source order."""
  path = inspect.getsourcefile(function)
  tree = ast.parse(pathlib.Path(path).read_text())
  (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function.__name__]
  out = []
  for stmt in ast.walk(node):
    if isinstance(stmt, ast.Return) and stmt.value is not None:
      for kw in _dict_keywords(stmt.value) or ():
        out.append((kw.arg, kw.lineno, kw.end_lineno))
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
      continue
    parts = _dotted(stmt.targets[0])
    if not parts or len(parts) < 2:
      continue
    key = ".".join(parts[1:])
    keywords = _dict_keywords(stmt.value)
    if keywords is not None:
      out += [(f"{key}.{kw.arg}", kw.lineno, kw.end_lineno) for kw in keywords]
    elif not (isinstance(stmt.value, ast.Call) and (_dotted(stmt.value.func) or [""])[-1] != "ConfigDict"):
      out.append((key, stmt.lineno, stmt.end_lineno))  # a value (a sub-config built by a function is skipped)
  return sorted(out, key=lambda d: d[1])


def meanings() -> dict[str, str]:
  """{dotted key: its meaning} for every key the `SOURCES` define, read from their comments."""
  out = {}
  for prefix, function in SOURCES:
    path = inspect.getsourcefile(function)
    text, alone = _comments(pathlib.Path(path).read_text())
    definitions = _definitions(function)
    lines = [first for _, first, _ in definitions]
    for key, first, last in definitions:
      above, line = [], first - 1
      while line in alone:
        above.insert(0, text[line])
        line -= 1
      trailing = text.get(last) or text.get(first)  # the end of the line that sets it (or of its first line)
      if (trailing or above) and lines.count(first) > 1:
        raise ReferenceError(f"{path}:{first}: {lines.count(first)} keys share one comment; write one key a line")
      meaning = " ".join(above + ([trailing] if trailing else []))
      out[prefix + key] = meaning.strip()
  return out


def _default(value: Any) -> str:
  if isinstance(value, configs.ml_collections.ConfigDict):
    value = value.to_dict()
  shown = repr(value)
  if len(shown) > _LONG:
    return f"{len(value)} entries (`--print_config` lists them)"
  return f"`{shown}`"


def markdown() -> str:
  """The reference page: a section per top-level part, one line per key."""
  config = config_lib.default_config()
  found = meanings()
  keys = configs.leaves(config)
  missing = [k for k in keys if not found.get(k)]
  if missing:
    raise ReferenceError(
      f"{', '.join(missing)}: no comment where the key is defined; write its meaning there "
      f"(above the line that sets it, or at its end)"
    )
  lines = [
    "# Config reference",
    "",
    "Every setting of `jaxtune/train/config.py`'s `default_config()`, with its default and what it does. A config",
    "file changes some of them (`config.optim.lr = 1e-4`), and so does the command line",
    "(`--config.optim.lr=1e-4`); `jaxtune train --config NAME --print_config` prints a config resolved.",
    "",
    "This page is generated from the comments beside each key's definition:",
    "`python -m jaxtune.train.config_reference --write` rewrites it, and a test fails when it is out of date.",
    "",
  ]
  sections: dict[str, list[str]] = {}
  for key, value in keys.items():
    section = key.split(".")[0] if "." in key else "(top level)"
    sections.setdefault(section, []).append(f"- `{key}` = {_default(value)}: {found[key]}")
  for section in sorted(sections, key=lambda s: (s != "(top level)", s)):
    lines += [f"## {section}", "", *sections[section], ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  text = markdown()
  if "--write" in argv:
    DOC.write_text(text)
    print(f"wrote {DOC}")
  else:
    print(text, end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
