"""Look at a dataset the way training will: statistics, examples with trained tokens marked, a dump.

  jaxtune data --config quickstart --show 3
  jaxtune data --config configs/my_run.py --config.data.train=my.jsonl --split validation --dump /tmp/examples.jsonl

(also `python -m jaxtune.data ...`). The config is a training config (its model.path's tokenizer is
used) or a data-only one with `tokenizer` and `data` (configs/data_example.py). Trained tokens are
shown in green on a terminal and between [[ ]] otherwise; a preference pair shows its chosen and rejected
sequences, a KTO example its completion and KL sequence. The dump holds one JSON object per example
after templating and truncation, before packing: location, input_ids and the 0/1 loss_mask, and for a
two-sequence example parts (the first sequence's length) and, for KTO, label.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from jaxtune import cli


def describe(config, *, split: str, show: int, tokens: bool, dump: str | None, out: TextIO) -> None:
  """Prints statistics and `show` examples of `split`; writes the dump when asked."""
  # Imported here, not at the top, so that --help answers at once.
  from jaxtune.data import loader, pipeline
  from jaxtune.hf.load import load_tokenizer

  tokenizer = load_tokenizer(tokenizer_path(config))
  data = pipeline.load_split(config.data, tokenizer, split)
  batches = loader.loader_for(data, config.data)
  print(batches.stats.summary(), file=out)
  batches.close()
  examples = pipeline.Examples.concat(data.examples)
  color = out.isatty()
  names = SEQUENCE_NAMES.get(data.kind, ("",))
  for i in range(min(show, len(examples))):
    ids, mask = examples[i]
    cut = int(examples.parts[i]) or len(ids)
    label = {1: " (desirable)", 0: " (undesirable)"}.get(int(examples.labels[i]), "")
    print(f"\n--- {examples.locations[i]}{label}: {len(ids)} tokens, {int(mask.sum())} trained", file=out)
    for name, (a, b) in zip(names, ((0, cut), (cut, len(ids)))):
      if name:
        print(f"{name}: {b - a} tokens, {int(mask[a:b].sum())} trained", file=out)
      print(render(ids[a:b], mask[a:b], tokenizer, color=color), file=out)
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
        if examples.parts[i]:
          record["parts"] = int(examples.parts[i])
        if examples.labels[i] >= 0:
          record["label"] = bool(examples.labels[i])
        f.write(json.dumps(record) + "\n")
    print(f"\nwrote {len(examples):,} examples to {dump}", file=out)


# The two sequences of an example of each kind, as shown.
SEQUENCE_NAMES = {"pairs": ("chosen", "rejected"), "kto": ("completion", "KL sequence")}


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


def tokenizer_path(config) -> str:
  """The tokenizer a training config's model.path has, or a data-only config's `tokenizer`; built-ins built once."""
  from jaxtune.errors import ConfigError
  from jaxtune.train import builtin_models

  if "model" in config:
    key, path, cache = "model.path", config.model.path, config.model.cache_dir
  else:
    key, path, cache = "tokenizer", config.tokenizer, builtin_models.DEFAULT_CACHE
  if not path:
    raise ConfigError(
      f"{key}: empty; set a checkpoint directory, a hub id or one of {', '.join(builtin_models.BUILTIN_MODELS)}"
    )
  return builtin_models.resolve(path, cache)


def parser() -> argparse.ArgumentParser:
  p = cli.parser(
    "jaxtune data", __doc__.split("\n\n", 1)[1], config="a training or data-only config, or a shipped name"
  )
  p.add_argument("--split", choices=("train", "validation", "test"), default="train", help="which split")
  p.add_argument("--show", type=int, default=0, help="how many examples to print with trained tokens marked")
  p.add_argument("--tokens", action="store_true", help="with --show, also one line per token: id, trained, text")
  p.add_argument("--dump", help="write every example of the split to this JSONL file")
  return p


@cli.guard
def main(argv: list[str]) -> int:
  config, args = cli.parse_with_config(parser(), argv)
  describe(config, split=args.split, show=args.show, tokens=args.tokens, dump=args.dump, out=sys.stdout)
  return 0


if __name__ == "__main__":  # Worker processes re-import this module; only the parent runs.
  sys.exit(main())
