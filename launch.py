"""Runs a federated experiment from a config file.

  python launch.py                                  # the default: MiniLM + adapters, FedAvg
  python launch.py --config configs/digits.py:tiny --config.rounds=3 --workdir runs/x
  python launch.py --config configs/digits.py:tiny --config.rounds=6 --workdir runs/x --resume
  # multi-host: the same command on every host (README, "Running on clusters")
  python launch.py --distributed --workdir /shared/runs/x          # under srun / mpirun / a TPU pod
  python launch.py --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=0 --workdir ...

This file is the one place a config becomes objects (`build_*`); the loop is `fedjax_fm.train`.
Configuration mistakes end in one line naming the problem and the fix, with exit status 1, before
anything in the workdir is touched.
"""

import os
import sys

import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from fedjax_fm import algorithms, assets, data, distributed, models, roles, rundir, sharding
from fedjax_fm.algorithm import ClientExecution, default_execution
from fedjax_fm.checkpoint import CheckpointError
from fedjax_fm.algorithms import feddat as feddat_lib
from fedjax_fm.algorithms import fedbone_launch
from fedjax_fm.algorithms import fedpft_launch
from fedjax_fm.algorithms import tap_launch
from fedjax_fm.data import suite, text
from fedjax_fm.evaluate import make_evaluator
from fedjax_fm.train import train

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "default.py"),
                                "Experiment config file (path[:variant]).")
flags.DEFINE_string("workdir", None, "Where metrics, curves, checkpoints and the config go.")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its last checkpoint.")
flags.DEFINE_bool("overwrite", False, "Start anew in a --workdir that holds a run (the old run "
                  "is moved to <workdir>/replaced-<time>/, not deleted).")
flags.DEFINE_bool("allow_config_change", False, "Let --resume continue with a different config.")
flags.DEFINE_bool("fallback_checkpoint", False, "If the last checkpoint is damaged, resume from "
                  "the one before it.")
flags.DEFINE_bool("distributed", False, "Multi-host run: initialise jax.distributed from the "
                  "SLURM, Open MPI or Cloud TPU pod environment (one process per task / rank / "
                  "TPU VM worker).")
flags.DEFINE_string("coordinator", None, "Multi-host run with explicit settings: host:port of "
                    "process 0 (needs --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Multi-host run: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host run: this process's index, 0 .. "
                     "num_processes - 1 (process 0 writes metrics and plots).")
FLAGS = flags.FLAGS


def _digits(config):
  arrays = data.load_digits_arrays()
  partition = data.PartitionConfig.from_mapping(config.data.partition)
  parts = data.make_partition(partition, config.seed, labels=arrays["y"])
  return data.split_clients(arrays, parts, config.data.test_fraction, config.seed)


def _shakespeare_play(config):
  d = config.data
  train, test, _ = suite.minilm_play_classification(
      config.seed, partition=data.PartitionConfig.from_mapping(d.partition),
      num_plays=d.num_plays, max_length=d.max_length, examples_per_play=d.examples_per_play,
      test_fraction=d.test_fraction, unit=d.unit)
  return train, test


def _digits_vqa(config):
  """Digit images with questions (one question family per client: FedDAT's domains)."""
  d = config.data
  group = suite.digits_vqa_group(data.PartitionConfig.from_mapping(d.partition), seed=config.seed,
                                 test_fraction=d.test_fraction, families=tuple(d.families),
                                 tokenizer=text.minilm_tokenizer(d.max_length))
  return group.train, group.test, list(group.client_keys)


DATASETS = {"digits": _digits, "shakespeare_play": _shakespeare_play, "digits_vqa": _digits_vqa,
            "multitask_suite": fedbone_launch.build_data,  # GroupedData: one group per task
            "tap_suite": tap_launch.suite_data}


def build_data(config):
  """(train, test, client groups) of `config.data.name`: federations with a test split per
  client, and a group name per client (its domain, for the summary's per-group rows) or None."""
  if config.data.name not in DATASETS:
    raise ValueError(f"unknown data set {config.data.name!r}; available: {sorted(DATASETS)}")
  train_data, test_data, *groups = DATASETS[config.data.name](config)
  return train_data, test_data, (groups[0] if groups else None)


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
VISION_TEXT_INPUTS = TEXT_INPUTS + ("image",)  # the model's 4th positional input: pixel_values


def _small_model(config, train_data):
  example = train_data.arrays["x"]
  num_classes = int(train_data.arrays["y"].max()) + 1
  rngs = nnx.Rngs(config.seed)
  if config.model.name == "mlp":
    model = models.MLP(int(example[0].size), num_classes, hidden=tuple(config.model.hidden),
                       rngs=rngs)
  else:
    model = models.SimpleCNN(example.shape[1:], num_classes, rngs=rngs)
  graphdef, params = models.functional(model)
  return graphdef, params, roles.assign_roles(params), "x"


def _pretrained(config, train_data):
  m = config.model
  path = assets.path("all-minilm-l6-v2", download=True) if m.name == "minilm" else m.path
  if not path:
    raise ValueError("config.model.path must name a local Hugging Face folder for "
                     "model.name='pretrained'")
  head = dict(m.head.to_dict(), num_classes=int(train_data.arrays["y"].max()) + 1)
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if m.dtype not in dtypes:
    raise ValueError(f"unknown config.model.dtype {m.dtype!r}; use one of {sorted(dtypes)}")
  overrides = ({} if m.dropout is None else
               {"hidden_dropout": m.dropout, "attention_dropout": m.dropout})
  # A text checkpoint with `model.image` reads images too (fresh patch embeddings, ViLT-style).
  image = m.image.to_dict() if "image" in m else None
  adapters = None if m.adapters is None else m.adapters.to_dict()
  lora = None if m.get("lora") is None else m.lora.to_dict()  # LoRA branches (FedPFT)
  model = models.from_pretrained(path, adapters=adapters, lora=lora, head=head,
                                 dtype=dtypes[m.dtype], seed=config.seed,
                                 config_overrides=overrides, image=image)
  graphdef, params = models.functional(model)
  role_tree = models.transformer_roles(params, trainable=tuple(m.trainable),
                                       personal=tuple(m.personal))
  return graphdef, params, role_tree, VISION_TEXT_INPUTS if image else TEXT_INPUTS


MODELS = {"mlp": _small_model, "cnn": _small_model, "minilm": _pretrained,
          "pretrained": _pretrained, "fedbone": fedbone_launch.build_model,
          "tap": tap_launch.build_model}


def build_model(config, train_data):
  """(graphdef, params, roles, input keys) of `config.model.name`."""
  if config.model.name not in MODELS:
    raise ValueError(f"unknown model {config.model.name!r}; available: {sorted(MODELS)}")
  return MODELS[config.model.name](config, train_data)


def build_execution(config, mesh):
  ex = config.execution
  if ex.strategy == "auto":
    return default_execution(mesh)
  return ClientExecution(ex.strategy, ex.chunk_size, ex.scan_unroll, mesh=mesh)


def _feddat(config, graphdef, params, role_tree, input_keys, execution):
  """FedDAT calls the model with different adapter mixes, so it is wired with the model's
  graphdef rather than one loss; evaluation uses the DAT mix (personalized: A_c with the copy of
  A_s and the client's head) and A_s alone (global, heads averaged)."""
  hparams = config.algorithm.hparams.to_dict()
  accepted = {"client_lr", "teacher_weights", "temperature", "weighted"}
  unknown = sorted(set(hparams) - accepted)
  if unknown:
    raise ValueError(f"algorithm 'feddat' takes no hyperparameter {unknown}; it takes "
                     f"{sorted(accepted)}")
  client_lr = hparams.pop("client_lr", 1e-4)
  if "teacher_weights" in hparams:
    hparams["teacher_weights"] = tuple(hparams["teacher_weights"])
  names = tuple(config.model.adapters.names)
  task = feddat_lib.classification_task_loss("y")
  alg = feddat_lib.feddat(feddat_lib.model_logits_fn(graphdef, input_keys), role_tree, params,
                          task_loss=task, adapter_names=names,
                          client_optimizer=feddat_lib.default_client_optimizer(client_lr),
                          execution=execution, **hparams)
  mixes = feddat_lib.adapter_weights_by_mode(names, hparams.get("teacher_weights", (0.5, 0.5)))
  eval_logits = feddat_lib.model_logits_fn(graphdef, input_keys, train=False)

  def evaluator(test_data):
    personal = make_evaluator(feddat_lib.adapter_mix_loss(eval_logits, task, mixes["dat"]),
                              test_data, modes=("personalized",))
    global_ = make_evaluator(feddat_lib.adapter_mix_loss(eval_logits, task, mixes["global"]),
                             test_data, modes=("global",))
    return lambda server_params, clients: {**personal(server_params, clients),
                                           **global_(server_params, clients)}

  return alg, evaluator


def build_algorithm(config, graphdef, params, role_tree, input_keys, execution):
  """(algorithm, test data -> evaluate function) of `config.algorithm`."""
  if config.algorithm.name == "feddat":
    return _feddat(config, graphdef, params, role_tree, input_keys, execution)
  if config.algorithm.name in fedbone_launch.ALGORITHMS:  # graphdef: a fedbone_launch.SplitModel
    return fedbone_launch.build_algorithm(config, graphdef, params, role_tree, execution)
  if config.algorithm.name == "fedpft":
    return fedpft_launch.build_algorithm(config, graphdef, params, role_tree, input_keys,
                                         execution)
  if config.algorithm.name == "tap":
    return tap_launch.build_algorithm(config, graphdef, params, role_tree, execution)
  if config.algorithm.name not in algorithms.REGISTRY:
    special = ["feddat", "fedpft", "tap", *fedbone_launch.ALGORITHMS]
    raise ValueError(f"unknown algorithm {config.algorithm.name!r}; choose one of "
                     f"{sorted([*algorithms.REGISTRY, *special])}")
  alg = algorithms.build(config.algorithm.name, models.classification_loss(graphdef, input_keys),
                         role_tree, params, execution, **config.algorithm.hparams.to_dict())
  eval_loss = models.classification_loss(graphdef, input_keys, train=False)
  return alg, lambda test_data: make_evaluator(eval_loss, test_data)


def check_config(config):
  """Value checks no builder makes on its own."""
  for name in ("rounds", "batch_size", "cohort_size", "eval_every", "local_steps",
               "local_epochs"):
    if config[name] is not None and not config[name] > 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")
  if (config.local_steps is None) == (config.local_epochs is None):
    raise ValueError("set exactly one of config.local_steps and config.local_epochs")
  for name, value in config.algorithm.hparams.items():
    if name.endswith("lr") and not value > 0:
      raise ValueError(f"learning rate config.algorithm.hparams.{name} must be positive, got "
                       f"{value}")


def run(config, workdir=None, *, resume=False, overwrite=False, allow_config_change=False,
        fallback_checkpoint=False, progress=True):
  """Builds everything from `config` and trains; returns the metric history."""
  check_config(config)
  train_data, test_data, client_groups = build_data(config)
  graphdef, params, role_tree, input_keys = build_model(config, train_data)
  mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
  alg, evaluate_fn = build_algorithm(config, graphdef, params, role_tree, input_keys,
                                     build_execution(config, mesh))
  if config.cohort_size > train_data.num_clients:
    raise ValueError(f"config.cohort_size={config.cohort_size} is larger than the "
                     f"{train_data.num_clients} clients of the federation; lower it")
  if workdir:  # multi-host: process 0 checks and prepares the (shared) workdir for all
    distributed.on_main(lambda: rundir.prepare(
        workdir, config.to_json_best_effort(), resume=resume, overwrite=overwrite,
        allow_config_change=allow_config_change), "preparing the workdir")
  elif resume:
    raise ValueError("--resume needs the --workdir of the run to continue")
  evaluate = evaluate_fn(test_data)
  # A mesh with an `fsdp` axis splits the frozen backbone over it (one copy, never per client).
  shardings = (models.param_shardings(params, mesh, role_tree)
               if "fsdp" in mesh.axis_names else None)
  return train(alg, params, train_data, rounds=config.rounds, cohort_size=config.cohort_size,
               batch_size=config.batch_size, local_steps=config.local_steps,
               local_epochs=config.local_epochs, seed=config.seed,
               mesh=mesh, evaluate=evaluate, eval_every=config.eval_every, workdir=workdir,
               checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
               resume=resume, fallback_checkpoint=fallback_checkpoint,
               client_groups=client_groups, param_shardings=shardings, progress=progress)


def parse_flags(argv):
  """absl's flag parsing, with config mistakes reported in one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that's absent
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: unknown config key {str(e).strip(chr(34))} in {bad}; check the spelling "
             "against the config file")
  except Exception as e:  # pylint: disable=broad-except  # a config file that fails to load
    sys.exit(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
    logging.set_verbosity(logging.WARNING)
  try:
    # Before anything touches a device: a multi-host run joins its processes first.
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                           from_environment=FLAGS.distributed)
    run(FLAGS.config, FLAGS.workdir, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
        allow_config_change=FLAGS.allow_config_change,
        fallback_checkpoint=FLAGS.fallback_checkpoint)
  except (ValueError, FileNotFoundError, CheckpointError) as e:
    # configuration and input mistakes: one line, non-zero exit, nothing already written lost
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
