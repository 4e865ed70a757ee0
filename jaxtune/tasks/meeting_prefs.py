"""The preference demo's data: meeting JSON answered compactly (chosen) rather than spaced (rejected).

    python -m jaxtune.tasks.meeting_prefs [--out DIR]

The quickstart teaches SmolLM2 to answer {"person": ..., "day": ..., "time": ...} with
json.dumps' spacing. These pairs prefer the same object written without spaces
('{"person":"Mateo","day":"Sunday","time":"09:30"}'), so a DPO stage on top of the quickstart's
adapter has one measurable behaviour to move: the share of held-out answers in the compact form
(exact match against it), while the object stays right (JSON equality). Sentences are new: none
occurs in the quickstart's splits. Writes train.jsonl and validation.jsonl (TRL's conversational
prompt / chosen / rejected records) and test.jsonl (chat records whose answer is the compact form).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

from jaxtune.tasks import meeting_json

DATA = pathlib.Path(__file__).resolve().parent / "data" / "meeting_prefs"  # write()'s output, shipped


def compact(answer: str) -> str:
  """The preferred form of an answer: the same JSON without spaces."""
  return json.dumps(json.loads(answer), separators=(",", ":"))


def pair(record: dict) -> dict:
  """A chat record of the quickstart's form -> {prompt, chosen, rejected} (compact over spaced)."""
  *prompt, answer = record["messages"]
  return {
    "prompt": prompt,
    "chosen": [{"role": "assistant", "content": compact(answer["content"])}],
    "rejected": [{"role": "assistant", "content": answer["content"]}],
  }


def write(out: str | pathlib.Path, sizes: Sequence[int] = (256, 32, 50), seed: int = 100) -> dict[str, pathlib.Path]:
  """Writes train and validation pairs and the compact-answer test split under `out`; returns their paths."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  seen = {
    json.loads(line)["messages"][1]["content"]
    for path in meeting_json.DATA.glob("*.jsonl")
    for line in path.read_text().splitlines()
  }
  paths = {}
  for i, (split, n) in enumerate(zip(("train", "validation", "test"), sizes)):
    records = meeting_json.make_examples(n, seed + i, seen)
    if split == "test":
      for r in records:
        r["messages"][-1]["content"] = compact(r["messages"][-1]["content"])
    else:
      records = [pair(r) for r in records]
    paths[split] = out / f"{split}.jsonl"
    paths[split].write_text("".join(json.dumps(r) + "\n" for r in records))
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m jaxtune.tasks.meeting_prefs", description=__doc__.splitlines()[0])
  p.add_argument("--out", default="meeting_prefs", help="output directory")
  p.add_argument("--sizes", type=int, nargs=3, default=(256, 32, 50), metavar=("TRAIN", "VALIDATION", "TEST"))
  p.add_argument("--seed", type=int, default=100)
  args = p.parse_args(argv)
  for split, path in write(args.out, args.sizes, args.seed).items():
    print(f"{split}: {path}")


if __name__ == "__main__":
  main()
