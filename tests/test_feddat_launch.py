"""FedDAT's builder (`algorithms/feddat_launch.py`): its configs run end to end, evaluation has
the DAT (personalized) and A_s (global) modes, and its hyperparameters come from the config."""

import pytest

from tests import tiny
from fedjax_fm.experiment import run


def test_feddat_text_tiny_runs_with_personalized_and_global_modes(tmp_path):
  history, _ = tiny.run_two_rounds(tiny.config("feddat_text"), tmp_path)
  assert {"personalized/accuracy", "global/accuracy", "train/dat_loss"} <= set(history[-1])


def test_feddat_vqa_tiny_reports_one_row_per_question_family(tmp_path):
  config = tiny.config("feddat_vqa")
  _, summary = tiny.run_two_rounds(config, tmp_path)
  assert sorted(summary["per_group"]) == sorted(config.data.families)


@pytest.mark.parametrize("change, match", [
    (dict(mu=0.1), r"'feddat' takes no hyperparameter \['mu'\]"),
    (dict(distill=None), r"reads config.algorithm.hparams.distill, which the config does not "
                         r"set"),
])
def test_hyperparameters_are_exactly_the_configs(change, match, tmp_path):
  config = tiny.config("feddat_text")
  hparams = config.algorithm.hparams.to_dict()
  for key, value in change.items():
    if value is None:
      del hparams[key]
    else:
      hparams[key] = value
  config.algorithm.hparams = hparams
  with pytest.raises(ValueError, match=match):
    run(config, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()
