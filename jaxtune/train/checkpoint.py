"""Orbax checkpoints of a run: the TrainState, the data iterator state and the config, verified on restore.

Layout: RUN_DIR/checkpoints/STEP/{state, meta, config}. `state` is the TrainState (trainable
parameters only, so LoRA checkpoints hold adapters alone; optimizer state; step; RNG; NaN
counters); `meta` is JSON: the data iterator state, validation metrics and a checksum of
every state leaf; `config` is the resolved run config. Orbax writes each step into a
temporary directory and renames it when complete, so a run killed while saving leaves no
half checkpoint under a step name. A checkpoint that fails to read or whose checksums do not
match is moved to RUN_DIR/checkpoints_corrupt/ with a warning, and the previous one is used.
A save that the disk cannot take (checked before it starts, or failing while it is written)
raises `faults.RunWriteError` and leaves the complete checkpoints as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import shutil
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxtune.errors import UserError
from jaxtune.train import faults

BEST_METRIC = "eval/loss"
# A save must find this much room free first: its arrays' bytes times SPACE_MARGIN, plus SPACE_SLACK
# for Orbax's metadata files and the JSON items.
SPACE_MARGIN = 1.1
SPACE_SLACK = 1 << 20


class CheckpointMismatchError(UserError, ValueError):
  """The run directory holds checkpoints of a differently configured run."""


@dataclasses.dataclass
class Restored:
  """A checkpoint read back: the step, the TrainState, the data iterator state and the saved config."""

  step: int
  state: Any
  data_state: dict | None
  config: dict
  path: pathlib.Path


def _leaf_name(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
  """A uint32 wrapping sum of the bit patterns of each leaf: changes when any stored value does."""

  def bits(x):
    x = jnp.asarray(x)
    if x.dtype.itemsize == 4:
      return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if x.dtype.itemsize == 2:
      return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return x.astype(jnp.uint32)  # 1-byte types and bools

  return [
    jnp.sum(bits(x).ravel() * jnp.uint32(2654435761) + jnp.uint32(1), dtype=jnp.uint32) for x in jax.tree.leaves(tree)
  ]


def checksums(tree: Any) -> dict[str, int]:
  """{leaf path: checksum} of a pytree of arrays."""
  names = [_leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return dict(zip(names, (int(v) for v in jax.device_get(_checksums(tree)))))


# Settings that change the TrainState's structure or meaning: resuming across them cannot work.
_MUST_MATCH = ("model.path", "peft.method", "peft.lora.rank", "peft.lora.targets", "optim.name")


def _get(config: dict, key: str) -> Any:
  for part in key.split("."):
    config = config.get(part, {}) if isinstance(config, dict) else {}
  return config


class Checkpoints:
  """Saves and restores a run's checkpoints (async, keep the newest K, optionally the best by eval/loss)."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, keep_best: bool = False, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(
        checkpoint_managers.BestN(get_metric_fn=lambda m: -m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False)
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # leftovers of a save that was killed half-way
      create=True,
    )
    # Handlers named up front: a fresh manager can then read an item's metadata before any save or restore.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    handlers["config"] = ocp.JsonCheckpointHandler()
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._writing: int | None = None  # the step whose save may still be in flight
    faults.quiet_write_failures()

  def steps(self) -> list[int]:
    """Complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def path(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def save(
    self, step: int, state: Any, *, data_state: dict | None, config: dict, metrics: dict[str, float] | None = None
  ) -> None:
    """Starts saving (returns once the arrays are copied off the device; writing continues in the background).

    Raises RunWriteError when the disk cannot take it (checked first), or when this save or the
    previous one's background writing fails.
    """
    self.wait()  # a failure of the previous save is reported as that step's
    self._check_space(step, state)
    meta = {
      "step": step,
      "data": data_state,
      "checksums": checksums(state),
      "metrics": metrics or {},
      "time": time.time(),
    }
    best = {BEST_METRIC: float(metrics[BEST_METRIC])} if metrics and BEST_METRIC in metrics else None
    self._writing = step
    with faults.writing(f"checkpoint {self.path(step)}", step, self.directory):
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), config=ocp.args.JsonSave(config)
        ),
        metrics=best,
        force=True,
      )

  def _check_space(self, step: int, state: Any) -> None:
    """RunWriteError when this process's disk lacks room for its shards of `state` (on every process if any)."""
    needed = int(sum(_local_bytes(x) for x in jax.tree.leaves(state)) * SPACE_MARGIN) + SPACE_SLACK
    try:
      faults.check_space(self.directory, needed, f"checkpoint {self.path(step)}", step, self.directory)
      error = None
    except faults.RunWriteError as e:
      error = e
    if jax.process_count() > 1:  # every process stops together, or none does
      lacking = multihost_utils.process_allgather(np.int32(error is not None))
      if error is None and np.any(lacking):
        error = faults.RunWriteError(
          f"checkpoint {self.path(step)}", step, "another process's disk has no room for its shards", self.directory
        )
    if error is not None:
      raise error

  def wait(self) -> None:
    """Blocks until every save has been written; RunWriteError when one could not be."""
    if self._writing is None:
      return
    step, self._writing = self._writing, None
    with faults.writing(f"checkpoint {self.path(step)}", step, self.directory):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save, then closes; a failed save is raised after everything is closed."""
    try:
      self.wait()
    except BaseException:
      with contextlib.suppress(Exception):  # the failure to report is the save's
        self._manager.close()
      raise
    self._manager.close()

  def restore(self, like: Any, config: dict | None = None) -> Restored | None:
    """The newest checkpoint that reads back intact (None when there is none); `like` gives shapes/shardings.

    A corrupt newest checkpoint is moved aside with a warning and the previous one tried.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    for step in reversed(self.steps()):
      path = self.path(step)
      try:
        saved_config = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
      except Exception as e:  # any unreadable checkpoint is treated alike
        self._quarantine(step, f"its config does not read ({type(e).__name__}: {e})")
        continue
      if config is not None:
        _check_same_run(saved_config, config, path)
      try:
        got, read = self._restore_state(step, like, abstract)
        ours = lambda sums: {k: v for k, v in sums.items() if k.split("/")[0] in read}
        expected, actual = ours(got["meta"]["checksums"]), ours(checksums(got["state"]))
        if expected != actual:
          bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
          raise ValueError(f"checksum mismatch in {', '.join(bad[:3])}")
      except Exception as e:
        self._quarantine(step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        continue
      return Restored(step, got["state"], got["meta"].get("data"), saved_config, path)
    return None

  def _restore_state(self, step: int, like: Any, abstract: Any) -> tuple[dict, set[str]]:
    """({"state": like with the checkpoint's values, "meta": ...}, the state fields read from the checkpoint).

    A field that `like` has and the checkpoint not (the loss scale, when a run switches to float16)
    keeps its initial value; one the checkpoint has and `like` not (switching away) is not read.
    """
    saved = set(self._manager.item_metadata(step)["state"].tree)
    wanted = {k: v for k, v in _fields(abstract).items() if jax.tree.leaves(v)}
    if set(wanted) == saved:
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
      return self._manager.restore(step, args=args), saved
    common = {k: v for k, v in wanted.items() if k in saved}
    for name in sorted(set(wanted) - saved):
      warnings.warn(
        f"checkpoint {self.path(step)} has no {name!r} (saved by a run without it); it starts from its initial value.",
        RuntimeWarning,
        stacklevel=4,
      )
    state = ocp.PyTreeCheckpointer().restore(
      self.path(step) / "state",
      args=ocp.args.PyTreeRestore(
        item=common, restore_args=ocp.checkpoint_utils.construct_restore_args(common), partial_restore=True
      ),
    )
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return {"state": _with_fields(like, state), "meta": meta}, set(common)

  def _quarantine(self, step: int, why: str) -> None:
    """Moves a corrupt checkpoint out of the way (kept for inspection) and warns."""
    aside = self.directory.parent / f"{self.directory.name}_corrupt" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.path(step)), aside)
    warnings.warn(
      f"checkpoint {self.path(step)} is corrupt or incomplete ({why}); moved it to {aside} and "
      "falling back to the previous checkpoint.",
      RuntimeWarning,
      stacklevel=3,
    )
    self._manager.reload()


def _local_bytes(x: Any) -> int:
  """The bytes of `x` this process writes: its shards that are the first replica (a host array: all of it)."""
  if isinstance(x, jax.Array):
    return sum(shard.data.nbytes for shard in x.addressable_shards if shard.replica_id == 0)
  return np.asarray(x).nbytes


def _fields(tree: Any) -> dict[str, Any]:
  """The top-level children of a TrainState (a dataclass) or of a dict, by name."""
  if dataclasses.is_dataclass(tree):
    return {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
  return dict(tree)


def _with_fields(tree: Any, values: dict[str, Any]) -> Any:
  return tree.replace(**values) if dataclasses.is_dataclass(tree) else {**tree, **values}


def _check_same_run(saved: dict, current: dict, path: pathlib.Path) -> None:
  diffs = [
    f"{k}: {_get(saved, k)!r} there, {_get(current, k)!r} now"
    for k in _MUST_MATCH
    if _get(saved, k) != _get(current, k)
  ]
  if diffs:
    raise CheckpointMismatchError(
      f"{path} was saved by a differently configured run ({'; '.join(diffs)}), so it cannot be resumed. "
      "Use a new output_dir, restore those settings, or set resume=never after moving the checkpoints away."
    )
