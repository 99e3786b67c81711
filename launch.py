"""Runs a federated experiment from a config file.

  python launch.py                                            # the embedded default
  python launch.py --config configs/default.py:tiny --config.rounds=3 --workdir runs/x

This file is the one place a config becomes objects (`build_*`); the loop is `fedjax_fm.train`.
"""

import json
import os
import sys

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from fedjax_fm import algorithms, data, models, roles, sharding
from fedjax_fm.algorithm import ClientExecution, default_execution
from fedjax_fm.evaluate import make_evaluator
from fedjax_fm.train import train

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "default.py"),
                                "Experiment config file (path[:variant]).")
flags.DEFINE_string("workdir", None, "Where metrics, curves and the config are written.")
FLAGS = flags.FLAGS


def build_data(config):
  if config.data.name != "digits":
    raise ValueError(f"unknown data set {config.data.name!r}; available: ['digits']")
  return data.digits_federation(config.data.num_clients, config.seed, config.data.test_fraction)


def build_model(config, train_data):
  example = train_data.arrays["x"]
  num_classes = int(train_data.arrays["y"].max()) + 1
  rngs = nnx.Rngs(config.seed)
  if config.model.name == "mlp":
    model = models.MLP(int(example[0].size), num_classes, hidden=tuple(config.model.hidden),
                       rngs=rngs)
  elif config.model.name == "cnn":
    model = models.SimpleCNN(example.shape[1:], num_classes, rngs=rngs)
  else:
    raise ValueError(f"unknown model {config.model.name!r}; available: ['mlp', 'cnn']")
  return models.functional(model)


def build_execution(config, mesh):
  ex = config.execution
  if ex.strategy == "auto":
    return default_execution(mesh)
  return ClientExecution(ex.strategy, ex.chunk_size, ex.scan_unroll, mesh=mesh)


def run(config, workdir=None):
  """Builds everything from `config` and trains; returns the metric history."""
  train_data, test_data = build_data(config)
  graphdef, params = build_model(config, train_data)
  mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
  alg = algorithms.build(config.algorithm.name, models.classification_loss(graphdef),
                         roles.assign_roles(params), params, build_execution(config, mesh),
                         **config.algorithm.hparams.to_dict())
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  evaluate = make_evaluator(models.classification_loss(graphdef, train=False), test_data)
  return train(alg, params, train_data, rounds=config.rounds, cohort_size=config.cohort_size,
               batch_size=config.batch_size, local_epochs=config.local_epochs, seed=config.seed,
               mesh=mesh, evaluate=evaluate, eval_every=config.eval_every, workdir=workdir)


def main(argv):
  del argv
  try:
    history = run(FLAGS.config, FLAGS.workdir)
  except ValueError as e:  # configuration mistakes: one line, non-zero exit, nothing lost
    sys.exit(f"error: {e}")
  print(json.dumps({k: round(v, 4) for k, v in history[-1].items()}))


if __name__ == "__main__":
  app.run(main)
