"""The fault matrix: every failure a user can cause ends in one line and a non-zero exit, and
nothing already written is lost.

Most cases run in-process against `fedjax_fm.experiment.run` on tiny digits (the same errors
`launch.py` prints); real processes are started only where the process is the point: a batch of
launches that fail before jax is imported (about a second each), with their exit status and
stderr checked line by line. Elsewhere: kills at seeded random points during compile, rounds
and saves, and a damaged checkpoint met by a real resume (`tests/test_train.py`, the test
``test_kills_at_random_points_then_resume_ends_bit_identical``); every checkpoint file kind
corrupted, deleted parts and concurrent saves (`tests/test_checkpoint.py`).
"""

import glob
import hashlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import launch
from tests import tiny
from fedjax_fm import report
from fedjax_fm.checkpoint import CheckpointError, Checkpointer
from fedjax_fm.cohort import FederatedData, GroupedData
from fedjax_fm.data import partition
from fedjax_fm.experiment import run
from fedjax_fm.rundir import WorkdirError
from fedjax_fm.train import TrainingDiverged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")


def _config(**overrides):
  c = tiny.config("digits")
  c.eval_every = 2
  c.update_from_flattened_dict(overrides)
  return c


def _snapshot(path):
  return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
          for p in glob.glob(os.path.join(str(path), "**"), recursive=True) if os.path.isfile(p)}


def _read_only_dir(tmp_path):
  """A folder no one can write to: chmod is enough for a normal user; root ignores modes, so
  there a sysfs folder (creating files in it is refused even to root)."""
  if os.geteuid() != 0:
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    return str(path)
  assert os.path.isdir("/sys/kernel"), "no read-only folder to test with"
  return "/sys/kernel"


# ---- bad config values: refused before anything is built or written ----

@pytest.mark.parametrize("key, value, match", [
    ("data.partition.alpha", float("inf"), r"config.data.partition.alpha must be finite"),
    ("data.test_fraction", float("nan"), r"config.data.test_fraction must be finite"),
    ("algorithm.hparams.client_lr", float("-inf"), r"client_lr must be finite"),
    ("max_bad_rounds", 0, r"config.max_bad_rounds must be a positive integer, got 0"),
    ("max_bad_rounds", -2, r"config.max_bad_rounds must be a positive integer, got -2"),
    ("keep_checkpoints", 0, r"config.keep_checkpoints must be a positive integer, got 0"),
    ("eval_every", -3, r"config.eval_every must be a positive integer"),
    ("cohort_size", 0, r"config.cohort_size must be a positive integer"),
    ("data.empty_clients", "drop", r"config.data.empty_clients must be one of \['error', "
                                   r"'exclude'\], got 'drop'"),
    ("mesh", ("clients",), r"config.mesh must be \(axis name, size\) pairs"),
    ("mesh", (("clients", 0),), r"config.mesh must be \(axis name, size\) pairs"),
])
def test_bad_config_value_is_one_line_and_writes_nothing(key, value, match, tmp_path):
  config = _config(**{key: value})
  with pytest.raises(ValueError, match=match) as e:
    run(config, str(tmp_path / "run"), progress=False)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


# ---- workdirs that cannot hold a run ----

def test_unusable_workdirs_are_refused_and_left_as_they_were(tmp_path):
  regular = tmp_path / "notes.txt"
  regular.write_text("keep me")
  cases = [(str(regular), r"is a file, not a folder"),
           (str(regular / "run"), r"lies under .*notes.txt, which is a file, not a folder"),
           (_read_only_dir(tmp_path), r"is not writable"),
           (os.path.join(_read_only_dir(tmp_path), "run"), r"lies under .* not writable")]
  before = _snapshot(tmp_path)
  for workdir, match in cases:
    with pytest.raises(WorkdirError, match=match) as e:
      run(_config(), workdir, progress=False)
    assert "\n" not in str(e.value) and "choose another --workdir" in str(e.value)
  assert _snapshot(tmp_path) == before and regular.read_text() == "keep me"


# ---- empty clients ----

def _federation(train_sizes, test_sizes):
  def fed(sizes):
    return FederatedData({"x": np.arange(sum(sizes), dtype=np.float32)},
                         np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
  return fed(train_sizes), fed(test_sizes)


def test_empty_clients_are_refused_with_counts_or_excluded_when_asked():
  train, test = _federation([3, 0, 2, 4], [1, 1, 1, 0])   # client 1: no train; 3: no test
  with pytest.raises(ValueError, match=r"leaves 2 of 4 clients without examples \(1 without "
                                       r"training examples, 1 without test examples; the first "
                                       r"is client 1\).*empty_clients='exclude'"):
    partition.handle_empty_clients(train, test, None, "error")
  tr, te, groups, excluded = partition.handle_empty_clients(train, test, list("abcd"),
                                                            "exclude")
  assert excluded == 2 and groups == ["a", "c"]
  np.testing.assert_array_equal(tr.sizes, [3, 2])
  np.testing.assert_array_equal(te.sizes, [1, 1])
  np.testing.assert_array_equal(tr.arrays["x"], [0, 1, 2, 3, 4])   # clients 0 and 2, in order
  # Grouped data: per group; a group left with no client is refused.
  g_train = GroupedData(("p", "q"), (train, _federation([5], [1])[0]))
  g_test = GroupedData(("p", "q"), (test, _federation([5], [1])[1]))
  tr, te, _, excluded = partition.handle_empty_clients(g_train, g_test, None, "exclude")
  assert excluded == 2 and [g.num_clients for g in tr.groups] == [2, 1]
  with pytest.raises(ValueError, match="every client, nothing to train on"):
    partition.handle_empty_clients(*_federation([0, 0], [1, 1]), None, "exclude")


def _skewed(**overrides):
  """16 clients of Dir(0.05) sizes, 60% of each held out: 12 are left with no training example
  (those of 1 example keep it for testing)."""
  return _config(**{"data.partition.kind": "quantity", "data.partition.num_clients": 16,
                    "data.partition.alpha": 0.05, "data.test_fraction": 0.6,
                    "local_epochs": None, "local_steps": 2, **overrides})


def test_skewed_partition_is_refused_or_run_without_its_empty_clients(tmp_path):
  with pytest.raises(ValueError, match=r"leaves 12 of 16 clients without examples \(12 without "
                                       r"training examples, 0 without test examples"):
    run(_skewed(), str(tmp_path / "refused"), progress=False)
  assert not (tmp_path / "refused").exists()
  history = run(_skewed(**{"data.empty_clients": "exclude", "rounds": 2}),
                str(tmp_path / "run"), progress=False)
  assert [h["round"] for h in history] == [1, 2]
  assert all(h["train/examples"] > 0 for h in history)     # no round trains on nothing
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["excluded_clients"] == 12
  assert any("12 client(s) with no training or test examples were excluded" in w
             for w in summary["warnings"])
  for stats in summary["per_client"].values():
    assert stats["clients"] == 4                           # the excluded ones are not counted
  assert "12 client(s)" in (tmp_path / "run" / "summary.txt").read_text()


# ---- divergence ----

def test_diverged_run_stops_with_nan_metrics_and_its_good_checkpoints_kept(tmp_path):
  """Two good rounds, then client_lr=1e30: every update non-finite. Rounds 3 and 4 are logged
  with NaN (not 0) and not checkpointed; the run stops after max_bad_rounds=2 of them."""
  workdir = str(tmp_path / "run")
  run(_config(rounds=2, checkpoint_every=1, max_bad_rounds=2), workdir, progress=False)
  with pytest.raises(TrainingDiverged) as e:
    run(_config(**{"rounds": 8, "checkpoint_every": 1, "max_bad_rounds": 2,
                   "algorithm.hparams.client_lr": 1e30}),
        workdir, resume=True, allow_config_change=True, progress=False)
  assert str(e.value) == (
      "training diverged: rounds 3-4 had no healthy client (every update non-finite) (2 in a "
      "row, config.max_bad_rounds=2); the last good checkpoint (round 2) is kept; lower the "
      "learning rates or check the data")
  assert Checkpointer(os.path.join(workdir, "checkpoints")).steps() == [1, 2]
  history = report.read_metrics(workdir)
  assert [h["round"] for h in history] == [1, 2, 3, 4]
  assert all(math.isfinite(h["train/loss"]) for h in history[:2])
  assert all(math.isnan(h["train/loss"]) and h["train/examples"] == 0 for h in history[2:])
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["bad_rounds"] == [3, 4]
  assert summary["warnings"][0].startswith("stopped early: training diverged: rounds 3-4")
  # A resume starts from the last good round, never from a bad one.
  with pytest.raises(TrainingDiverged):
    run(_config(**{"rounds": 8, "checkpoint_every": 1, "max_bad_rounds": 2,
                   "algorithm.hparams.client_lr": 1e30}),
        workdir, resume=True, allow_config_change=True, progress=False)
  assert [h["round"] for h in report.read_metrics(workdir)] == [1, 2, 3, 4]


# ---- one consistent history: no round twice, the summary kept on resume ----

def test_every_checkpoint_holds_its_own_history_and_resume_writes_no_round_twice(tmp_path):
  workdir = tmp_path / "run"
  run(_config(rounds=5, checkpoint_every=1, keep_checkpoints=5), str(workdir), progress=False)
  full = report.read_metrics(str(workdir))
  ckpt = Checkpointer(str(workdir / "checkpoints"), keep=5)
  assert ckpt.steps() == [1, 2, 3, 4, 5]
  # Killed after round 3's checkpoint with rounds 4 and 5 already logged: those two go.
  for step in (4, 5):
    ckpt._mgr.delete(step)
  ckpt.close()
  run(_config(rounds=5, checkpoint_every=1, keep_checkpoints=5), str(workdir), resume=True,
      progress=False)
  again = report.read_metrics(str(workdir))
  assert [h["round"] for h in again] == [1, 2, 3, 4, 5]
  strip = lambda hs: [{k: v for k, v in h.items() if k not in report.VOLATILE_KEYS} for h in hs]
  assert strip(again) == strip(full)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["per_client"]
  # Resuming the finished run computes nothing and keeps the per-client statistics.
  run(_config(rounds=5, checkpoint_every=1, keep_checkpoints=5), str(workdir), resume=True,
      progress=False)
  assert json.loads((workdir / "summary.json").read_text())["per_client"] == \
      summary["per_client"]
  # With config.json gone, the config saved (and verified) with the checkpoint is compared.
  os.remove(workdir / "config.json")
  with pytest.raises(ValueError, match=r"differs from the one saved with the checkpoint of "
                                       r"round 5 in \['seed'\].*--allow_config_change"):
    run(_config(rounds=5, checkpoint_every=1, keep_checkpoints=5, seed=1), str(workdir),
        resume=True, progress=False)


def test_resume_without_a_complete_checkpoint_names_overwrite(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000000000").mkdir(parents=True)
  with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*: the run stopped "
                                            r"before its first save; .*--overwrite"):
    run(_config(), str(workdir), resume=True, progress=False)


# ---- the launcher: one line and an exit status, never a traceback ----

@pytest.mark.parametrize("error, message, status", [
    (TrainingDiverged("training diverged: rounds 3-4 ..."), "training diverged: rounds 3-4 ...",
     2),
    (CheckpointError("checkpoint of round 6 in x is damaged"),
     "checkpoint of round 6 in x is damaged", 1),
    (WorkdirError("--workdir x is not writable"), "--workdir x is not writable", 1),
    (PermissionError(13, "Permission denied", "/data/x"),
     "Permission denied: '/data/x'; check that --workdir can be written and the data paths "
     "read", 1),
    (FileNotFoundError("minilm is not in the cache; fetch it with: python -m fedjax_fm.assets"),
     "minilm is not in the cache; fetch it with: python -m fedjax_fm.assets", 1),
    (KeyboardInterrupt(), "interrupted; --resume continues from the last checkpoint", 130),
])
def test_user_errors_map_to_one_line_and_a_status(error, message, status):
  assert launch.user_error(error) == (message, status)


def test_a_bug_keeps_its_traceback():
  assert launch.user_error(RuntimeError("index out of range")) is None
  assert launch.user_error(SystemExit(0)) is None


def test_launches_that_fail_before_importing_jax(tmp_path):
  """Each of these exits within about a second with one line on stderr, status 1, no
  traceback, and leaves the file system as it was."""
  regular = tmp_path / "notes.txt"
  regular.write_text("keep me")
  tiny_digits = ["--config", f"{DIGITS}:tiny"]
  cases = [
      (["--config", str(tmp_path / "missing.py")], r"cannot read the config file '.*missing.py'"),
      (["--config", f"{DIGITS}:huge"], r"--config=.*digits.py:huge: unknown argument 'huge' "
                                       r"of configs/digits.py; use one of \['tiny'\]"),
      (tiny_digits + ["--resum"], r"Unknown command line flag 'resum'"),
      (tiny_digits + ["--config.max_bad_round=2"], r"unknown config key 'max_bad_round' in "
                                                    r".*; did you mean \"max_bad_rounds\"\?"),
      (tiny_digits + ["--workdir", str(regular)], r"is a file, not a folder"),
      (tiny_digits + ["--workdir", str(regular / "run")], r"which is a file, not a folder"),
      (tiny_digits + ["--workdir", _read_only_dir(tmp_path)], r"is not writable"),
  ]
  before = _snapshot(tmp_path)
  for args, match in cases:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, proc.stderr[-2000:])
    assert re.search(match, lines[0]), (args, lines[0])
    assert "Traceback" not in proc.stderr
  assert _snapshot(tmp_path) == before
