"""Run checkpoints with orbax: server state, all clients' personal state and the metric history,
each verified against a digest written with it.

A run's randomness is a pure function of (seed, round) (`fedjax_fm.cohort`), so these three are
everything a resumed run needs to end bit-identical to an uninterrupted one.

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed during a save leaves only an unfinished temporary folder, which is ignored: the resume
starts from the previous complete checkpoint. A complete checkpoint can still be damaged later
(a truncated file, flipped bytes, a deleted file), and a damaged data file may well decode
without error into wrong numbers. So every checkpoint carries a third item, ``digest``: the
SHA-256 of every saved array (its dtype, shape and bytes) and of the metadata (the history and
the config), computed from the values handed to `save`. `restore` recomputes them from what it
read; any difference, a missing digest or a read error makes the checkpoint *damaged*. A damaged
checkpoint is reported in one line naming its round and the newest intact one; falling back to
that happens only when asked (`fallback=True`), because silently losing rounds hides a problem.

Files a restore does not read (commit markers, orbax's own metadata, per-process copies) cannot
change what a resume computes, but a flipped byte in them is still a sign of a bad disk: once a
save is complete, the checkpoint is *sealed* with ``files.sha256.json``, the SHA-256 of every
file in it, checked first on restore. A checkpoint whose save completed but whose run was
killed before sealing it (a moment's window) is verified by its value digests alone.

The metadata is copied when `save` is called: an asynchronous save must write the history as it
was after its round, never with records the loop appended while the save was in flight.

Multi-host runs: every process calls `save` and `restore` with the same arguments (orbax writes
each process's shards and synchronises the processes; the digests are computed on gathered
arrays, the same on every process); the directory must be on a file system all processes see.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from fedjax_fm import distributed

PyTree = Any
DIGEST_FORMAT = 1
SEAL = "files.sha256.json"


class CheckpointError(RuntimeError):
  """No checkpoint to resume from, or only damaged ones. The message is one line."""


def _manager(directory: str, keep: int | None, read_only: bool = False) -> ocp.CheckpointManager:
  # Unfinished saves of a killed run are temporary folders; clearing them at start is safe.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def array_digests(state: PyTree) -> dict[str, str]:
  """``{tree path: sha256 of dtype, shape and bytes}`` of every array leaf of `state`.

  A collective in a multi-process run (each array is gathered to every process first). Leaves
  are brought to the host one at a time, so the extra host memory is one leaf, not the state."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = np.ascontiguousarray(np.asarray(distributed.fetch(leaf)))
    out[jax.tree_util.keystr(path)] = _sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
  return out


def meta_digest(meta: dict) -> str:
  """sha256 of the metadata's canonical JSON (sorted keys; NaN written as JSON's NaN)."""
  return _sha256(json.dumps(meta, sort_keys=True).encode())


def _file_hashes(folder: str) -> dict[str, str]:
  """``{path relative to folder: sha256}`` of every file below `folder` but the seal."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel not in (SEAL, SEAL + ".tmp"):
        h = hashlib.sha256()
        with open(path, "rb") as f:
          for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
        out[rel] = h.hexdigest()
  return out


def _short(e: BaseException) -> str:
  """A read error in a few words: its type and first line, cut at a word, never mid-token."""
  first = (str(e).strip().splitlines() or [""])[0]
  if len(first) > 120:
    first = first[:120].rsplit(" ", 1)[0] + " ..."
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


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
    self._unsealed: list[int] = []   # saved by this object, not yet sealed

  def save(self, round_num: int, state: PyTree, meta: dict):
    """Starts an (asynchronous) save of `state` after `round_num` completed rounds.

    `meta` is deep-copied and the digests are computed before this returns, so the caller may
    go on changing its history (and donating its arrays) while the save is written."""
    meta = copy.deepcopy(meta)
    digest = {"format": DIGEST_FORMAT, "round": round_num, "arrays": array_digests(state),
              "meta": meta_digest(meta)}
    self._mgr.save(round_num, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta),
                                                       digest=ocp.args.JsonSave(digest)),
                   force=True)
    self._unsealed.append(round_num)
    self._seal()

  def _seal(self):
    """Writes the file seal of every save of this object that orbax has completed (a save is
    complete once renamed from its temporary folder; orbax finishes one before starting the
    next). Multi-host: process 0 writes, on the file system all processes share."""
    if not self._unsealed:
      return
    done = set(self.steps())
    for step in [s for s in self._unsealed if s in done]:
      folder = os.path.join(self.directory, str(step))
      if jax.process_index() == 0 and os.path.isdir(folder):
        hashes = _file_hashes(folder)
        with open(os.path.join(folder, SEAL + ".tmp"), "w") as f:
          json.dump(hashes, f, indent=0, sort_keys=True)
        os.replace(os.path.join(folder, SEAL + ".tmp"), os.path.join(folder, SEAL))
      self._unsealed.remove(step)

  def steps(self) -> list[int]:
    """The complete checkpoints' rounds, oldest first (unfinished saves are not listed)."""
    self._mgr.reload()
    return sorted(self._mgr.all_steps())

  def _read(self, step: int, abstract: PyTree) -> tuple[PyTree, dict]:
    """Round `step`'s state and meta, verified against its digest.

    Raises:
      CheckpointError: a read error, a missing digest or a value that differs from it (the
        message says which, in a few words).
    """
    folder = os.path.join(self.directory, str(step))
    if os.path.exists(os.path.join(folder, SEAL)):
      try:
        with open(os.path.join(folder, SEAL)) as f:
          sealed = json.load(f)
      except (OSError, ValueError) as e:
        raise CheckpointError(f"its file seal is unreadable ({_short(e)})") from e
      found = _file_hashes(folder)
      for rel in sorted(set(sealed) | set(found)):
        if rel not in found:
          raise CheckpointError(f"file {rel} is missing")
        if sealed.get(rel) != found[rel]:
          raise CheckpointError(f"file {rel} differs from its seal" if rel in sealed
                                else f"file {rel} was not in it when it was written")
    try:
      digest = dict(self._mgr.restore(step, args=ocp.args.Composite(
          digest=ocp.args.JsonRestore()))["digest"])
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many types
      raise CheckpointError(f"its digest is missing or unreadable ({_short(e)})") from e
    if digest.get("format") != DIGEST_FORMAT or digest.get("round") != step:
      raise CheckpointError("its digest belongs to another checkpoint format or round")
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"unreadable ({_short(e)})") from e
    state, meta = out["state"], dict(out["meta"])
    want, got = digest.get("arrays", {}), array_digests(state)
    for path in sorted(set(want) | set(got)):
      if want.get(path) != got.get(path):
        raise CheckpointError(f"array {path} differs from its digest")
    if meta_digest(meta) != digest.get("meta"):
      raise CheckpointError("its metric history or config differs from its digest")
    return state, meta

  def restore(self, like: PyTree, fallback: bool = False) -> tuple[int, PyTree, dict]:
    """Restores the latest complete checkpoint, verified, into arrays shaped and placed like
    `like`.

    Args:
      like: a state pytree with the target structure, shapes, dtypes and shardings.
      fallback: if the latest checkpoint is damaged, restore the newest intact one instead
        (the damaged ones are moved to ``<directory>-damaged/``, not deleted).

    Returns:
      (round, state, meta).

    Raises:
      CheckpointError (one line): no complete checkpoint; a damaged latest checkpoint without
        `fallback` (naming the newest intact round to fall back to); every checkpoint damaged.
    """
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"no complete checkpoint in {self.directory}: the run stopped "
                            "before its first save; start it anew with --overwrite instead of "
                            "--resume")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    damaged: dict[int, str] = {}
    for step in reversed(steps):
      try:
        state, meta = self._read(step, abstract)
      except CheckpointError as e:
        damaged[step] = str(e)
        continue
      if not damaged:
        return step, state, meta
      latest = max(damaged)
      if not fallback:
        raise CheckpointError(
            f"checkpoint of round {latest} in {self.directory} is damaged "
            f"({damaged[latest]}); pass --fallback_checkpoint to resume from round {step}, "
            "the newest intact checkpoint (the damaged ones are moved aside, not deleted)")
      self._set_aside(sorted(damaged))
      return step, state, meta
    reasons = "; ".join(f"round {s}: {why}" for s, why in sorted(damaged.items(), reverse=True))
    raise CheckpointError(f"every checkpoint in {self.directory} is damaged ({reasons}); "
                          "nothing to resume from: start the run anew with --overwrite (the "
                          "damaged run is moved aside, not deleted)")

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
    """Blocks until pending asynchronous saves are complete (and seals them)."""
    self._mgr.wait_until_finished()
    self._seal()

  def close(self):
    self.wait()
    self._mgr.close()
