"""`fedjax_fm.train`, the run loop, through a whole lifecycle: checkpoints, bit-identical resume
(also after real kills at random points), damaged checkpoints, workdir rules, and what a run
leaves behind."""

import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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


def _launch_until(cmd, env, kill_when=None, timeout=240):
  """Runs a launch; SIGKILLs it as soon as `kill_when()` holds (polled every 2 ms). Returns
  (exit status, stderr); -9 when killed."""
  with open(os.devnull, "w") as out, tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
      if kill_when is not None and kill_when():
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.002)
    else:
      if proc.poll() is None:
        proc.kill()
    proc.wait()
    err.seek(0)
    return proc.returncode, err.read()


def _one_line_error(status, stderr, pattern):
  lines = stderr.strip().splitlines()
  assert status == 1 and len(lines) == 1 and "Traceback" not in stderr, (status, stderr[-3000:])
  assert re.match(pattern, lines[0]), lines[0]


def test_kills_at_random_points_then_resume_ends_bit_identical(uninterrupted, tmp_path):
  """A launched run SIGKILLed at a seeded random point: after a random number of rounds, in the
  middle of a checkpoint save; then the latest checkpoint
  damaged on disk. The relaunch that meets it says what to do in one line (exit 1, no traceback,
  none of orbax's shutdown noise) and changes nothing; the run ends bit-identical to the
  uninterrupted one, no round logged twice. (Checkpoints every round, so a save is often in
  flight; where a kill lands varies with the machine's speed, what must hold does not. A run
  killed before its first checkpoint, resumed, is `tests/test_faults.py`; 20 kills in a 200-round
  run, `benchmarks/soak.py`.)"""
  rng = random.Random(18)
  workdir = tmp_path / "run"
  ckpts = workdir / "checkpoints"
  cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
         os.path.join(ROOT, "configs", "digits.py:tiny,fedper"), "--workdir", str(workdir),
         "--config.rounds=6", "--config.eval_every=3", "--config.checkpoint_every=1",
         "--config.keep_checkpoints=6"]
  env = dict(os.environ, PYTHONPATH=ROOT)   # the 8 fake devices and XLA options of the tests
  # Complete checkpoints are the folders named by their round (orbax renames a finished save).
  steps = lambda: sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if ckpts.exists() \
      else []
  logged = lambda: len(open(workdir / "metrics.jsonl").read().splitlines()) if (
      workdir / "metrics.jsonl").exists() else 0
  # A resume clears unfinished saves' temporary folders (garbage, not something lost).
  kept = lambda: {p: h for p, h in _snapshot(workdir).items() if "orbax-checkpoint-tmp" not in p}

  # 1. After a random number of rounds, in the middle of a save (with two complete checkpoints,
  #    one to damage and one to fall back to). (A kill while starting or compiling, before any
  #    checkpoint, is `tests/test_faults.py`'s; the soak kills at startup too.)
  rounds = rng.randint(2, 4)
  saving = lambda: ckpts.exists() and any("orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))
  outcomes = [_launch_until(cmd, env,
                            lambda: logged() >= rounds and len(steps()) >= 2 and saving())[0]]
  print(f"kill outcomes {outcomes} (-9: killed, 0: finished first), checkpoints {steps()}")
  # 2. The latest checkpoint's data damaged on disk: one line naming the fallback, nothing
  #    touched; then --fallback_checkpoint finishes from the newest intact one.
  assert len(steps()) >= 2, steps()
  latest, previous = steps()[-1], steps()[-2]
  for path in glob.glob(str(ckpts / str(latest) / "state" / "d" / "*")):
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      data[len(data) // 2] ^= 0xFF
      f.seek(0)
      f.write(data)
  before = kept()
  _one_line_error(*_launch_until(cmd + ["--resume"], env),
                  rf"error: checkpoint of round {latest} in .* is damaged \(.*\); pass "
                  rf"--fallback_checkpoint to resume from round {previous}")
  assert kept() == before
  status, stderr = _launch_until(cmd + ["--resume", "--fallback_checkpoint"], env)
  assert status == 0, stderr[-3000:]
  assert _metrics(workdir) == _metrics(uninterrupted)          # rounds 1..6, each once
  _assert_same_state(_final_state(uninterrupted)[1], _final_state(workdir)[1])


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
