"""Config files: every knob an algorithm reads is in its config, with the defaults of
`configs/_algorithms.py` matching the factories' own; variants parse; bad arguments are refused."""

import glob
import importlib.util
import inspect
import os

import pytest

from configs import _algorithms
from fedjax_fm import algorithms
from fedjax_fm.builders import read_hparams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "[!_]*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_every_baseline_has_defaults_equal_to_its_factory():
  for name, defaults in _algorithms.HPARAMS.items():
    build = algorithms.BUILDERS[name]
    config = _algorithms.algorithm(name)
    assert sorted(config.hparams.to_dict()) == sorted(build.hparams), name
    factory = {"local": algorithms.local_only}.get(name) or getattr(algorithms, name)
    signature = inspect.signature(factory).parameters
    for key, value in config.hparams.to_dict().items():
      want = signature[key].default
      assert value == (tuple(want) if isinstance(want, list) else want), (name, key)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_sets_every_knob_of_its_algorithm(path):
  mod = load(path)
  assert "launch.py" in mod.__doc__
  for variant in (None, "tiny"):
    config = mod.get_config(variant)
    assert config.rounds >= 1
    names = algorithms.builder(config.algorithm.name).hparams
    assert sorted(read_hparams(config, names)) == sorted(names)


@pytest.mark.parametrize("name", sorted(_algorithms.HPARAMS))
def test_the_algorithm_argument_selects_it_with_all_its_knobs(name):
  config = load(os.path.join(ROOT, "configs", "digits.py")).get_config(f"tiny,{name}")
  assert config.algorithm.name == name
  assert config.rounds == 3   # the tiny variant
  read_hparams(config, algorithms.builder(name).hparams)


def test_a_missing_hyperparameter_is_named():
  config = load(os.path.join(ROOT, "configs", "digits.py")).get_config("tiny")
  config.algorithm.name = "fedprox"   # fedavg's knobs: no mu
  with pytest.raises(ValueError, match=r"reads config.algorithm.hparams.mu, which the config "
                     r"does not set.*configs/digits.py:fedprox"):
    read_hparams(config, algorithms.builder("fedprox").hparams)


def test_unknown_config_argument_and_override_are_refused():
  digits = load(os.path.join(ROOT, "configs", "digits.py"))
  with pytest.raises(ValueError, match=r"unknown argument 'huge' of configs/digits.py"):
    digits.get_config("huge")
  with pytest.raises(ValueError, match=r"'fedavg' takes no hyperparameter \['mu'\]"):
    _algorithms.algorithm("fedavg", mu=0.1)
