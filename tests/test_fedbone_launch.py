"""FedBone's builders (`algorithms/fedbone_launch.py`): the multi-task suite with one client
model per task group runs end to end, task kinds are read from the targets, and a split model
is required."""

import numpy as np
import pytest

from tests import tiny
from fedjax_fm.algorithms import fedbone_launch


def test_fedbone_multitask_tiny_runs_every_group_in_one_round(tmp_path):
  config = tiny.config("fedbone_multitask")
  history, summary = tiny.run_two_rounds(config, tmp_path)
  groups = [g["builder"] for g in config.data.groups]
  assert len(summary["per_group"]) == len(groups)
  assert all(np.isfinite(v) for k, v in history[-1].items() if k.startswith("train/"))


def test_task_kind_is_read_from_the_targets():
  assert fedbone_launch._task_of("c", {"y": np.array([0, 3, 1])}) == ("classification", 4)
  assert fedbone_launch._task_of("s", {"y": np.zeros((2, 4, 4), np.int32)}) == \
      ("segmentation", 2)
  assert fedbone_launch._task_of("r", {"y": np.zeros((2, 4, 4, 3), np.float32)}) == \
      ("regression", 3)
  with pytest.raises(ValueError, match="group 'x': FedBone's client heads take 'y'"):
    fedbone_launch._task_of("x", {"y": np.zeros((2, 3), np.float32)})


def test_fedbone_needs_its_split_model(tmp_path):
  config = tiny.config("digits")
  config.algorithm = tiny.config("fedbone_multitask").algorithm
  with pytest.raises(ValueError, match="needs FedBone's split model; set "
                                       "config.model.name='fedbone'"):
    tiny.run(config, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_results_sweep_runs_fedbone_and_its_two_baselines_on_the_long_variant():
  """benchmarks/fedbone_experiments.py's methods are the launcher's FedBone variants, and its
  `long` config has more server steps than the default and differs from it only in the rounds,
  the evaluations, the general model's depth and the iterations per round."""
  from benchmarks import fedbone_experiments
  assert {fedbone_launch.ALGORITHMS[m] for m in fedbone_experiments.METHODS} == \
      {"fedbone", "average", "local"}
  long, default = (tiny.config("fedbone_multitask", v) for v in ("long", None))
  assert long.rounds >= 4 * default.rounds and long.rounds % long.eval_every == 0
  for key in ("rounds", "eval_every", "local_steps"):
    long[key] = default[key]
  long.model.num_layers = default.model.num_layers
  assert long.to_dict() == default.to_dict()
