"""Before/after on CPU: jaxtune's train step at an old commit against the working tree (or another commit).

    python -m bench.compare_commits --before HEAD~1        # HEAD~1 against the working tree, 4 settings
    python -m bench.compare_commits --before v1 --after main --settings lora:float32,full:bfloat16
    python -m bench.compare_commits --before HEAD~1 --remat full --seq 512   # unknown flags go to both workers
    python -m bench.compare_commits --before HEAD --smoke --rounds 1 --steps 1  # tiny shape: seconds

A code change's speed effect, measured side by side on the same machine. A REF (hash, branch,
tag) is checked out with `git worktree add --detach` in a temporary directory, removed at the end
(also on error); `--after` defaults to the working tree this script lives in, uncommitted changes
included. For every setting in turn (`--settings`, setting:dtype), each side runs its own
`python -m bench.train_cpu --worker jaxtune` with its tree's root as the working directory, so
it imports that tree's own `jaxtune` and `bench` (checked before it starts). The two are built and
warmed one at a time, then asked in turn for `--settle` unmeasured and `--steps` measured steps,
`--rounds` times, alternating which goes first; the machine's float32 product rate is measured
before every turn (`bench.train_cpu.machine_rate`: it drifts by ~10%). Only two workers are alive
at a time. Per setting it reports the median step time of each side, `after/before` = after's
speed / before's speed (> 1: the new code is faster), the target `after/before >= 0.97`, each
side's peak RSS and the turns' machine rates; at the top the CPU model, both commits and this
command. Each worker also dumps its train step's optimised HLO, and the report says whether the
two commits compile the same program (instructions compared without source metadata): where they
do, a ratio away from 1 is the machine's noise, not the change. At least 5 measured steps per side
(rounds x steps) unless `--smoke`. Exit status 0 whatever the ratios: a measurement, not a gate.

Flags this script does not know (--remat, --loss-chunk, --seq, --batch, --warmup, ...) go
unchanged to both workers; flags not given take each commit's own default, as that commit ships.
`--smoke` adds `--smoke --warmup 1 --batch 2 --seq 32` before them (the tiny model of
`bench.train_cpu --smoke`). float32 is the workers' default dtype and is not passed, so commits
from before `--dtype` existed still run float32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

from bench.train_cpu import _ask, cpu_model, machine_rate
from jaxtune.train import host

SETTINGS = ("lora", "full")
DTYPES = ("float32", "bfloat16")
DEFAULT_SETTINGS = "lora:float32,full:float32,lora:bfloat16,full:bfloat16"
TARGET = 0.97  # after/before speed at or above which a change counts as not slower
MIN_STEPS = 5  # measured steps per side, outside --smoke
SIDES = ("before", "after")
SMOKE_WORKER_ARGS = ["--smoke", "--warmup", "1", "--batch", "2", "--seq", "32"]
# Worker flags refused in the pass-through: set per setting here (--settings), or meaningless for two workers.
RESERVED = {
  "--worker": "--settings",
  "--setting": "--settings",
  "--dtype": "--settings",
  "--sides": None,
  "--profile": None,
}
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the root of the tree this script is in


def parse_settings(text: str) -> list[tuple[str, str]]:
  """[(setting, dtype)] from "lora:float32,full:bfloat16"; a bare setting means float32."""
  out = []
  for item in (i.strip() for i in text.split(",")):
    setting, _, dtype = item.partition(":")
    dtype = dtype or "float32"
    if setting not in SETTINGS or dtype not in DTYPES:
      raise ValueError(
        f"--settings: {item!r} is not setting:dtype with setting in {'/'.join(SETTINGS)} and dtype "
        f"in {'/'.join(DTYPES)}; write e.g. {DEFAULT_SETTINGS}"
      )
    out.append((setting, dtype))
  if not out or len(set(out)) != len(out):
    raise ValueError(f"--settings: {text!r} names a setting twice; give each setting:dtype once")
  return out


def summarize(before: Sequence[float], after: Sequence[float], target: float = TARGET) -> dict:
  """Median step seconds of each side, after/before speed ratio (> 1: after is faster), and whether it meets target."""
  if not before or not after or min(*before, *after) <= 0:
    raise ValueError(f"step times must be positive and present on both sides, got before={before} after={after}")
  before_s, after_s = statistics.median(before), statistics.median(after)
  ratio = before_s / after_s  # speeds are 1 / step time
  return {"before_s": before_s, "after_s": after_s, "ratio": ratio, "meets_target": ratio >= target, "target": target}


# ------------------------------------------------------------------------------------------------------ git
def _git(root: str, *args: str) -> str:
  done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"`git -C {root} {' '.join(args)}` failed: {done.stderr.strip()}")
  return done.stdout.strip()


def resolve(root: str, ref: str, flag: str) -> str:
  """The full hash of commit `ref` in the repository at root."""
  try:
    return _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
  except RuntimeError:
    raise ValueError(
      f"{flag} {ref!r} is not a commit in {root}: give a hash, branch or tag (`git log --oneline` lists them)"
    ) from None


def describe(root: str, commit: str = "HEAD") -> str:
  """`short-hash subject` of a commit."""
  return _git(root, "log", "-1", "--format=%h %s", commit)


@contextlib.contextmanager
def worktree(repo: str, commit: str) -> Iterator[str]:
  """A detached checkout of `commit` in a temporary directory, removed on exit (also on error)."""
  tmp = tempfile.mkdtemp(prefix="jaxtune-compare-")
  path = os.path.join(tmp, commit[:12])
  try:
    _git(repo, "worktree", "add", "--detach", path, commit)
    yield path
  finally:
    if os.path.isdir(path):
      with contextlib.suppress(RuntimeError):
        _git(repo, "worktree", "remove", "--force", path)
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(RuntimeError):
      _git(repo, "worktree", "prune")


def imports_from(root: str) -> dict[str, str]:
  """Where `python -m` run in root finds jaxtune and bench; ValueError unless both are root's own."""
  code = "import importlib.util as u; print(u.find_spec('jaxtune').origin); print(u.find_spec('bench').origin)"
  done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
  found = dict(zip(("jaxtune", "bench"), done.stdout.split()))
  for name in ("jaxtune", "bench"):
    if not os.path.realpath(found.get(name, "/")).startswith(os.path.join(os.path.realpath(root), "")):
      raise ValueError(
        f"a worker started in {root} would import {name} from {found.get(name) or done.stderr!r}, "
        "not from that tree; unset PYTHONPATH or anything else that puts another tree first"
      )
  return found


# --------------------------------------------------------------------------------------------------- workers
def worker_environ(hugepages: str, xla_flags: str) -> dict[str, str]:
  """The environment of both workers: CPU only, glibc huge pages as `python -m jaxtune.train` runs (hugepages=cli)."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  if xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  if hugepages == "cli":
    env = host.huge_page_environ(env, glibc=host.glibc_version(), thp=host.thp_mode()) or env
  return env


def start_worker(
  root: str, setting: str, dtype: str, worker_args: Sequence[str], env: dict[str, str], dump_dir: str | None = None
) -> subprocess.Popen:
  """`python -m bench.train_cpu --worker jaxtune` with cwd = root, so it imports root's jaxtune and bench.

  dump_dir: where XLA writes the train step's optimised HLO (`same_program` compares two of them)."""
  cmd = [sys.executable, "-m", "bench.train_cpu", "--worker", "jaxtune", "--setting", setting]
  cmd += ["--dtype", dtype] if dtype != "float32" else []
  cmd += list(worker_args)
  if dump_dir:
    dump = f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step"
    env = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " " + dump).strip())
  return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env)


_METADATA = re.compile(r",? ?metadata=\{[^}]*\}|,? ?stack_frame_id=\d+")


def program_lines(dump_dir: str) -> list[str] | None:
  """The instructions of the train step's optimised HLO in dump_dir, without source metadata; None if absent.

  Two commits whose lines are equal run the same program: any difference in their step times is the
  machine's, not the code's.
  """
  dumps = sorted(pathlib.Path(dump_dir).glob("*jit_step*after_optimizations.txt"), key=lambda f: f.stat().st_size)
  if not dumps:
    return None
  text = _METADATA.sub("", dumps[-1].read_text())
  keep = re.compile(r"^\s+(ROOT )?%|^ENTRY|^%?[\w.\-]+ .*\{$")
  return [line for line in text.splitlines() if keep.match(line)]


def same_program(before_dir: str, after_dir: str) -> dict:
  """{"identical": bool | None, "lines": [before, after], "differing": count} for the two sides' dumps."""
  before, after = program_lines(before_dir), program_lines(after_dir)
  if before is None or after is None:
    return {"identical": None, "lines": [len(before or []), len(after or [])], "differing": None}
  differing = sum(1 for a, b in zip(before, after) if a != b) + abs(len(before) - len(after))
  return {"identical": differing == 0, "lines": [len(before), len(after)], "differing": differing}


def measure(
  trees: dict[str, dict], setting: str, dtype: str, args, worker_args: Sequence[str], env: dict[str, str]
) -> dict:
  """Both sides of one setting: built one at a time, then `args.rounds` rounds of alternating turns."""
  procs, info = {}, {}
  times = {s: [] for s in SIDES}
  turns = []
  name = f"{setting}:{dtype}"
  dumps = {s: tempfile.mkdtemp(prefix=f"jaxtune-hlo-{s}-") for s in SIDES}

  def ask(side: str, line: str | None = None) -> dict:
    try:
      return _ask(procs[side], line)
    except RuntimeError as e:
      raise RuntimeError(
        f"{name}, {side} side ({trees[side]['commit']}): {e} If that commit's bench/train_cpu.py "
        f"lacks one of the flags {list(worker_args)}, leave it out."
      ) from None

  try:
    for side in SIDES:  # built and warmed one at a time: never two compiles at once
      procs[side] = start_worker(trees[side]["root"], setting, dtype, worker_args, env, dumps[side])
      info[side] = ask(side)
      print(
        f"{name} {side}: built in {info[side]['build_s']:.1f} s, first step {info[side]['first_step_s']:.1f} s, "
        f"{info[side]['trainable']:,} trainable, loss {info[side]['loss']:.4f}",
        flush=True,
      )
    for r in range(args.rounds):
      for side in SIDES if r % 2 == 0 else SIDES[::-1]:
        rate = machine_rate()
        got = ask(side, f"run {args.steps} {args.settle}")
        times[side] += got["times"]
        turns.append(
          {
            "round": r + 1,
            "side": side,
            "machine_gflops": rate,
            "times": got["times"],
            "settle_times": got.get("settle_times", []),
          }
        )
        unmeasured = "".join(f" ({t:.3f})" for t in got.get("settle_times", []))
        print(
          f"{name} round {r + 1} {side:6} [machine {rate:.0f} GFLOP/s]:{unmeasured} "
          + " ".join(f"{t:.3f}" for t in got["times"])
          + " s/step",
          flush=True,
        )
    for side in SIDES:
      info[side].update(ask(side, "quit"))
      procs[side].wait()
    program = same_program(dumps["before"], dumps["after"])
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    for d in dumps.values():
      shutil.rmtree(d, ignore_errors=True)
  rates = [t["machine_gflops"] for t in turns]
  row = {
    "setting": setting,
    "dtype": dtype,
    "turns": turns,
    "machine_gflops": rates,
    "sides": {s: dict(info[s], step_s=statistics.median(times[s]), times=times[s]) for s in SIDES},
    "same_program": program,
  }
  row.update(summarize(times["before"], times["after"]))
  return row


def report_row(row: dict) -> str:
  """One setting's lines: medians, the after/before ratio against the target, peak RSS, machine rates."""
  b, a = row["sides"]["before"], row["sides"]["after"]
  rates = row["machine_gflops"]
  name = f"{row['setting']}:{row['dtype']}"
  # The ratio rounded down, so that a printed 0.970 always reads `>= 0.97: yes`.
  lines = [
    (
      f"{name:14} before {row['before_s']:.4f} s/step, after {row['after_s']:.4f} s/step (medians of "
      f"{len(b['times'])} and {len(a['times'])} steps): "
      f"after/before {math.floor(row['ratio'] * 1000) / 1000:.3f}x; "
      f"after/before >= {row['target']}: {'yes' if row['meets_target'] else 'no'}"
    ),
    (
      f"{'':14} peak RSS before {b['peak_rss_gb']:.2f} GB, after {a['peak_rss_gb']:.2f} GB; machine "
      f"{min(rates):.0f}-{max(rates):.0f} GFLOP/s over the turns ({max(rates) / min(rates) - 1:.0%} apart): "
      + " ".join(f"{r:.0f}" for r in rates)
    ),
  ]
  program = row.get("same_program") or {}
  if program.get("identical") is not None:
    lines.append(
      f"{'':14} optimised step HLO: "
      + (
        f"identical ({program['lines'][0]} instructions): the two commits run the same program"
        if program["identical"]
        else f"differs ({program['differing']} of {program['lines'][0]} / {program['lines'][1]} instruction lines)"
      )
    )
  if b["trainable"] != a["trainable"]:
    lines.append(f"{'':14} trainable parameters differ: before {b['trainable']:,}, after {a['trainable']:,}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the comparison; returns (and with --json writes) the results. See the module docstring."""
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
  )
  p.add_argument("--before", required=True, help="the old commit (hash, branch, tag)")
  p.add_argument(
    "--after", help="the new commit; default: the working tree this script is in, uncommitted changes included"
  )
  p.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma list of setting:dtype, run one after another")
  p.add_argument("--rounds", type=int, default=3, help="turns per side; the side that goes first alternates")
  p.add_argument("--steps", type=int, default=3, help="measured steps per side per round")
  p.add_argument("--settle", type=int, default=1, help="unmeasured steps at the start of every turn")
  p.add_argument(
    "--hugepages",
    choices=("cli", "none"),
    default="cli",
    help="glibc.malloc.hugetlb=1 for both workers as `python -m jaxtune.train` runs (cli), or none",
  )
  p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for both workers")
  p.add_argument("--smoke", action="store_true", help="tiny model; fewer than 5 steps per side allowed")
  p.add_argument("--json", help="also write the results here")
  args, worker_args = p.parse_known_args(argv)
  for flag in worker_args:
    if flag.split("=", 1)[0] in RESERVED:
      instead = RESERVED[flag.split("=", 1)[0]]
      p.error(
        f"{flag}: "
        + (
          f"this script sets it per setting; use {instead}"
          if instead
          else "not for a before/after comparison; leave it out"
        )
      )
  try:
    settings = parse_settings(args.settings)
  except ValueError as e:
    p.error(str(e))
  if args.rounds < 1 or args.steps < 1:
    p.error(f"--rounds {args.rounds} --steps {args.steps}: both must be at least 1")
  if args.rounds * args.steps < MIN_STEPS and not args.smoke:
    p.error(
      f"--rounds {args.rounds} x --steps {args.steps} = {args.rounds * args.steps} measured steps per side; "
      f"a median needs at least {MIN_STEPS}: raise either (or add --smoke for a quick check)"
    )
  worker_args = (SMOKE_WORKER_ARGS if args.smoke else []) + worker_args
  repo = _git(HERE, "rev-parse", "--show-toplevel")
  command = shlex.join(["python", "-m", "bench.compare_commits", *argv])

  try:
    commits = {s: resolve(repo, ref, f"--{s}") for s, ref in (("before", args.before), ("after", args.after)) if ref}
  except ValueError as e:
    p.error(str(e))

  with contextlib.ExitStack() as stack:
    trees = {}
    for side, ref in (("before", args.before), ("after", args.after)):
      if ref is None:
        dirty = _git(repo, "status", "--porcelain")
        trees[side] = {
          "ref": "working tree",
          "root": repo,
          "commit": describe(repo) + (" + uncommitted changes" if dirty else ""),
        }
      else:
        trees[side] = {
          "ref": ref,
          "root": stack.enter_context(worktree(repo, commits[side])),
          "commit": describe(repo, commits[side]),
        }
      trees[side]["imports"] = imports_from(trees[side]["root"])
    print(f"cpu: {cpu_model()}")
    for side in SIDES:
      print(f"{side}: {trees[side]['commit']} ({trees[side]['ref']})")
    print(f"command: {command}")
    print(
      f"workers: python -m bench.train_cpu --worker jaxtune --setting S [--dtype bfloat16] "
      f"{shlex.join(worker_args)}; hugepages {args.hugepages}; {args.rounds} rounds x {args.steps} steps, "
      f"{args.settle} unmeasured per turn",
      flush=True,
    )
    env = worker_environ(args.hugepages, args.xla_flags)
    rows = [measure(trees, setting, dtype, args, worker_args, env) for setting, dtype in settings]

  print(f"\ncpu: {cpu_model()}")
  for side in SIDES:
    print(f"{side}: {trees[side]['commit']} ({trees[side]['ref']})")
  print(f"command: {command}")
  print("after/before = after's speed / before's speed (> 1: after is faster)")
  for row in rows:
    print(report_row(row))
  result = {
    "cpu": cpu_model(),
    "command": command,
    "smoke": args.smoke,
    "rounds": args.rounds,
    "steps": args.steps,
    "settle": args.settle,
    "hugepages": args.hugepages,
    "worker_args": worker_args,
    "commits": {s: {k: v for k, v in trees[s].items() if k != "root"} for s in SIDES},
    "settings": rows,
  }
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
