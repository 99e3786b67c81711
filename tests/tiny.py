"""Shared by the builder tests: run a config's tiny variant for two rounds and check what every
run must leave behind (compiled once, every round logged, curves, the resolved config); the
README's commands (tests/test_readme.py) are checked with the same `check_outputs`."""

import importlib.util
import json
import os
import warnings

from fedjax_fm.experiment import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name, arg="tiny"):
  """``configs/<name>.py``'s config for `arg`."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def run_two_rounds(cfg, workdir):
  """Runs `cfg` for two rounds (one evaluation, at the end) in `workdir`; returns the history
  and the summary."""
  cfg.rounds = 2
  cfg.eval_every = 2
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    history = run(cfg, str(workdir), progress=False)
  # Every round (grouped ones too: all groups in one program) compiles once.
  assert not [w for w in caught if "the round compiled" in str(w.message)]
  assert [h["round"] for h in history] == [1, 2]
  return history, check_outputs(workdir, 2)


def check_outputs(workdir, rounds):
  """What every run must leave in `workdir` after `rounds` rounds (the last one evaluated):
  the metric log up to it with an accuracy, curves, the resolved config; returns the summary."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in records] == list(range(1, rounds + 1))
  assert 0.0 <= records[-1]["personalized/accuracy"] <= 1.0
  assert (workdir / "curves.png").stat().st_size > 0
  assert (workdir / "config.json").exists()
  return json.loads((workdir / "summary.json").read_text())
