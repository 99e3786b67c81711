"""The launcher: every config builds, every tiny variant runs, bad input fails clearly."""

import glob
import json
import os
import subprocess
import sys
import warnings

import pytest

import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_builds_and_documents_its_command(path):
  mod = _load(path)
  assert "launch.py" in mod.__doc__
  for variant in (None, "tiny"):
    assert mod.get_config(variant).rounds >= 1


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_tiny_variant_runs_two_rounds(path, tmp_path):
  config = _load(path).get_config("tiny")
  config.rounds = 2
  config.eval_every = 2
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    history = launch.run(config, str(tmp_path), progress=False)
  # Every config's round (grouped ones too: all groups in one program) compiles once.
  assert not [w for w in caught if "the round compiled" in str(w.message)]
  assert [h["round"] for h in history] == [1, 2]
  assert 0.0 <= history[-1]["personalized/accuracy"] <= 1.0
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["round"] == 2
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert (tmp_path / "config.json").exists()
  if config.data.name == "digits_vqa":  # clients are question families: one summary row each
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["per_group"]) == sorted(config.data.families)


def test_digits_experiment_learns():
  config = _load(os.path.join(ROOT, "configs", "digits.py")).get_config()
  config.rounds = 40
  history = launch.run(config, progress=False)
  assert history[-1]["personalized/accuracy"] > 0.8  # chance is 0.1


def test_bad_config_exits_nonzero_with_one_line():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
       os.path.join(ROOT, "configs", "digits.py:tiny"), "--config.algorithm.name=fedsgd"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert "unknown algorithm 'fedsgd'" in proc.stderr.strip().splitlines()[-1]


def test_unknown_hyperparameter_names_the_accepted_ones():
  config = _load(os.path.join(ROOT, "configs", "digits.py")).get_config("tiny")
  config.algorithm.hparams.learning_rate = 0.1
  with pytest.raises(ValueError, match="takes no hyperparameter.*client_lr"):
    launch.run(config)


def _launch(*args, **env):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
       os.path.join(ROOT, "configs", "digits.py:tiny"), *args],
      capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **env})


def test_unknown_config_key_is_one_line_not_a_traceback():
  proc = _launch("--config.learning_rate=0.1")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: unknown config key 'learning_rate' in ['--config.learning_rate=0.1']; check the "
      "spelling against the config file"]


@pytest.mark.parametrize("key, value, match", [
    ("rounds", 0, "config.rounds must be positive"),
    ("batch_size", -8, "config.batch_size must be positive"),
    ("algorithm.hparams.client_lr", 0.0, "learning rate .*client_lr must be positive"),
    ("cohort_size", 9, r"cohort_size=9 is larger than the 8 clients"),
    ("model.name", "resnet", r"unknown model 'resnet'; available: \['cnn', .*'minilm', 'mlp', 'pretrained'"),
    ("data.name", "mnist", r"unknown data set 'mnist'; available: \[.*'digits'"),
    ("algorithm.name", "fedsgd", r"unknown algorithm 'fedsgd'; choose one of \[.*'fedavg'"),
    ("data.partition.kind", "zipf", r"unknown partition kind 'zipf'; available: \['iid'"),
    ("data.partition.num_clients", 2000, r"num_clients.*1797"),
])
def test_bad_values_are_refused_before_anything_is_written(key, value, match, tmp_path):
  config = _load(os.path.join(ROOT, "configs", "digits.py")).get_config("tiny")
  config.update_from_flattened_dict({key: value})
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    launch.run(config, str(workdir), progress=False)
  assert not workdir.exists()


def test_partition_that_leaves_a_client_empty_is_refused(tmp_path):
  config = _load(os.path.join(ROOT, "configs", "digits.py")).get_config("tiny")
  config.data.partition.update(kind="dirichlet", num_clients=400, alpha=0.001)
  with pytest.raises(ValueError, match="leaves client .* with no examples; lower num_clients"):
    launch.run(config, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_missing_data_files_name_the_fetch_command(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
       os.path.join(ROOT, "configs", "default.py:tiny"), "--workdir", str(tmp_path / "run")],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env={**os.environ, "FEDJAX_FM_CACHE": str(tmp_path / "empty")})
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "not in the cache" in lines[0], proc.stderr[-800:]
  assert "-m fedjax_fm.assets" in lines[0]
  assert not (tmp_path / "run").exists()


def test_feddat_rejects_an_unknown_hyperparameter(tmp_path):
  config = _load(os.path.join(ROOT, "configs", "feddat_text.py")).get_config("tiny")
  config.algorithm.hparams.mu = 0.1
  with pytest.raises(ValueError, match=r"'feddat' takes no hyperparameter \['mu'\]"):
    launch.run(config, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()
