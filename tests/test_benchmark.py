"""The round-throughput benchmark's quick modes run end to end and write their records."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"workload", "runner", "s_per_round", "client_steps_per_s", "gflops", "peak_fraction"}


def run_quick(tmp_path, workload: str, *extra: str) -> list[dict]:
  out = tmp_path / f"{workload}.json"
  # Its own device count; the tests' XLA:CPU optimisation level (conftest.py): a smoke test.
  env = dict(os.environ, XLA_FLAGS=" ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "round_throughput.py"),
                         "--workload", workload, "--quick", "--json", str(out), *extra],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| runner |" in proc.stdout
  records = json.loads(out.read_text())
  for r in records:
    assert set(r) >= FIELDS
    assert r["workload"] == workload.upper()
    assert r["s_per_round"] > 0 and 0 < r["peak_fraction"] < 1.5
  return records


def test_w1_quick(tmp_path):
  runners = {r["runner"] for r in run_quick(tmp_path, "w1")}
  assert "torch_loop" in runners and any(r.startswith("fedjax_fm") for r in runners)


def test_w2_quick(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  records = run_quick(tmp_path, "w2")
  runners = [r["runner"] for r in records]
  # All three runner kinds: the engine round, the per-client JAX loop, the PyTorch loop.
  assert any(r.startswith("fedjax_fm[") for r in runners), runners
  assert "jax_client_loop" in runners and "torch_loop" in runners, runners
  # No dropout in W2: after the same first round every runner holds the same adapters and
  # head (float32 rounding apart), so they time the same computation.
  for r in records:
    assert r["rel_diff_vs_first"] < 1e-4, (r["runner"], r["rel_diff_vs_first"])


def test_w3_quick(tmp_path):
  """W3 on the tiny decoder: the engine round and the per-client jitted loop train the same
  LoRA factors (no dropout), so they agree after round 1. (The transformers + peft loop's
  agreement is checked by every W3 run of the benchmark, 2e-8 at 100M in BENCHMARKS.md; it is
  left out here for CI time: building a torch Llama and importing peft cost more than the
  rest of the test.)"""
  records = run_quick(tmp_path, "w3", "--runners", "fedjax_fm[default],jax_client_loop",
                      "--rounds", "1")
  assert [r["runner"].startswith("fedjax_fm[") for r in records] == [True, False], records
  for r in records:
    assert r["tokens_per_s"] > 0 and r["rel_diff_vs_first"] < 1e-4, r
