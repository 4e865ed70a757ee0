"""python -m jaxtune.train --config configs/NAME.py [--config.a.b=value ...]

The config file's `get_config()` gives the settings; `--config.KEY=VALUE` overrides any of
them; an unknown key fails at once. The run directory is config.output_dir.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxtune.train import host

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides look like --config.train.steps=100.")
  if not flags.FLAGS["verbosity"].present:  # Orbax narrates every save at INFO; -v 0 brings it back
    logging.set_verbosity(logging.WARNING)
  from jaxtune.parallel import distributed

  # Before any other JAX call: joins the other hosts of a TPU pod / cluster (a no-op on one machine).
  logging.info("distributed: %s", distributed.initialize(distributed.DistributedSpec.from_env(os.environ)))
  import jax

  if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR unset: rerun configs start faster
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxtune/xla"))
  from jaxtune.train.checkpoint import CheckpointMismatchError
  from jaxtune.train.config import ConfigError
  from jaxtune.train.loop import train

  try:
    train(_CONFIG.value)
  except (ConfigError, CheckpointMismatchError) as e:  # the user's to fix: the message, not a traceback
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  host.reexec_with_huge_pages("jaxtune.train")  # CPU runs: huge pages for XLA's per-step buffers (host.py)
  flags.mark_flag_as_required("config")
  app.run(main)
