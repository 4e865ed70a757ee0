"""jaxtune sweep --config NAME_OR_FILE --sweep SWEEP_FILE [--out DIR] [--config.KEY=VALUE ...]

(also `python -m jaxtune.sweep ...`). Searches the config keys the sweep file names (grid, random or
Bayesian with Optuna's TPE), each trial a `jaxtune train` process with its own run directory
DIR/trial_N; the pruner (median or successive halving) stops a trial whose evaluations fall behind.
The study lives in DIR/study.db: run the same command again to resume a killed sweep (finished
trials are not rerun). Writes DIR/results.csv and results.md (sorted by the objective), DIR/best_config.py
(runnable) and DIR/history.png, importance.png. --config.KEY=VALUE settings apply to every trial.
"""

from __future__ import annotations

import pathlib
import signal
import sys

from jaxtune import cli


def parser():
  p = cli.parser("jaxtune sweep", __doc__.split("\n\n", 1)[1], config="the training config every trial starts from")
  p.add_argument("--sweep", required=True, help="a sweep file defining get_sweep() (configs/sweeps/)")
  p.add_argument("--out", help="the sweep directory (default: the config's output_dir + '_sweep')")
  return p


@cli.guard
def main(argv: list[str]) -> int:
  from jaxtune import configs
  from jaxtune.sweep import run, space

  spec, overrides, rest = configs.split_argv(argv)
  p = parser()
  args = p.parse_args(rest)
  if spec is None:
    p.error("--config is required: a config file or a shipped config (" + ", ".join(configs.shipped()) + ")")
  config = configs.load(spec, overrides)  # the user's overrides are checked once, here
  sweep = space.load(args.sweep, config)
  out = pathlib.Path(args.out or (config.output_dir.rstrip("/") + "_sweep")).expanduser().absolute()
  settings = run.Settings(run.absolute_spec(spec), run.trial_overrides(overrides), sweep, out)
  # SIGTERM as Ctrl-C: the running trial is stopped (it saves) before the sweep exits; rerun to resume.
  signal.signal(signal.SIGTERM, signal.default_int_handler)
  run.sweep(settings)
  return 0


if __name__ == "__main__":
  sys.exit(main())
