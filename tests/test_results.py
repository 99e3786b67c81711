"""The seed tables: mean ± std (ddof=1) of each run's final metrics, curves, clear errors."""

import json
import os

import pytest

from fedjax_fm import results


def fake_run(path, accs):
  os.makedirs(path)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r, a in enumerate(accs, 1):
      f.write(json.dumps({"round": r, "personalized/accuracy": a}) + "\n")
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump({"final": {"round": len(accs), "personalized/accuracy": accs[-1]}}, f)


def test_table_mean_and_sample_std_over_seeds(tmp_path):
  for s, a in enumerate([0.5, 0.7, 0.9]):
    fake_run(tmp_path / f"a_s{s}", [0.1, a])
  fake_run(tmp_path / "b_s0", [0.2, 0.4])
  os.makedirs(tmp_path / "a_unfinished")   # no summary.json: not counted
  methods = [results.parse_method(f"A={tmp_path}/a_*"), results.parse_method(f"B={tmp_path}/b_*")]
  text = results.table(methods, ["personalized/accuracy", "global/accuracy"])
  rows = text.splitlines()
  assert rows[2] == "| A | 3 | 0.700 ± 0.200 | – |"
  assert rows[3] == "| B | 1 | 0.400 ± 0.000 | – |"
  png = tmp_path / "out" / "curves.png"
  results.plot(methods, ["personalized/accuracy"], str(png))
  assert png.stat().st_size > 1000


def test_bad_specs_say_what_is_wrong(tmp_path, capsys):
  with pytest.raises(ValueError, match="label=glob"):
    results.parse_method("runs/x")
  assert results.main([f"A={tmp_path}/nothing*"]) == 1
  assert "no finished run" in capsys.readouterr().err
