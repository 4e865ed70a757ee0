"""The quickstart task: turn a sentence about a meeting into {"person", "day", "time"} JSON.

    python -m jaxtune.tasks.meeting_json [--out DIR]

writes train.jsonl, validation.jsonl and test.jsonl (chat records, {"messages": [...]}) from
synthetic sentences: 16 names x 7 days x 8 times x 8 activities x 6 phrasings. Times are
written as people say them ("2:30pm") and answered in 24-hour form ("14:30"), so the task
needs both the output format and a little arithmetic; no sentence of one split occurs in another.
The base SmolLM2-135M-Instruct almost never answers in exactly this shape; a short LoRA does.
The splits the quickstart trains on ship inside the package, in `DATA`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
from collections.abc import Sequence

DATA = pathlib.Path(__file__).resolve().parent / "data" / "meeting_json"  # write()'s output, shipped
SYSTEM = 'Extract the meeting as JSON with keys "person", "day" and "time" (24-hour HH:MM).'
NAMES = (
  "Alice",
  "Bruno",
  "Carla",
  "Deepak",
  "Elena",
  "Farid",
  "Grace",
  "Hiro",
  "Ines",
  "Jonas",
  "Kofi",
  "Lena",
  "Mateo",
  "Nora",
  "Omar",
  "Priya",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# As written in the sentence -> as expected in the answer.
TIMES = {
  "9am": "09:00",
  "9:30am": "09:30",
  "10am": "10:00",
  "11:15am": "11:15",
  "1pm": "13:00",
  "2:30pm": "14:30",
  "3:45pm": "15:45",
  "5pm": "17:00",
}
ACTIVITIES = (
  "review the budget",
  "discuss the roadmap",
  "plan the launch",
  "go over the contract",
  "talk about hiring",
  "sync on the design",
  "prepare the demo",
  "check the sales numbers",
)
PHRASINGS = (
  "{person} wants to meet on {day} at {time} to {activity}.",
  "Can we {activity} with {person} on {day} at {time}?",
  "On {day} at {time}, {person} and I will {activity}.",
  "Reminder: {activity} with {person}, {day} {time}.",
  "Let's set up a call with {person} at {time} on {day} to {activity}.",
  "{person} asked to {activity} at {time} this {day}.",
)


def answer(person: str, day: str, time: str) -> str:
  """The one accepted answer string (keys in this order, json.dumps spacing)."""
  return json.dumps({"person": person, "day": day, "time": time})


_HH_MM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def time_reward(prompts, completions, reference=(), **_) -> list[float]:
  """GRPO's partial credit for the time field (configs/grpo_quickstart.py): of a completion whose JSON object
  has a "time" written as HH:MM, 0.5 for the right hour and 0.5 for the right minutes; 0 otherwise.

  The exact-field reward (json_fields) scores "02:30" for 14:30 as it scores a missing time; this one tells the
  two apart, so sampled answers with the right minutes or the right hour are preferred to the rest.
  A `module:function` reward: called with the prompts, the completions and the records' fields."""
  del prompts
  out = []
  for completion, ref in zip(completions, reference):
    try:
      got, want = json.loads(completion.strip()), json.loads(ref)
    except (json.JSONDecodeError, TypeError):
      out.append(0.0)
      continue
    match = (
      _HH_MM.fullmatch(got.get("time", "")) if isinstance(got, dict) and isinstance(got.get("time"), str) else None
    )
    if match is None:
      out.append(0.0)
      continue
    hour, minute = want["time"].split(":")
    out.append(0.5 * (match.group(1) == hour) + 0.5 * (match.group(2) == minute))
  return out


def make_examples(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
  """`n` distinct chat records; sentences in `exclude` are skipped (and the new ones added to it)."""
  rng = random.Random(seed)
  exclude = set() if exclude is None else exclude
  records = []
  while len(records) < n:
    person, day, spoken = rng.choice(NAMES), rng.choice(DAYS), rng.choice(sorted(TIMES))
    sentence = rng.choice(PHRASINGS).format(person=person, day=day, time=spoken, activity=rng.choice(ACTIVITIES))
    sentence = sentence[0].upper() + sentence[1:]
    if sentence in exclude:
      continue
    exclude.add(sentence)
    records.append(
      {
        "messages": [
          {"role": "system", "content": SYSTEM},
          {"role": "user", "content": sentence},
          {"role": "assistant", "content": answer(person, day, TIMES[spoken])},
        ]
      }
    )
  return records


def write(out: str | pathlib.Path, sizes: Sequence[int] = (800, 64, 50), seed: int = 0) -> dict[str, pathlib.Path]:
  """Writes the train, validation and test splits as JSONL under `out`; returns their paths."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  seen: set[str] = set()
  paths = {}
  for i, (split, n) in enumerate(zip(("train", "validation", "test"), sizes)):
    paths[split] = out / f"{split}.jsonl"
    lines = [json.dumps(r) for r in make_examples(n, seed + i, seen)]
    paths[split].write_text("\n".join(lines) + "\n")
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m jaxtune.tasks.meeting_json", description=__doc__.splitlines()[0])
  p.add_argument("--out", default="meeting_json", help="output directory")
  p.add_argument("--sizes", type=int, nargs=3, default=(800, 64, 50), metavar=("TRAIN", "VALIDATION", "TEST"))
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for split, path in write(args.out, args.sizes, args.seed).items():
    print(f"{split}: {path}")


if __name__ == "__main__":
  main()
