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
