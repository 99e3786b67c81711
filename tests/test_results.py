"""The seed tables: mean ± std (ddof=1) of each run's final metrics, curves, clear errors."""

import dataclasses
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


def test_rebuild_writes_between_markers_only(tmp_path):
  for s, a in enumerate([0.5, 0.7]):
    fake_run(tmp_path / "results" / f"a_s{s}", [0.1, a])
  summary = tmp_path / "results" / "a_s0" / "summary.json"
  record = json.loads(summary.read_text())
  record["per_group"] = {"parity": {"personalized/per_client_accuracy": 0.25}}
  summary.write_text(json.dumps(record))
  spec = results.Table("t", (("A", "results/a_s*"),),
                       (("personalized/accuracy", "pers"),
                        ("group/parity/personalized/per_client_accuracy", "parity"),
                        ("gain/1/personalized/accuracy", "gain")))
  missing = results.Table("m", (("B", "results/b_s*"),))
  spec = dataclasses.replace(spec, rows=(("C", "results/c_s*"),) + spec.rows)
  start, end = results.marker("t")
  text = f"intro\n{start}\nold table\n{end}\nafter\n" + "\n".join(results.marker("m"))
  new, news = results.rebuild(text, (spec, missing), root=str(tmp_path), plots=False)
  assert new.startswith(f"intro\n{start}\n| method | seeds | pers | parity | gain |\n"
                        "|---|---|---|---|---|\n| C | 0 | not run | not run | not run |\n")
  # One run of two has the per-group row: the cell says so rather than averaging one seed.
  # gain/1: the curve's last value minus the one a round before (0.5 - 0.1, 0.7 - 0.1).
  assert f"| A | 2 | 0.600 ± 0.141 | – | 0.500 ± 0.141 |\n{end}\nafter\n" in new
  assert new.endswith("\n".join(results.marker("m")))   # no committed run: left as is
  assert news[1].startswith("m: no committed run")
  assert results.rebuild(new, (spec,), root=str(tmp_path), plots=False)[0] == new


def test_results_md_tables_match_the_committed_runs():
  """Every RESULTS.md table with markers and committed runs under results/ is what
  `python -m fedjax_fm.results --rebuild` writes; at least one table is checked."""
  with open(os.path.join(results.ROOT, "RESULTS.md")) as f:
    text = f.read()
  checked = 0
  for spec in results.TABLES:
    held, rendered = results.section(text, spec.name), results.render(spec)
    if held is not None and rendered is not None:
      assert held == rendered, spec.name
      checked += 1
  assert checked >= 1
