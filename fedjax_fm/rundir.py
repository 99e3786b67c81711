"""The workdir of a run: what it holds and when a new run may use it.

A workdir holds one run: ``config.json`` (the resolved config), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/``, ``curves.png`` and ``summary.json``. Starting a run in a
workdir that already holds one is refused (it would mix two runs' files), as is resuming with a
different config; both say which flag allows it. Nothing already written is deleted:
`--overwrite` moves the old run into ``<workdir>/replaced-<time>/``. A workdir the process cannot
use (read-only, or under a regular file) is a `WorkdirError`, raised before anything is written.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

CONFIG_FILE = "config.json"
RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "checkpoints", "tensorboard", "curves.png",
             "summary.json", "summary.txt")
# Keys a resumed run may change without changing what the rounds compute.
RESUMABLE_CHANGES = ("rounds", "eval_every", "checkpoint_every")


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


class WorkdirError(ValueError):
  """The workdir cannot hold a run: not writable, not a folder, or under a regular file."""


def check_writable(workdir: str):
  """Raises `WorkdirError` (one line) unless `workdir` is, or can be made, a writable folder.

  Checked before anything is written (the probe is a temporary file, removed at once), so an
  unusable workdir fails fast and leaves no trace. Permissions are probed, not read from the
  mode bits: root ignores those, and a read-only file system does not show in them."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder; choose another --workdir")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"--workdir {workdir} lies under {existing}, which is a file, not a "
                       "folder; choose another --workdir")
  try:
    fd, probe = tempfile.mkstemp(prefix=".fedjax_fm-write-probe-", dir=existing)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    what = "is" if existing == path else f"lies under {existing}, which is"
    raise WorkdirError(f"--workdir {workdir} {what} not writable ({e.strerror}); choose "
                       "another --workdir or fix its permissions") from e


def config_differences(old: dict, new: dict, ignore=RESUMABLE_CHANGES) -> list[str]:
  """Dotted keys whose values differ between two configs (as JSON dicts)."""
  a, b = _flatten(old), _flatten(new)
  return sorted(k for k in set(a) | set(b)
                if a.get(k, "<unset>") != b.get(k, "<unset>") and k not in ignore)


def holds_run(workdir: str) -> bool:
  return any(os.path.exists(os.path.join(workdir, f)) for f in RUN_FILES)


def prepare(workdir: str, config_json: str, *, resume: bool = False, overwrite: bool = False,
            allow_config_change: bool = False):
  """Checks that a run may start (or resume) in `workdir`, then records its config.

  Raises:
    ValueError: resuming where there is no run; resuming with a different config (unless
      `allow_config_change`); starting where a run already is (unless `overwrite`).
    WorkdirError: a workdir that cannot be written (a `ValueError` too).
  """
  check_writable(workdir)
  new = json.loads(config_json)
  path = os.path.join(workdir, CONFIG_FILE)
  if resume:
    if not os.path.exists(os.path.join(workdir, "checkpoints")):
      raise ValueError(f"--resume: {workdir} holds no checkpoints to resume from; drop "
                       "--resume to start a new run there")
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError):  # gone or damaged: the checkpoint's own copy is compared
      old = None                   # (`fedjax_fm.train`), and this file is written anew
    if old is not None:
      diff = config_differences(old, new)
      if diff and not allow_config_change:
        raise ValueError(f"--resume: the config differs from the run in {workdir} in {diff}; "
                         "use the same config, or pass --allow_config_change")
  elif holds_run(workdir):
    if not overwrite:
      raise ValueError(f"{workdir} already holds a run; pass --resume to continue it, "
                       "--overwrite to move it aside and start anew, or choose another --workdir")
    aside = os.path.join(workdir, time.strftime("replaced-%Y%m%d-%H%M%S"))
    os.makedirs(aside)
    for f in RUN_FILES:
      if os.path.exists(os.path.join(workdir, f)):
        os.rename(os.path.join(workdir, f), os.path.join(aside, f))
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(new, f, indent=2)
  os.replace(path + ".tmp", path)
