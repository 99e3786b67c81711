"""The round-throughput benchmark's quick mode runs end to end and writes its records."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_throughput_quick(tmp_path):
  out = tmp_path / "w1.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # its own device count
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "round_throughput.py"),
                         "--quick", "--json", str(out)],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| runner |" in proc.stdout
  records = json.loads(out.read_text())
  runners = {r["runner"] for r in records}
  assert "torch_loop" in runners and any(r.startswith("fedjax_fm") for r in runners)
  for r in records:
    assert set(r) >= {"workload", "runner", "s_per_round", "client_steps_per_s", "gflops",
                      "peak_fraction"}
    assert r["s_per_round"] > 0 and 0 < r["peak_fraction"] < 1.5
