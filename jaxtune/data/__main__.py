"""Look at a dataset the way training will: statistics, examples with trained tokens marked, a dump.

  python -m jaxtune.data --config configs/data_example.py --show 3
  python -m jaxtune.data --config configs/data_example.py --config.data.train=my.jsonl \
      --split validation --dump /tmp/examples.jsonl

The config file needs `tokenizer` (a directory, or a hub id in the local cache) and `data`.
Trained tokens are shown in green on a terminal and between [[ ]] otherwise. The dump holds one
JSON object per example after templating and truncation, before packing: location, input_ids
and the 0/1 loss_mask.
"""

import json
import sys
from typing import TextIO

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with `tokenizer` and `data`.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "validation", "test"], "Which split.")
_SHOW = flags.DEFINE_integer("show", 0, "How many examples to print with trained tokens marked.")
_TOKENS = flags.DEFINE_bool("tokens", False, "With --show, also one line per token: id, trained, text.")
_DUMP = flags.DEFINE_string("dump", None, "Write every example of the split to this JSONL file.")


def describe(config, *, split: str, show: int, tokens: bool, dump: str | None, out: TextIO) -> None:
  """Prints statistics and `show` examples of `split`; writes the dump when asked."""
  # Imported here, not at the top, so that --help answers at once.
  from jaxtune.data import loader, pipeline
  from jaxtune.hf.load import load_tokenizer

  tokenizer = load_tokenizer(config.tokenizer)
  data = pipeline.load_split(config.data, tokenizer, split)
  batches = loader.loader_for(data, config.data)
  print(batches.stats.summary(), file=out)
  batches.close()
  examples = pipeline.Examples.concat(data.examples)
  color = out.isatty()
  for i in range(min(show, len(examples))):
    ids, mask = examples[i]
    print(f"\n--- {examples.locations[i]}: {len(ids)} tokens, {int(mask.sum())} trained", file=out)
    print(render(ids, mask, tokenizer, color=color), file=out)
    if tokens:
      print(f"{'pos':>6} {'id':>8} trained text", file=out)
      for t, (token, target) in enumerate(zip(ids.tolist(), mask.tolist())):
        piece = tokenizer.decode([token], skip_special_tokens=False)
        print(f"{t:6d} {token:8d} {'yes' if target else '':7} {piece!r}", file=out)
  if dump:
    with open(dump, "w") as f:
      for i in range(len(examples)):
        ids, mask = examples[i]
        record = {"location": examples.locations[i], "input_ids": ids.tolist(), "loss_mask": mask.tolist()}
        f.write(json.dumps(record) + "\n")
    print(f"\nwrote {len(examples):,} examples to {dump}", file=out)


def render(ids, mask, tokenizer, *, color: bool) -> str:
  """The example's text, each run of trained tokens in green (color) or between [[ ]]."""
  parts, start = [], 0
  for end in range(1, len(ids) + 1):
    if end == len(ids) or mask[end] != mask[start]:
      text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False)
      if mask[start]:
        text = f"\x1b[32m{text}\x1b[0m" if color else f"[[{text}]]"
      parts.append(text)
      start = end
  return "".join(parts)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  describe(
    _CONFIG.value,
    split=_SPLIT.value,
    show=_SHOW.value,
    tokens=_TOKENS.value,
    dump=_DUMP.value,
    out=sys.stdout,
  )


if __name__ == "__main__":  # Worker processes re-import this module; only the parent runs.
  flags.mark_flag_as_required("config")
  app.run(main)
