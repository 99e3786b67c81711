"""`fedjax_fm.train`, the run loop, through a whole lifecycle: checkpoints, bit-identical resume
(also after a real kill), damaged checkpoints, workdir rules, and what a run leaves behind."""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits as default_config
from fedjax_fm import report
from fedjax_fm.experiment import run
from fedjax_fm.checkpoint import CheckpointError, Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(rounds, **overrides):
  """FedPer on tiny digits: shared body and personal heads, so personal state is checked too."""
  c = default_config.get_config("tiny,fedper")   # its personal heads are the MLP's `head/`
  c.rounds = rounds
  c.eval_every = 3
  c.checkpoint_every = 3
  c.update(overrides)
  return c


def _run(workdir, rounds, **kw):
  return run(_config(rounds), str(workdir), progress=False, **kw)


def _metrics(workdir):
  return [{k: v for k, v in h.items() if k not in report.VOLATILE_KEYS}
          for h in report.read_metrics(str(workdir))]


def _final_state(workdir):
  """(round, arrays) of the last checkpoint, restored as plain numpy."""
  mgr = ocp.CheckpointManager(os.path.join(str(workdir), "checkpoints"))
  step = mgr.latest_step()
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  return step, jax.tree_util.tree_map(np.asarray, out["state"])


def _assert_same_state(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)  # bit-identical, not merely close


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  _run(workdir, 6)
  return workdir


def _snapshot(workdir):
  return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
          for p in glob.glob(os.path.join(str(workdir), "**"), recursive=True)
          if os.path.isfile(p)}


def test_run_leaves_metrics_tensorboard_plots_summary_and_checkpoints(uninterrupted):
  names = set(os.listdir(uninterrupted))
  assert {"config.json", "metrics.jsonl", "tensorboard", "curves.png", "summary.json",
          "summary.txt", "checkpoints"} <= names
  assert Checkpointer(os.path.join(str(uninterrupted), "checkpoints")).steps() == [3, 6]
  assert glob.glob(os.path.join(str(uninterrupted), "tensorboard", "events.out.tfevents.*"))
  history = _metrics(uninterrupted)
  assert [h["round"] for h in history] == list(range(1, 7))
  evals = [h["round"] for h in history if "personalized/accuracy" in h]
  assert evals == [3, 6]
  summary = json.loads((uninterrupted / "summary.json").read_text())
  assert summary["final"]["round"] == 6
  per_client = summary["per_client"]["personalized/per_client_accuracy"]
  assert 0.0 <= per_client["min"] <= per_client["mean"] <= per_client["max"] <= 1.0


def test_resume_ends_bit_identical_to_an_uninterrupted_run(uninterrupted, tmp_path):
  _run(tmp_path, 3)                      # stops after round 3 (its last checkpoint)
  _run(tmp_path, 6, resume=True)         # rounds 4..6 from the checkpoint
  assert _metrics(tmp_path) == _metrics(uninterrupted)
  step_a, state_a = _final_state(uninterrupted)
  step_b, state_b = _final_state(tmp_path)
  assert step_a == step_b == 6
  _assert_same_state(state_a, state_b)   # server params, optimizer state and personal heads


def test_resume_after_a_real_kill(uninterrupted, tmp_path):
  """SIGKILL a launched run once a checkpoint exists; --resume finishes with the same numbers."""
  cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
         os.path.join(ROOT, "configs", "digits.py:tiny,fedper"), "--workdir", str(tmp_path),
         "--config.rounds=6", "--config.eval_every=3",
         "--config.checkpoint_every=3"]
  env = dict(os.environ, PYTHONPATH=ROOT)   # the 8 fake devices and XLA options of the tests
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = os.path.join(str(tmp_path), "checkpoints", "3")
  deadline = time.time() + 240
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(first), "the run never wrote its first checkpoint"
  done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert _metrics(tmp_path) == _metrics(uninterrupted)
  _assert_same_state(_final_state(uninterrupted)[1], _final_state(tmp_path)[1])


def test_a_save_killed_midway_is_ignored_on_resume(uninterrupted, tmp_path):
  """An unfinished save is a temporary folder (orbax renames it when complete): resume skips it."""
  _run(tmp_path, 3)
  ckpts = tmp_path / "checkpoints"
  partial = ckpts / "6.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(ckpts / "3", partial)
  for marker in glob.glob(str(partial / "**" / "*commit*"), recursive=True):
    os.remove(marker)
  big = max((p for p in glob.glob(str(partial / "**"), recursive=True) if os.path.isfile(p)),
            key=os.path.getsize)
  with open(big, "r+b") as f:  # half-written
    f.truncate(os.path.getsize(big) // 2)
  assert Checkpointer(str(ckpts)).steps() == [3]
  _run(tmp_path, 6, resume=True)
  assert _metrics(tmp_path) == _metrics(uninterrupted)


def _damage_latest(workdir):
  ckpts = os.path.join(str(workdir), "checkpoints")
  latest = os.path.join(ckpts, str(max(Checkpointer(ckpts).steps())))
  files = [p for p in glob.glob(os.path.join(latest, "state", "**"), recursive=True)
           if os.path.isfile(p) and os.path.getsize(p) > 64]
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)


def test_damaged_checkpoint_is_reported_and_fallback_only_when_asked(uninterrupted, tmp_path):
  _run(tmp_path, 6)
  _damage_latest(tmp_path)
  before = _snapshot(tmp_path)
  with pytest.raises(CheckpointError, match=r"round 6 .* is damaged .*--fallback_checkpoint.*round 3"):
    _run(tmp_path, 6, resume=True)
  assert _snapshot(tmp_path) == before  # nothing written or lost
  _run(tmp_path, 6, resume=True, fallback_checkpoint=True)  # from round 3, recomputes 4..6
  assert _metrics(tmp_path) == _metrics(uninterrupted)
  _assert_same_state(_final_state(uninterrupted)[1], _final_state(tmp_path)[1])
  assert len(os.listdir(tmp_path / "checkpoints-damaged")) == 1  # set aside, not deleted


def test_workdir_of_another_run_is_refused_and_left_intact(uninterrupted, tmp_path):
  shutil.copytree(uninterrupted, tmp_path / "run")
  workdir = tmp_path / "run"
  before = _snapshot(workdir)
  other = _config(6, seed=1)
  with pytest.raises(ValueError, match=r"differs.*seed.*--allow_config_change"):
    run(other, str(workdir), resume=True, progress=False)
  with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
    run(other, str(workdir), progress=False)
  with pytest.raises(ValueError, match="no checkpoints to resume"):
    run(other, str(tmp_path / "empty"), resume=True, progress=False)
  assert _snapshot(workdir) == before
  # Asked explicitly: the old run is moved aside, not deleted.
  run(_config(3, seed=1), str(workdir), overwrite=True, progress=False)
  aside = glob.glob(str(workdir / "replaced-*"))
  assert len(aside) == 1 and os.path.exists(os.path.join(aside[0], "metrics.jsonl"))
  assert len(report.read_metrics(str(workdir))) == 3
