"""`fedjax_fm.experiment.run`, the library's entry point: the tables build every generic config,
the digits experiment learns, and every configuration mistake is refused before anything is
written, with the same errors the launcher prints."""

import pytest

from tests import tiny
from fedjax_fm import experiment
from fedjax_fm.experiment import run

# The builders' own tests run theirs; the default and digits configs' tiny variants run as the
# README's commands (tests/test_readme.py).
GENERIC = ("ffgg_digits", "ffgg_vqa")


@pytest.mark.parametrize("name", GENERIC)
def test_tiny_variant_runs_two_rounds(name, tmp_path):
  tiny.run_two_rounds(tiny.config(name), tmp_path)


def test_digits_experiment_learns():
  config = tiny.config("digits", None)
  config.rounds = 40
  history = run(config, progress=False)
  assert history[-1]["personalized/accuracy"] > 0.8  # chance is 0.1


def test_every_table_entry_names_a_builder():
  from fedjax_fm import algorithms
  for table in (experiment.DATASETS, experiment.MODELS, algorithms.BUILDERS):
    assert all(callable(b) for b in table.values())
  assert all(isinstance(b.hparams, tuple) for b in algorithms.BUILDERS.values())


@pytest.mark.parametrize("key, value, match", [
    ("rounds", 0, "config.rounds must be a positive integer"),
    ("batch_size", -8, "config.batch_size must be a positive integer"),
    ("local_steps", 2, "set exactly one of config.local_steps and config.local_epochs"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be a positive integer"),
    ("checkpoint_every", -1, "config.checkpoint_every must be an integer >= 0"),
    ("algorithm.hparams.client_lr", 0.0, "learning rate .*client_lr must be positive"),
    ("algorithm.hparams.client_lr", float("inf"), "client_lr must be finite"),
    ("algorithm.hparams.server_lr", float("nan"), "server_lr must be finite"),
    ("cohort_size", 9, r"cohort_size=9 is larger than the 8 clients"),
    ("model.name", "resnet", r"unknown model 'resnet'; available: \['cnn', .*'minilm', 'mlp', "
                             r"'pretrained'"),
    ("data.name", "mnist", r"unknown data set 'mnist'; available: \[.*'digits'"),
    ("algorithm.name", "fedsgd", r"unknown algorithm 'fedsgd'; choose one of \[.*'fedavg'"),
    ("algorithm.name", "fedprox", r"reads config.algorithm.hparams.mu, which the config does "
                                  r"not set"),
    ("data.partition.kind", "zipf", r"unknown partition kind 'zipf'; available: \['iid'"),
    ("data.partition.num_clients", 2000, r"num_clients.*1797"),
])
def test_bad_values_are_refused_before_anything_is_written(key, value, match, tmp_path):
  config = tiny.config("digits")
  config.update_from_flattened_dict({key: value})
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    run(config, str(workdir), progress=False)
  assert not workdir.exists()


def test_unknown_hyperparameter_names_the_accepted_ones():
  config = tiny.config("digits")
  config.algorithm.hparams.learning_rate = 0.1
  with pytest.raises(ValueError, match="takes no hyperparameter.*client_lr"):
    run(config)


def test_partition_that_leaves_a_client_empty_is_refused(tmp_path):
  config = tiny.config("digits")
  config.data.partition.update(kind="dirichlet", num_clients=400, alpha=0.001)
  with pytest.raises(ValueError, match="leaves client .* with no examples; lower num_clients"):
    run(config, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_train_gives_the_same_error_as_the_launcher():
  """The library API (`fedjax_fm.train`) shares the launcher's validation."""
  from fedjax_fm.train import train
  with pytest.raises(ValueError, match="config.batch_size must be a positive integer"):
    train(None, None, None, rounds=1, cohort_size=1, batch_size=0, local_steps=1)
