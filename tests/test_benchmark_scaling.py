"""The scaling benchmark's quick mode: runs in seconds, same results on every mesh, a plot."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import scaling  # noqa: E402  # pylint: disable=wrong-import-position


def test_quick_scaling_run_is_consistent_across_devices(tmp_path, capsys):
  out = scaling.main(["--quick", "--json", str(tmp_path / "s.json"),
                      "--plot", str(tmp_path / "s.png")])
  devices = out["devices"]
  assert [r["devices"] for r in devices] == [1, 2]
  for r in devices:
    assert r["compilations"] == 1 and r["s_per_round"] > 0
    # the same rounds on 1 and 2 devices: the same parameters up to float rounding
    assert r["max_diff_vs_first"] < 1e-5
  assert devices[0]["max_diff_vs_first"] == 0.0
  assert devices[1]["loss"] == pytest.approx(devices[0]["loss"], abs=1e-5)
  assert [r["cohort"] for r in out["cohorts"]] == [8, 32]
  assert all(r["clients_per_s"] > 0 and r["cohort_build_s"] > 0 for r in out["cohorts"])
  printed = capsys.readouterr().out
  assert "| devices | s/round |" in printed and "| cohort | s/round |" in printed
  assert (tmp_path / "s.json").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0


def test_scaling_refuses_more_devices_than_there_are():
  with pytest.raises(SystemExit):
    scaling.parse_args(["--devices", "1,4096"])


def test_client_memory_counts_the_bytes_of_one_clients_personal_leaves():
  """The memory benchmark's bytes per client, on an MLP whose head is personal: worked out by
  hand, 64 x 10 kernel + 10 bias float32 = 650 x 4 bytes."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import client_memory  # pylint: disable=import-outside-toplevel
  from fedjax_fm import models, roles  # pylint: disable=import-outside-toplevel
  _, params = models.functional(models.MLP(8, 10, hidden=(64,), rngs=nnx.Rngs(0)))
  personal_head = roles.assign_roles(params, personal="head")
  assert client_memory.bytes_per_client(params, personal_head) == 650 * 4
  assert client_memory.bytes_per_client(params, roles.assign_roles(params)) == 0
  rows = [{"setting": "head personal", "params_per_client": 650, "bytes_per_client": 2600,
           "clients_per_gib": 2**30 // 2600, "server_bytes": 4e6, "round_workspace_bytes": 1e6,
           "gpu80_clients": {"75%": 1, "95%": 2}, "verified_clients": 8,
           "verified_bytes": 20800, "verified_bytes_per_device": 2600, "rss_growth_bytes": 0,
           "compile_s": 1.0, "round_s": 0.1}]
  meta = {"bottleneck": 32, "adapters": "a", "backend": "cpu", "devices": 8, "budget_gib": 1}
  lines = client_memory.table(rows, meta).splitlines()
  assert lines[3].startswith("| head personal | 650 | 2,600 | 412,977 |")
