"""Command line: merge models as a mergekit recipe says, into an HF checkpoint directory.

    jaxtune merge --config merge.yml --out DIR [--overwrite] [--seed N]
    jaxtune merge --method ties --base BASE --out DIR \\
        --model A --weight 0.5 --density 0.5 --model B --weight 0.5 --density 0.5

The recipe is mergekit's YAML (merge_method, base_model, models, parameters, dtype,
tokenizer_source); the flags build the same recipe: one --weight and --density per --model, in
order, and --set KEY=VALUE for a setting of the whole merge (t, lambda, normalize, rescale).
Model paths in a YAML file are relative to the file's directory. Methods: linear, slerp,
task_arithmetic, ties, dare_linear, dare_ties (docs/merging.md).
"""

from __future__ import annotations

import pathlib
import sys
import time

import yaml

from jaxtune import cli
from jaxtune.export.__main__ import byte_size
from jaxtune.merge import config as config_lib


def parse_args(argv: list[str]):
  p = cli.parser("jaxtune merge", __doc__)
  p.add_argument("--config", type=pathlib.Path, help="a mergekit-style YAML recipe")
  p.add_argument("--method", choices=list(config_lib.METHODS), help="without --config: the merge method")
  p.add_argument("--base", help="without --config: the base model")
  p.add_argument("--model", action="append", default=[], help="without --config: a model to merge (repeat)")
  p.add_argument("--weight", action="append", type=float, default=[], help="the weight of each --model, in order")
  p.add_argument("--density", action="append", type=float, default=[], help="the density of each --model, in order")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of the whole merge")
  p.add_argument("--dtype", help="output dtype (bfloat16, float16, float32); default the base's")
  p.add_argument("--tokenizer-source", help="the model whose tokenizer and chat template are kept (default the base)")
  p.add_argument("--out", type=pathlib.Path, required=True, help="output directory")
  p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
  p.add_argument("--max-shard-size", type=byte_size, default="5GB", help="shard size limit, e.g. 5GB, 500MB")
  p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
  args = p.parse_args(argv)
  flags = args.method or args.base or args.model or args.weight or args.density or args.set
  if args.config and flags:
    p.error("give --config or the recipe flags (--method, --base, --model, ...), not both")
  if not args.config and not args.method:
    p.error("give --config FILE or --method with --model")
  for name in ("weight", "density"):
    if getattr(args, name) and len(getattr(args, name)) != len(args.model):
      p.error(f"give one --{name} per --model ({len(args.model)} models, {len(getattr(args, name))} values)")
  return args


def recipe(args) -> dict:
  """The recipe the flags describe, as the dict its YAML would load as."""
  models = []
  for i, path in enumerate(args.model):
    params = {k: getattr(args, k)[i] for k in ("weight", "density") if getattr(args, k)}
    models.append({"model": path, **({"parameters": params} if params else {})})
  parameters = {}
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      raise config_lib.MergeConfigError(f"--set {item}: expected KEY=VALUE.")
    parameters[key.strip()] = yaml.safe_load(value)
  raw = {"merge_method": args.method, "models": models}
  raw.update({k: v for k, v in (("base_model", args.base), ("parameters", parameters)) if v})
  return raw


@cli.guard
def main(argv: list[str]) -> int:
  args = parse_args(argv)
  from jaxtune.merge import run  # after parsing: --help stays fast

  if args.config:
    cfg, root = config_lib.load(args.config), args.config.expanduser().parent
  else:
    cfg, root = config_lib.parse(recipe(args), "flags"), pathlib.Path(".")
  overrides = {k: v for k, v in (("dtype", args.dtype), ("tokenizer_source", args.tokenizer_source)) if v}
  if overrides:
    cfg = config_lib.with_overrides(cfg, **overrides)
  start = time.perf_counter()
  out = run.merge(
    cfg, args.out, root=root, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size, seed=args.seed
  )
  print(f"wrote {out} ({cfg.method.name} of {len(cfg.models)} models) in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
