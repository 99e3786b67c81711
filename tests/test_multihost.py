"""Multi-host runs on one machine: 2 processes x 2 fake CPU devices through jax.distributed.

`launch.py` is started as separate processes that join through a coordinator on 127.0.0.1 (CPU
collectives through gloo) and share one workdir, as hosts of a cluster share a file system. The
run's checkpointed parameters must equal those of a single-process run on 4 devices (the same
global mesh), and a multi-host run must resume from its own checkpoint. Every process has a
deadline and is killed when a sibling fails, so the file ends by itself.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fedjax_fm import distributed, sharding
from fedjax_fm.cohort import PADDING_ID, Cohort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FedPer on tiny digits: 8 clients with personal heads (client state sharded across the hosts),
# cohorts of 4 (one client per device), evaluation with per-client arrays at round 2 and 4.
RUN = ["--config", os.path.join(ROOT, "configs", "digits.py") + ":tiny,fedper",
       "--config.checkpoint_every=2",
       "--config.eval_every=2"]
# A hang guard, not a timing assertion: past this, every process still running is killed and the
# test fails. Alone on 2 cores each launch takes well under a minute; the margin is for CI
# machines shared with other work (raise it with the variable on slower ones).
DEADLINE_S = float(os.environ.get("FEDJAX_FM_MULTIHOST_DEADLINE_S", 300))


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, devices, log, cache):
  # A compilation cache shared by the test's processes: the resumed run reuses what the first
  # multi-host run compiled (same programs, same topology), which keeps the file under 90 s.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *RUN, *args],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(procs, logs, deadline):
  """Waits for all processes; on a failure or the deadline kills the rest and reports."""
  failed = None
  while failed is None and any(p.poll() is None for p in procs):
    if time.monotonic() > deadline:
      failed = "deadline"
    elif any(p.poll() not in (None, 0) for p in procs):
      failed = "a process failed"
    time.sleep(0.2)
  failed = failed or ("a process failed" if any(p.returncode for p in procs) else None)
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  if failed:
    tails = [open(log.name).read()[-1500:] for log in logs]
    pytest.fail(f"{failed}: " + "\n----\n".join(tails))


def _multihost(workdir, rounds, tmp_path, tag, extra=()):
  """Starts the 2 processes of one multi-host run; returns (procs, logs) to `_finish`."""
  address = f"127.0.0.1:{_free_port()}"
  procs, logs = [], []
  for pid in range(2):
    log = open(tmp_path / f"{tag}-{pid}.log", "w")
    procs.append(_start([f"--config.rounds={rounds}", f"--workdir={workdir}",
                         f"--coordinator={address}", "--num_processes=2",
                         f"--process_id={pid}", *extra], 2, log, tmp_path / "cache"))
    logs.append(log)
  return procs, logs


def _state(workdir, step):
  """The checkpoint of `step` as numpy arrays (read back here, on any device layout)."""
  path = os.path.join(str(workdir), "checkpoints", str(step), "state")
  reader = ocp.PyTreeCheckpointer()
  meta = reader.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return reader.restore(path, restore_args=args)


def _metrics(workdir):
  with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A single-process 4-device run of 4 rounds, side by side with a 2-process run of 2 rounds
  and then that run resumed from its checkpoint up to round 4."""
  tmp = tmp_path_factory.mktemp("multihost")
  deadline = time.monotonic() + DEADLINE_S
  single, multi = tmp / "single", tmp / "multi"
  log = open(tmp / "single.log", "w")
  reference = _start(["--config.rounds=4", f"--workdir={single}"], 4, log, tmp / "cache")
  try:
    _finish(*_multihost(multi, 2, tmp, "first"), deadline)
    first = _metrics(multi)
    procs, logs = _multihost(multi, 4, tmp, "resumed", ["--resume"])
  except BaseException:
    reference.kill()
    raise
  _finish(procs + [reference], logs + [log], deadline)
  return {"single": single, "multi": multi, "first": first, "logs": tmp}


def test_multihost_run_equals_single_process_run_on_as_many_devices(runs):
  single, multi = _state(runs["single"], 4), _state(runs["multi"], 4)
  flat_s = jax.tree_util.tree_leaves_with_path(single)
  flat_m = jax.tree_util.tree_leaves(multi)
  assert len(flat_s) == len(flat_m) == 5  # round, body kernel and bias, 8 personal heads (2)
  for (path, s), m in zip(flat_s, flat_m):
    np.testing.assert_allclose(m, s, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
  assert int(multi["server"]["round"]) == 4
  # the round moved the parameters: equality is not of two untouched initialisations
  assert np.abs(multi["server"]["params"]["layers"]["0"]["kernel"]
                - _state(runs["multi"], 2)["server"]["params"]["layers"]["0"]["kernel"]
                ).max() > 1e-3


def test_multihost_run_resumes_from_its_checkpoint_and_process_0_alone_writes(runs):
  history, first = _metrics(runs["multi"]), runs["first"]
  assert [h["round"] for h in first] == [1, 2]
  assert [h["round"] for h in history] == [1, 2, 3, 4]  # one writer: no duplicated records
  # rounds 1-2 came from the checkpoint's history, not recomputed: even the wall clock matches
  assert history[:2] == first
  single = _metrics(runs["single"])
  for h, s in zip(history, single):
    for key in ("train/loss", "personalized/accuracy", "global/accuracy"):
      if key in s:
        assert h[key] == pytest.approx(s[key], abs=1e-5)
  # the resumed processes continued (process 0 printed the progress and summary, 1 nothing)
  out0 = open(runs["logs"] / "resumed-0.log").read()
  out1 = open(runs["logs"] / "resumed-1.log").read()
  assert "summary" in out0 and "summary" not in out1
  assert sorted(os.listdir(os.path.join(str(runs["multi"]), "checkpoints"))) == ["2", "4"]


def test_shard_cohort_builds_the_padded_cohort_of_a_single_process():
  """In one process, the process-local path gives exactly the runner's padded host cohort."""
  mesh = sharding.make_mesh((("clients", 4),), jax.devices()[:4])
  calls = []

  def make(ids):
    calls.append(list(ids))
    k = len(ids)
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3) + 100 * ids[:, None, None]
    return Cohort(data={"x": x},
                  mask=np.ones((k, 2, 3), np.float32), weights=np.ones(k, np.float32),
                  client_ids=np.asarray(ids, np.int32))

  cohort = distributed.shard_cohort(make, np.array([3, 5, 6, 9, 11, 12]), mesh)
  assert calls == [[3, 5, 6, 9, 11, 12]]  # one process: all real rows, built once
  assert cohort.mask.shape == (8, 2, 3) and cohort.mask.sharding.spec[0] == "clients"
  np.testing.assert_array_equal(np.asarray(cohort.client_ids),
                                [3, 5, 6, 9, 11, 12, PADDING_ID, PADDING_ID])
  np.testing.assert_array_equal(np.asarray(cohort.weights), [1] * 6 + [0, 0])
  assert np.asarray(cohort.mask)[6:].sum() == 0
  np.testing.assert_array_equal(np.asarray(cohort.data["x"])[5], make(np.array([12])).data["x"][0])


def test_single_process_helpers_and_bad_launch_flags():
  mesh = sharding.make_mesh((("clients", -1),))
  assert distributed.local_rows(16, mesh) == slice(0, 16)  # one process holds every row
  assert distributed.initialize() is False  # nothing asked: stays single-process
  assert distributed.is_main() and distributed.on_main(lambda: 7, "adding") == 7
  x = jax.device_put(np.arange(8.0), sharding.client_sharding(mesh))
  np.testing.assert_array_equal(distributed.fetch({"a": x})["a"], np.arange(8.0))
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("127.0.0.1:1234", num_processes=2)
  with pytest.raises(ValueError, match="process_id=2 must be in"):
    distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
  assert distributed._is_loopback("127.0.0.1:80") and distributed._is_loopback("[::1]:80")
  assert distributed._is_loopback("localhost:80")
  assert not distributed._is_loopback("10.0.0.1:80")


def test_distributed_without_a_cluster_fails_in_one_line():
  """`--distributed` outside SLURM / Open MPI / a TPU pod: a ValueError naming the fix (in a
  fresh process: jax.distributed must come before any device use)."""
  env = {k: v for k, v in os.environ.items() if k not in distributed.CLUSTER_VARIABLES}
  code = ("from fedjax_fm import distributed\n"
          "try:\n  distributed.initialize(from_environment=True)\n"
          "except ValueError as e:\n  print('ValueError:', e)\n")
  proc = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=60)
  assert "ValueError: --distributed: no SLURM, Open MPI or TPU pod environment" in proc.stdout, (
      proc.stdout + proc.stderr[-2000:])
  assert "--coordinator, --num_processes and --process_id" in proc.stdout
