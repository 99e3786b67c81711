"""A run from a config: the data, model and algorithm tables, and `run`, the library's entry
point (`launch.py` is flags around it).

  config -> validate_config -> DATASETS[data.name] -> MODELS[model.name]
         -> algorithms.BUILDERS[algorithm.name] -> fedjax_fm.train.train

Each table maps a config name to a builder of the one signature of `fedjax_fm.builders`; adding
a data set, a model or an algorithm is a function and one line in its table. Configuration
mistakes are ValueErrors naming the key and the fix, raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import json

from fedjax_fm import algorithms, distributed, rundir, sharding
from fedjax_fm.protocol import ClientExecution, default_execution
from fedjax_fm.builders import Built, Federation, ModelBundle, read_hparams, validate_config
from fedjax_fm.data import builders as data_builders
from fedjax_fm.data import lm as lm_data
from fedjax_fm.data import shakespeare_lm
from fedjax_fm.data import partition
from fedjax_fm.models import builders as model_builders
from fedjax_fm.models.partitioning import param_shardings
from fedjax_fm.train import train

# config.data.name -> (config) -> Federation
DATASETS = {
    "digits": data_builders.digits_data,
    "shakespeare_play": data_builders.shakespeare_play_data,
    "digits_vqa": data_builders.digits_vqa_data,
    "synthetic_lm": lm_data.synthetic_lm_data,      # token sequences for decoder LMs
    "shakespeare_lm": shakespeare_lm.shakespeare_lm_data,  # roles' speeches, character tokens
    **algorithms.DATASETS,   # an algorithm's own (FedBone's multi-task suite, TAP's pairs)
}

# config.model.name -> (config, Federation) -> ModelBundle
MODELS = {
    "mlp": model_builders.small_model,
    "cnn": model_builders.small_model,
    "minilm": model_builders.pretrained_encoder,
    "pretrained": model_builders.pretrained_encoder,
    "decoder": model_builders.decoder_model,        # Llama/Mistral/Qwen with LoRA
    **algorithms.MODELS,     # an algorithm's own (FedBone's split model, TAP's superset)
}


def _lookup(table, name, what):
  if name not in table:
    raise ValueError(f"unknown {what} {name!r}; available: {sorted(table)}")
  return table[name]


def build_data(config) -> Federation:
  """The data set's federation, with clients that hold no training or test examples refused or
  excluded as ``config.data.empty_clients`` says (`partition.handle_empty_clients`); the
  number excluded is ``Federation.excluded_clients``."""
  data = _lookup(DATASETS, config.data.name, "data set")(config)
  train, test, groups, excluded = partition.handle_empty_clients(
      data.train, data.test, data.client_groups, config.data.empty_clients)
  return dataclasses.replace(data, train=train, test=test, client_groups=groups,
                             excluded_clients=excluded)


def build_model(config, data: Federation) -> ModelBundle:
  return _lookup(MODELS, config.model.name, "model")(config, data)


def build_execution(config, mesh) -> ClientExecution:
  """``config.execution``: a strategy of `ClientExecution`, or ``"auto"``, the measured
  fastest on this backend (`default_execution`)."""
  ex = config.execution
  if ex.strategy == "auto":
    return default_execution(mesh)
  return ClientExecution(ex.strategy, ex.chunk_size, ex.scan_unroll, mesh=mesh)


def build_algorithm(config, model: ModelBundle, data: Federation,
                    execution: ClientExecution) -> Built:
  return algorithms.builder(config.algorithm.name)(config, model, data, execution)


def run(config, workdir: str | None = None, *, resume: bool = False, overwrite: bool = False,
        allow_config_change: bool = False, fallback_checkpoint: bool = False,
        progress: bool = True) -> list[dict]:
  """Builds everything from `config` and trains; returns the metric history.

  Args:
    config: an experiment config (``configs/*.py``).
    workdir: where the run's files go (none written if None).
    resume, overwrite, allow_config_change, fallback_checkpoint: see `launch.py`'s flags.
    progress: show the progress bar and print the summary.

  Raises:
    ValueError: a configuration mistake, before anything in `workdir` is touched.
  """
  validate_config(config)
  if workdir:  # an unusable workdir fails before minutes of data and model building
    rundir.check_writable(workdir)
  # An unknown algorithm or a missing hyperparameter fails before any data is built.
  read_hparams(config, algorithms.builder(config.algorithm.name).hparams)
  data = build_data(config)
  model = build_model(config, data)
  mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
  built = build_algorithm(config, model, data, build_execution(config, mesh))
  if "fsdp" in mesh.axis_names and built.params is not None:
    raise ValueError(f"algorithm {config.algorithm.name!r} lays out its own parameters on this "
                     "model, which an fsdp mesh axis does not shard yet; use a clients-only mesh")
  if config.cohort_size > data.train.num_clients:
    raise ValueError(f"config.cohort_size={config.cohort_size} is larger than the "
                     f"{data.train.num_clients} clients of the federation; lower it")
  if workdir:  # multi-host: process 0 checks and prepares the (shared) workdir for all
    distributed.on_main(lambda: rundir.prepare(
        workdir, config.to_json_best_effort(), resume=resume, overwrite=overwrite,
        allow_config_change=allow_config_change), "preparing the workdir")
  elif resume:
    raise ValueError("--resume needs the --workdir of the run to continue")
  # A mesh with an `fsdp` axis splits the frozen backbone over it (one copy, never per client).
  shardings = (param_shardings(model.params, mesh, model.roles)
               if "fsdp" in mesh.axis_names and built.params is None else None)
  params = model.params if built.params is None else built.params
  return train(built.algorithm, params, data.train, rounds=config.rounds,
               cohort_size=config.cohort_size, batch_size=config.batch_size,
               local_steps=config.local_steps, local_epochs=config.local_epochs,
               seed=config.seed, mesh=mesh, evaluate=built.evaluate,
               eval_every=config.eval_every, workdir=workdir,
               checkpoint_every=config.checkpoint_every,
               keep_checkpoints=config.keep_checkpoints, resume=resume,
               fallback_checkpoint=fallback_checkpoint, client_groups=data.client_groups,
               param_shardings=shardings, max_bad_rounds=config.max_bad_rounds,
               run_config=json.loads(config.to_json_best_effort()),
               allow_config_change=allow_config_change,
               excluded_clients=data.excluded_clients, samples=built.samples,
               progress=progress)
