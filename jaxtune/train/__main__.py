"""jaxtune train --config NAME_OR_FILE | --axolotl PATH.yml [--config.KEY=VALUE ...] [--print_config] [--debug]

(also `python -m jaxtune.train ...`). `--config` names a config file (configs/NAME.py) or a config
shipped in the package (`quickstart`, `tiny`, ...); `--config.KEY=VALUE` overrides any setting, and a
key that does not exist fails at once, naming the nearest one (jaxtune/configs). The run directory
is config.output_dir; the resolved config is printed at the start and saved there as config.json.

`--axolotl PATH.yml` runs an Axolotl config instead, translated key by key (docs/axolotl.md); keys it
leaves out take Axolotl's defaults, keys we do not support are listed in one warning (an error under
`--strict`), and `--config.KEY=VALUE` overrides apply on top of the translation.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxtune import cli, configs
from jaxtune.errors import ConfigError
from jaxtune.train import host


def parser() -> argparse.ArgumentParser:
  shipped = ", ".join(configs.shipped())
  p = cli.parser("jaxtune train", __doc__.split("\n\n", 1)[1], config=f"a config file or a shipped config: {shipped}")
  p.add_argument("--axolotl", metavar="PATH.yml", help="an Axolotl YAML config, translated (instead of --config)")
  p.add_argument("--strict", action="store_true", help="with --axolotl: a key we do not support is an error")
  p.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
  p.add_argument("--verbose", action="store_true", help="log at INFO (Orbax narrates every save)")
  return p


@cli.guard
def main(argv: list[str]) -> int:
  p = parser()
  spec, overrides, rest = configs.split_argv(argv)
  args = p.parse_args(rest)
  if args.axolotl and spec is not None:
    raise ConfigError("--axolotl and --config are exclusive: give one of them")
  if args.strict and not args.axolotl:
    raise ConfigError("--strict applies to --axolotl configs only")
  if not args.axolotl:
    config, args = cli.parse_with_config(p, argv)

  from absl import logging

  logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
  from jaxtune.parallel import distributed

  # Before any other JAX call: joins the other hosts of a TPU pod / cluster (a no-op on one machine).
  logging.info("distributed: %s", distributed.initialize(distributed.DistributedSpec.from_env(os.environ)))
  import jax

  if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR unset: rerun configs start faster
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxtune/xla"))
  from jaxtune.train import loop

  if args.axolotl:
    from jaxtune.train import axolotl

    # Axolotl's micro_batch_size is per device: every device of the data-parallel mesh takes one.
    config = axolotl.load(args.axolotl, overrides, strict=args.strict, devices=jax.device_count())
  if args.print_config:
    configs.dump(loop.prepare(config).config)
    return 0
  loop.train(config)
  return 0


if __name__ == "__main__":
  host.reexec_with_huge_pages("jaxtune.train")  # CPU runs: huge pages for XLA's per-step buffers (host.py)
  sys.exit(main())
