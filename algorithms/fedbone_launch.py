"""FedBone's builders: config -> grouped data, the split model, the algorithm, its evaluator.

The launcher's tables (`fedjax_fm.experiment`) hold `build_data` (``data.name =
"multitask_suite"``: the multi-task suite), `build_model` (``model.name = "fedbone"``: the general
model G and one `fedjax_fm.models.fedbone.ClientModel` per task group, as a `SplitModel` in
`ModelBundle.split`) and `builder(variant)` (``algorithm.name`` in `ALGORITHMS`:
`fedjax_fm.algorithms.fedbone.fedbone` and its per-group evaluator);
`configs/fedbone_multitask.py` is the config.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
import optax
from flax import nnx

from fedjax_fm import assets
from fedjax_fm.builders import Built, Federation, ModelBundle, chain_config, read_hparams
from fedjax_fm.algorithms.fedbone import (GeneralFn, TaskGroup, client_task_group,
                                          encoder_general_fn, fedbone, general_roles_for,
                                          make_evaluator)
from fedjax_fm.cohort import GroupedData
from fedjax_fm.data import suite, text
from fedjax_fm.models import pretrained, transformer
from fedjax_fm.models.fedbone import ClientModel, ImageTokens, TextTokens

# Config algorithm name -> variant.
ALGORITHMS = {"fedbone": "fedbone", "fedbone_average": "average", "fedbone_local": "local"}
HPARAMS = ("projection", "general_lr", "client_lr", "general_grad", "weighted")


class SplitModel(NamedTuple):
  """What `build_model` hands `build_algorithm`: G, the task groups and the size of one
  example's embedding per group (tokens, hidden size) for the communication count."""
  general_fn: GeneralFn
  groups: tuple[TaskGroup, ...]
  tokens: tuple[int, ...]
  hidden_size: int


def build_data(config) -> Federation:
  """Train and test `GroupedData` of the multi-task suite in ``config.data.groups``
  (`fedjax_fm.data.suite.build_suite` entries), text tokenised for MiniLM."""
  built = suite.build_suite([dict(g) for g in config.data.groups], seed=config.seed,
                            tokenizer=text.minilm_tokenizer(config.data.max_length))
  return Federation(GroupedData(built.names, tuple(g.train for g in built.groups)),
                    GroupedData(built.names, tuple(g.test for g in built.groups)))


def _task_of(name: str, arrays: Mapping[str, np.ndarray]) -> tuple[str, int]:
  """The client task of a group from its target array: int labels [n] (classification),
  int maps [n, H, W] (segmentation) or float maps [n, H, W, C] (regression)."""
  y = arrays.get("y")
  if y is not None and np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
    return "classification", int(y.max()) + 1
  if y is not None and np.issubdtype(y.dtype, np.integer) and y.ndim == 3:
    return "segmentation", max(int(y.max()) + 1, 2)
  if y is not None and np.issubdtype(y.dtype, np.floating) and y.ndim == 4:
    return "regression", int(y.shape[-1])
  raise ValueError(f"group {name!r}: FedBone's client heads take 'y' as int labels [n], int "
                   f"maps [n, H, W] or float maps [n, H, W, C]; got "
                   f"{None if y is None else (y.dtype, y.shape)}")


def build_model(config, data: Federation) -> ModelBundle:
  """The split model (`ModelBundle.split`), its parameters and G's roles for ``config.model``:
  G is the encoder of
  the real all-MiniLM-L6-v2 (``general="minilm"``) or of a tiny random transformer
  (``"tiny"``), trained fully or by LoRA (``train``), optionally cut to its first
  ``num_layers`` layers; one client model per group (image patches for ``x`` images, MiniLM's
  own text embeddings, frozen, for ``input_ids``)."""
  m = config.model
  train = data.train
  lora = m.lora.to_dict() if m.train == "lora" else None
  dropout = {"hidden_dropout": m.dropout, "attention_dropout": m.dropout}
  if m.general == "minilm":
    backbone = pretrained.from_pretrained(assets.path("all-minilm-l6-v2", download=True),
                                          lora=lora, seed=config.seed, config_overrides=dropout)
  elif m.general == "tiny":
    backbone = transformer.TransformerModel(
        transformer.TransformerConfig(hidden_size=m.tiny_hidden, num_layers=2, num_heads=2,
                                      intermediate_size=2 * m.tiny_hidden, vocab_size=30522,
                                      **dropout),
        rngs=nnx.Rngs(config.seed), lora=lora)
  else:
    raise ValueError(f"unknown config.model.general {m.general!r}; use 'minilm' or 'tiny'")
  if m.num_layers:
    backbone.encoder.layers = nnx.List(list(backbone.encoder.layers)[:m.num_layers])
  graphdef, state = nnx.split(backbone.encoder)
  general = nnx.to_pure_dict(state)
  hidden = backbone.config.hidden_size
  rngs = nnx.Rngs(config.seed + 1)
  groups, client_params, tokens = [], {}, []
  for name, fed in zip(train.names, train.groups):
    arrays = fed.arrays
    task, outputs = _task_of(name, arrays)
    if "x" in arrays and arrays["x"].ndim == 4:
      size, channels = arrays["x"].shape[1], arrays["x"].shape[3]
      embedder = ImageTokens(size, m.patch_size, channels, hidden, rngs=rngs)
      tokens.append(1 + (size // m.patch_size) ** 2)
    elif "input_ids" in arrays:
      size = 0
      embedder = TextTokens(backbone.embeddings)
      tokens.append(arrays["input_ids"].shape[1])
    else:
      raise ValueError(f"group {name!r} has neither images 'x' [n, H, W, C] nor 'input_ids'; "
                       "FedBone's client embedders take one of them")
    model = ClientModel(embedder, hidden, task, outputs, bottleneck=m.bottleneck, rngs=rngs,
                        image_size=size or m.patch_size, patch_size=m.patch_size)
    group, p = client_task_group(name, model)
    groups.append(group)
    client_params[name] = p
  split = SplitModel(encoder_general_fn(graphdef), tuple(groups), tuple(tokens), hidden)
  return ModelBundle(params={"general": general, "clients": client_params},
                     roles=general_roles_for(general, m.train), split=split)


def builder(variant: str):
  """The `fedjax_fm.builders.AlgorithmBuilder` of one FedBone variant (``"fedbone"``,
  ``"average"`` or ``"local"``; hyperparameters `HPARAMS`)."""

  def build(config, model: ModelBundle, data: Federation, execution) -> Built:
    h = read_hparams(config, HPARAMS)
    split: SplitModel = model.split
    if split is None:
      raise ValueError(f"algorithm {config.algorithm.name!r} needs FedBone's split model; set "
                       "config.model.name='fedbone'")
    if config.local_steps is None:
      raise ValueError("FedBone counts split-learning iterations: set config.local_steps (and "
                       "leave config.local_epochs None)")
    per_example = [t * split.hidden_size * 4 for t in split.tokens]  # float32 activations
    alg = fedbone(split.general_fn, split.groups, general_roles=model.roles, variant=variant,
                  projection=h["projection"], general_optimizer=optax.adam(h["general_lr"]),
                  client_optimizer=optax.adam(h["client_lr"]), general_grad=h["general_grad"],
                  weighted=h["weighted"],
                  activation_bytes=[config.local_steps * config.batch_size * b
                                    for b in per_example],
                  aggregation=chain_config(config, data.train.num_clients),
                  execution=execution)
    return Built(alg, make_evaluator(split.general_fn, split.groups, data.test.groups))

  build.hparams = HPARAMS
  return build
