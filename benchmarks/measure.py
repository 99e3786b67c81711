"""Measurement helpers shared by the benchmarks: CPU noise, medians, the matmul peak.

Imported by `round_throughput.py`, the workload modules and `conv_probe.py` (which set
XLA_FLAGS before anything here imports jax).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def progress(msg: str):
  """Progress goes to stderr so that stdout holds only the result tables."""
  print(msg, file=sys.stderr, flush=True)


def _cpu_stat() -> tuple[int, int, int]:
  """(busy, total, steal) jiffies of the whole machine; zeros where /proc/stat is absent."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return 0, 0, 0
  return sum(v[:3]) + sum(v[5:7]), sum(v), v[7]


class Noise:
  """Shares of the machine's CPU time taken, during a with-block, by other processes and by
  the hypervisor (steal). Both should be ~0 for a clean measurement."""

  def __enter__(self):
    self._stat, self._own = _cpu_stat(), sum(os.times()[:2])
    self.other = self.steal = float("nan")
    return self

  def __exit__(self, *exc):
    (b0, t0, s0), (b1, t1, s1) = self._stat, _cpu_stat()
    if t1 > t0:
      hz = os.sysconf("SC_CLK_TCK")
      own = sum(os.times()[:2]) - self._own
      self.other = max(0.0, ((b1 - b0) / hz - own) / ((t1 - t0) / hz))
      self.steal = (s1 - s0) / (t1 - t0)


def autogroup_warning() -> str | None:
  """A warning when `nice` cannot shield this process: with the kernel's autogroup scheduling
  on, CPU time is shared fairly between sessions whatever their nice values, so a niced
  benchmark still splits the cores with every other terminal's jobs."""
  try:
    with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
      enabled = f.read().strip() == "1"
  except OSError:
    return None
  if not enabled:
    return None
  return ("sched_autogroup_enabled=1: nice does not give this run priority over other "
          "sessions' processes; as root, `echo 0 > /proc/sys/kernel/sched_autogroup_enabled` "
          "makes it count")


def median_time(fn, reps: int) -> float:
  """Median seconds of `reps` calls of `fn`, after one untimed call."""
  fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def interleaved_medians(fns: dict, reps: int, calls: int = 3) -> dict[str, float]:
  """Median seconds per call of each fn, timed in interleaved passes (fairer under noise)."""
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      fn()
      for _ in range(calls):
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
  return {name: float(np.median(ts)) for name, ts in times.items()}


def torch_sync(torch_mod, device):
  """A function that waits for the device's queued torch work (a no-op on the CPU)."""
  return torch_mod.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure_peak(torch_mod, torch_device, n: int = 2048, reps: int = 10,
                 dtype: str = "float32") -> dict[str, float]:
  """GFLOP/s of an n^3 matmul in JAX and in torch (median of `reps`).

  float32 runs at HIGHEST precision, so no TF32 on GPUs (as torch.mm's default); bfloat16
  multiplies bf16 operands (the rate a bf16 round can reach).
  """
  flops = 2.0 * n ** 3
  jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  a = jax.random.normal(jax.random.key(0), (n, n), jdt)
  b = jax.random.normal(jax.random.key(1), (n, n), jdt)
  precision = jax.lax.Precision.HIGHEST if dtype == "float32" else None
  dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=precision))
  out = {"jax": flops / median_time(lambda: dot(a, b).block_until_ready(), reps) / 1e9}
  if torch_mod is not None:
    tdt = torch_mod.bfloat16 if dtype == "bfloat16" else torch_mod.float32
    ta = torch_mod.randn(n, n, device=torch_device, dtype=tdt)
    tb = torch_mod.randn(n, n, device=torch_device, dtype=tdt)
    sync = torch_sync(torch_mod, torch_device)

    def mm():
      torch_mod.mm(ta, tb)
      sync()

    out["torch"] = flops / median_time(mm, reps) / 1e9
  return out
