"""Run checkpoints with orbax: server state, all clients' personal state and the metric history.

A run's randomness is a pure function of (seed, round) (`fedjax_fm.cohort`), so these three are
everything a resumed run needs to end bit-identical to an uninterrupted one.

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed during a save leaves only an unfinished temporary folder, which is ignored: the resume
starts from the previous complete checkpoint. A complete checkpoint whose files were later
damaged (truncated, corrupted) is reported as such; falling back to the one before it happens only
when asked (`fallback=True`), because silently losing rounds hides a real problem.

Multi-host runs: every process calls `save` and `restore` with the same arguments (orbax writes
each process's shards and synchronises the processes); the directory must be on a file system
all processes see.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any


class CheckpointError(RuntimeError):
  """A checkpoint could not be read."""


def _manager(directory: str, keep: int | None, read_only: bool = False) -> ocp.CheckpointManager:
  # Unfinished saves of a killed run are temporary folders; clearing them at start is safe.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
  """Saves and restores `{"server", "clients"}` plus a JSON `meta` dict, keyed by round.

  Args:
    directory: the checkpoint folder (``<workdir>/checkpoints``).
    keep: how many recent checkpoints to keep (None: all). Keep at least 2 so that a damaged
      latest checkpoint has a predecessor to fall back to.
  """

  def __init__(self, directory: str, keep: int | None = 3):
    self.directory = directory
    self._mgr = _manager(directory, keep)

  def save(self, round_num: int, state: PyTree, meta: dict):
    """Starts an (asynchronous) save of `state` after `round_num` completed rounds."""
    self._mgr.save(round_num, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)),
                   force=True)

  def steps(self) -> list[int]:
    """The complete checkpoints' rounds, oldest first (unfinished saves are not listed)."""
    self._mgr.reload()
    return sorted(self._mgr.all_steps())

  def restore(self, like: PyTree, fallback: bool = False) -> tuple[int, PyTree, dict]:
    """Restores the latest complete checkpoint into arrays shaped and placed like `like`.

    Args:
      like: a state pytree with the target structure, shapes, dtypes and shardings.
      fallback: if the latest checkpoint is damaged, try the earlier ones (newest first).

    Returns:
      (round, state, meta).

    Raises:
      CheckpointError: no complete checkpoint, or a damaged one (and `fallback` is off, or
        every checkpoint is damaged).
    """
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"no complete checkpoint in {self.directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    errors, damaged = [], []
    for step in reversed(steps):
      try:
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises many types for damaged files  # pylint: disable=broad-except
        errors.append(f"round {step}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        damaged.append(step)
        if not fallback:
          break
        continue
      self._set_aside(damaged)
      return step, out["state"], dict(out["meta"])
    earlier = [s for s in steps if s < steps[-1]]
    hint = (f"; pass --fallback_checkpoint to resume from round {earlier[-1]} instead"
            if earlier and not fallback else "")
    raise CheckpointError(f"checkpoint in {self.directory} is corrupted or truncated "
                          f"({'; '.join(errors)}){hint}")

  def _set_aside(self, steps: list[int]):
    """Moves damaged checkpoints to ``<directory>-damaged/`` (kept for inspection, out of the
    way of the rounds about to be saved again)."""
    if not steps:
      return
    aside = self.directory.rstrip("/") + "-damaged"
    if jax.process_index() == 0:  # multi-host: one process moves, all wait for it
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        os.rename(os.path.join(self.directory, str(step)),
                  os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint-set-aside")
    self._mgr.reload()

  def wait(self):
    """Blocks until pending asynchronous saves are complete."""
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.close()
