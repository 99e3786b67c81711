"""The one way a config becomes a run's objects: what data, model and algorithm builders take and
give, and the one validation pass every entry point shares.

Three tables map a config's names to builders (`fedjax_fm.experiment`): ``config.data.name`` ->
a data builder, ``config.model.name`` -> a model builder, ``config.algorithm.name`` -> an
algorithm builder (`fedjax_fm.algorithms.BUILDERS`). They have one signature each::

    build_data(config) -> Federation
    build_model(config, federation) -> ModelBundle
    build(config, model: ModelBundle, data: Federation, execution: ClientExecution) -> Built

An algorithm builder names the hyperparameters it reads in its attribute ``hparams`` and reads
every one from the config with no fallback default: a missing key is an error naming it
(`read_hparams`), raised before any data is built. Defaults live in the config files
(``configs/``), so a config file says everything a run does.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from fedjax_fm import privacy, roles as roles_lib
from fedjax_fm.byzantine import ByzantineAttack
from fedjax_fm.chain import ChainConfig
from fedjax_fm.protocol import Algorithm, ClientExecution, LossFn
from fedjax_fm.cohort import FederatedData, GroupedData
from fedjax_fm.evaluate import make_evaluator

PyTree = Any
# evaluate(server params, client states) -> {"<mode>/<metric>": value}
Evaluate = Callable[[PyTree, PyTree], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class SamplePrompts:
  """Generation prompts a data builder offers, so a run shows what its models write
  (`Federation.prompts`; `make_sampler`).

  Attributes:
    clients: [k] the client whose personalized model continues each prompt.
    names: a readable name per prompt's client (e.g. a speaker and play).
    prompts: the prompts' text.
    input_ids, attention_mask: [k, T] the prompts' tokens, LEFT-padded.
    max_new_tokens: tokens generated per prompt (greedy).
    decode: token ids -> text.
  """
  clients: np.ndarray
  names: Sequence[str]
  prompts: Sequence[str]
  input_ids: np.ndarray
  attention_mask: np.ndarray
  max_new_tokens: int
  decode: Callable[[Sequence[int]], str]


@dataclasses.dataclass(frozen=True)
class Federation:
  """What a data builder gives: the clients' training and test data.

  Attributes:
    train, test: `FederatedData` (one client population) or `GroupedData` (one group per
      architecture, e.g. a modality-task pair; the grouped algorithms' input).
    client_groups: a group name per client for the summary's per-group rows (e.g. a client's
      question family), or None.
    excluded_clients: clients left out for having no training or test examples
      (``config.data.empty_clients="exclude"``), counted in the run's summary.
    prompts: generation prompts for a generative model's samples at every evaluation, or None.
  """
  train: FederatedData | GroupedData
  test: FederatedData | GroupedData
  client_groups: Sequence[str] | None = None
  excluded_clients: int = 0
  prompts: SamplePrompts | None = None


@dataclasses.dataclass(frozen=True)
class ModelBundle:
  """What a model builder gives an algorithm builder.

  Attributes:
    params: the initial parameters, a pure pytree (`nnx.split` state as a dict).
    roles: a role per leaf of `params` (`fedjax_fm.roles`: frozen, shared, personal).
    graphdef: the NNX graph definition that `nnx.merge`s with `params` (None for a model that
      is not one module, such as FedBone's split model).
    input_keys: the batch keys the model reads, in its positional order (one key for a model
      that takes one array).
    loss: ``loss(train: bool) -> LossFn``, the model's task loss (per-example loss and metrics
      from params, batch, rng); None where the algorithm brings its own objective.
    split: FedBone's split model (`fedjax_fm.algorithms.fedbone_launch.SplitModel`: the general
      model and one client model per task group), or None.
    derived_metrics: evaluation metrics -> the same with metrics computed from them added
      (a language model's perplexity from its loss), or None.
    generate: ``generate(params, input_ids, attention_mask, max_new_tokens) -> [k, n]`` greedy
      new tokens of a generative model, or None.
    extras: anything else a specific algorithm's builder needs from its model builder, by name.
  """
  params: PyTree
  roles: PyTree
  graphdef: Any = None
  input_keys: tuple[str, ...] | str | None = None
  loss: Callable[[bool], LossFn] | None = None
  split: Any = None
  derived_metrics: Callable[[dict], dict] | None = None
  generate: Callable[..., Any] | None = None
  extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# samples(server params, client states) -> one record per prompt (`make_sampler`)
Samples = Callable[[PyTree, PyTree], list]


class Built(NamedTuple):
  """What an algorithm builder gives the run loop: the algorithm, its evaluation and, for a
  generative model with prompts, the samples written at every evaluation; `params`, the initial
  parameters when the algorithm lays them out differently from the model builder (FedDAT's
  three LoRA adapters on a decoder), else None."""
  algorithm: Algorithm
  evaluate: Evaluate | None
  samples: Samples | None = None
  params: PyTree | None = None


def make_sampler(generate: Callable[..., Any], prompts: SamplePrompts, num_clients: int,
                 personal_rows: Callable[[PyTree], PyTree] | None = None,
                 generate_global: Callable[..., Any] | None = None) -> Samples:
  """samples(server params, client states) -> ``[{"client", "name", "prompt",
  "personalized", "global"}]``: each prompt continued greedily by its client's personalized
  model (the server parameters merged with the client's personal row) and by the global model
  (personal leaves filled with the mean of the `num_clients` clients' rows, as `make_evaluator`
  does). One prompt at a time, so the generation compiles once for all of them.

  Args:
    generate: `ModelBundle.generate`.
    prompts: the data's `SamplePrompts`.
    num_clients: real clients (rows past it are padding).
    personal_rows: the algorithm's `Algorithm.personal_rows` (client states -> personal
      parameter rows), None when the client states are those rows.
    generate_global: the global model's generation where it differs from the personalized
      one's (FedDAT: A_s alone vs the DAT mix); None: `generate`.
  """
  generate_global = generate_global or generate
  def samples(server_params, client_states):
    rows = personal_rows(client_states) if personal_rows is not None else client_states
    rows = jax.tree_util.tree_map(lambda x: x[:num_clients], rows)
    with_row = lambda row: (roles_lib.merge(server_params, row)
                            if jax.tree_util.tree_leaves(row) else server_params)
    global_params = with_row(jax.tree_util.tree_map(lambda x: x.mean(0), rows))
    out = []
    for i, client in enumerate(np.asarray(prompts.clients)):
      own = with_row(jax.tree_util.tree_map(lambda x: x[client], rows))
      ids, mask = prompts.input_ids[i:i + 1], prompts.attention_mask[i:i + 1]
      text = {mode: prompts.decode(np.asarray(gen(params, ids, mask,
                                                  prompts.max_new_tokens))[0])
              for mode, gen, params in (("personalized", generate, own),
                                        ("global", generate_global, global_params))}
      out.append({"client": int(client), "name": prompts.names[i], "prompt": prompts.prompts[i],
                  **text})
    return out

  return samples


# build(config, model, data, execution) -> Built, with an attribute `hparams`: the names of
# the config.algorithm.hparams it reads.
AlgorithmBuilder = Callable[[Any, ModelBundle, Federation, ClientExecution], Built]


# ---- hyperparameters: every one from the config, none defaulted in code ----

def read_hparams(config, names: Sequence[str]) -> dict[str, Any]:
  """``config.algorithm.hparams`` as a dict holding exactly `names`.

  Raises:
    ValueError: a name the config does not set (naming it and where the algorithm's knobs are
      listed), or a key the algorithm does not read (naming the ones it does).
  """
  algorithm = config.algorithm.name
  given = config.algorithm.hparams
  given = dict(given.items()) if given is not None else {}
  unknown = sorted(set(given) - set(names))
  missing = [n for n in names if n not in given]
  if missing:
    extra = f" and sets {unknown}, which it does not read" if unknown else ""
    raise ValueError(f"algorithm {algorithm!r} reads config.algorithm.hparams.{missing[0]}"
                     f"{f' (and {missing[1:]})' if missing[1:] else ''}, which the config "
                     f"does not set{extra}; add it to the config file (the defaults of every "
                     f"baseline are in configs/_algorithms.py), or pick the algorithm by the "
                     f"config argument, e.g. --config configs/digits.py:{algorithm}")
  if unknown:
    raise ValueError(f"algorithm {algorithm!r} takes no hyperparameter {unknown}; it takes "
                     f"{sorted(names)}")
  return {n: _plain(given[n]) for n in names}


def _plain(value):
  """ConfigDict / FrozenConfigDict -> dict and lists -> tuples (hashable, closed-over)."""
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if isinstance(value, list):
    return tuple(value)
  return value


def factory_hparams(factory: Callable[..., Any], wired: Sequence[str] = (),
                    fixed: Mapping[str, Any] | None = None) -> tuple[str, ...]:
  """The keyword hyperparameters of an algorithm factory: its parameters other than the
  positional inputs the builder wires (`wired`) and those it fixes (`fixed`)."""
  skip = set(wired) | set(fixed or {}) | {"execution", "aggregation"}
  out = []
  for p in inspect.signature(factory).parameters.values():
    if p.kind == p.VAR_KEYWORD:
      raise TypeError(f"{factory.__name__} takes **kwargs; name its hyperparameters so a "
                      "config can list them")
    if p.kind == p.KEYWORD_ONLY and p.name not in skip:
      out.append(p.name)
  return tuple(out)


# ---- the one validation pass (launch, the library API and train all call it) ----

# config.data.empty_clients: what a partition that leaves a client without training or test
# examples does: "error" refuses it; "exclude" leaves those clients out of the run (sampling and
# per-client statistics) and the summary counts them.
EMPTY_CLIENTS = ("error", "exclude")

def check_schedule(*, rounds, cohort_size, batch_size, local_steps, local_epochs, eval_every,
                   checkpoint_every=0, keep_checkpoints=1, max_bad_rounds=1) -> None:
  """The run schedule's values; errors name the config key to fix.

  Raises:
    ValueError: a count that is not a positive integer (``checkpoint_every`` may be 0: only
      at the end), or not exactly one of ``local_steps`` and ``local_epochs``.
  """
  values = dict(rounds=rounds, batch_size=batch_size, local_steps=local_steps,
                local_epochs=local_epochs, eval_every=eval_every,
                keep_checkpoints=keep_checkpoints, max_bad_rounds=max_bad_rounds)
  sizes = cohort_size if isinstance(cohort_size, (tuple, list)) else (cohort_size,)
  for i, size in enumerate(sizes):
    values["cohort_size" if len(sizes) == 1 else f"cohort_size[{i}]"] = size
  for name, value in values.items():
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
      raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
  if (local_steps is None) == (local_epochs is None):
    raise ValueError("set exactly one of config.local_steps and config.local_epochs (the other "
                     "None)")
  if not isinstance(checkpoint_every, numbers.Integral) or checkpoint_every < 0:
    raise ValueError(f"config.checkpoint_every must be an integer >= 0 (0: only at the end), "
                     f"got {checkpoint_every!r}")


def check_finite(tree: Mapping[str, Any], prefix: str = "config") -> None:
  """Every number anywhere in a config (nested blocks and lists too) must be finite: an inf or
  NaN hyperparameter, schedule or data option is refused before anything runs."""
  items = tree.items() if hasattr(tree, "items") else enumerate(tree)
  for name, value in items:
    where = f"{prefix}.{name}" if hasattr(tree, "items") else f"{prefix}[{name}]"
    if hasattr(value, "items") or isinstance(value, (list, tuple)):
      check_finite(value, where)
    elif (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and not math.isfinite(value)):
      raise ValueError(f"{where} must be finite, got {value}")


def check_hparams(hparams: Mapping[str, Any]) -> None:
  """Numbers that must be finite (every float hyperparameter, nested ones too) and learning
  rates (``*lr``) that must be positive."""
  check_finite(hparams, "config.algorithm.hparams")
  for name, value in hparams.items():
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      continue
    if name.endswith("lr") and not value > 0:
      raise ValueError(f"learning rate config.algorithm.hparams.{name} must be positive, got "
                       f"{value}")


def validate_config(config) -> None:
  """Checks no builder makes on its own, before anything is built or written."""
  check_schedule(rounds=config.rounds, cohort_size=config.cohort_size,
                 batch_size=config.batch_size, local_steps=config.local_steps,
                 local_epochs=config.local_epochs, eval_every=config.eval_every,
                 checkpoint_every=config.checkpoint_every,
                 keep_checkpoints=config.keep_checkpoints, max_bad_rounds=config.max_bad_rounds)
  if config.data.empty_clients not in EMPTY_CLIENTS:
    raise ValueError(f"config.data.empty_clients must be one of {list(EMPTY_CLIENTS)}, got "
                     f"{config.data.empty_clients!r}")
  check_finite(config)
  mesh = config.mesh
  if not (isinstance(mesh, (tuple, list)) and mesh and all(
      isinstance(axis, (tuple, list)) and len(axis) == 2 and isinstance(axis[0], str)
      and isinstance(axis[1], int) and not isinstance(axis[1], bool)
      and (axis[1] >= 1 or axis[1] == -1) for axis in mesh)):
    raise ValueError(f"config.mesh must be (axis name, size) pairs, size -1 for the remaining "
                     f"devices, e.g. ((\"clients\", -1),); got {mesh!r}")
  if config.algorithm.hparams is not None:
    check_hparams(dict(config.algorithm.hparams.items()))
  if "privacy" in config:
    p = config.privacy
    privacy.check_privacy_values(p.clip_norm, p.noise_multiplier, p.target_epsilon, p.delta)


# ---- the server chain: config.aggregation and config.privacy ----

def chain_config(config, num_clients: int) -> ChainConfig:
  """The server chain the config names (`fedjax_fm.chain.ChainConfig`), privacy calibrated.

  ``config.aggregation`` picks the aggregator and the compression; ``config.privacy`` turns on
  user-level DP-FedAvg when it sets ``noise_multiplier`` or ``target_epsilon``: per-client
  clipping at ``clip_norm`` (adaptive with ``adaptive_clip``), the DP mean and Gaussian noise,
  with ``privacy/epsilon`` reported every round. The sampling rate is cohort_size /
  `num_clients`; ``delta`` None is 1 / `num_clients`. A config without these sections (one
  built by hand) runs the default chain.

  Raises:
    ValueError: a bad privacy value, or a target epsilon the configured rounds cannot meet.
  """
  kwargs = {}
  if "aggregation" in config:
    a = config.aggregation
    kwargs.update(aggregator=a.aggregator, bucket_size=a.bucket_size,
                  trim_fraction=a.trim_fraction, norm_bound=a.norm_bound,
                  compression=a.compression, top_k_fraction=a.top_k_fraction,
                  error_feedback=a.error_feedback)
    if a.attack is not None:
      kwargs["attack"] = ByzantineAttack(kind=a.attack, fraction=a.attacker_fraction,
                                         scale=a.attack_scale)
  p = config.privacy if "privacy" in config else None
  if p is None or (p.noise_multiplier is None and p.target_epsilon is None):
    return ChainConfig(**kwargs)
  privacy.check_privacy_values(p.clip_norm, p.noise_multiplier, p.target_epsilon, p.delta)
  delta = p.delta if p.delta is not None else 1.0 / num_clients
  rate = config.cohort_size / num_clients
  account = dict(accountant=p.accountant, sampling=p.sampling, population=num_clients)
  z = (p.noise_multiplier if p.noise_multiplier is not None else
       privacy.noise_multiplier(p.target_epsilon, rate, config.rounds, delta, **account))
  count_std = 0.0
  z_updates = z
  if p.adaptive_clip and z:
    # Andrew et al. 2021 suggest cohort/20; at least z, so the updates' noise grows <= 2/sqrt(3).
    count_std = (p.count_noise_std if p.count_noise_std is not None
                 else max(config.cohort_size / 20.0, z))
    z_updates = privacy.update_noise_multiplier(z, count_std)
  return ChainConfig(
      **kwargs, clip_norm=p.clip_norm, adaptive_clip=p.adaptive_clip,
      target_quantile=p.target_quantile, clip_learning_rate=p.clip_learning_rate,
      count_noise_std=count_std, noise_multiplier=z_updates,
      # z = 0 clips without noise: no finite epsilon to report.
      epsilons=tuple(privacy.epsilons_per_round(z, rate, config.rounds, delta, **account))
      if z else None)


# ---- the builder of every algorithm that trains one model on its task loss ----

def model_evaluation(model: ModelBundle, data: Federation,
                     personal_rows: Callable[[PyTree], PyTree] | None = None
                     ) -> tuple[Evaluate, Samples | None]:
  """The evaluation of a model trained on its task loss: the loss without dropout on every
  client's test data (personalized and global, `make_evaluator`) with the model's derived
  metrics, and its generation samples when the model generates and the data has prompts.

  Args:
    personal_rows: the algorithm's `Algorithm.personal_rows`, None when its client states are
      the personal parameter rows.
  """
  evaluate = make_evaluator(model.loss(False), data.test)
  if personal_rows is not None:
    evaluate = lambda params, clients, ev=evaluate: ev(params, personal_rows(clients))
  if model.derived_metrics is not None:
    evaluate = lambda params, clients, ev=evaluate: model.derived_metrics(ev(params, clients))
  samples = None
  if model.generate is not None and data.prompts is not None:
    samples = make_sampler(model.generate, data.prompts, data.test.num_clients, personal_rows)
  return evaluate, samples


def loss_builder(factory: Callable[..., Algorithm], **fixed) -> AlgorithmBuilder:
  """The builder of an algorithm factory ``factory(loss_fn, roles, [params,] *, hparams...,
  execution)`` (FedAvg, FedProx, FedOpt, FedPer, Local, FFGG): the model's task loss, its
  roles (and parameters, for a factory that takes them), every keyword hyperparameter of the
  factory from ``config.algorithm.hparams`` except those in `fixed`; evaluation of the model's
  loss without dropout on the test data (personalized and global)."""
  takes_params = "params" in inspect.signature(factory).parameters
  takes_aggregation = "aggregation" in inspect.signature(factory).parameters
  names = factory_hparams(factory, wired=("loss_fn", "roles", "params"), fixed=fixed)

  def build(config, model: ModelBundle, data: Federation, execution: ClientExecution) -> Built:
    hp = read_hparams(config, names)
    if model.loss is None:
      raise ValueError(f"model {config.model.name!r} has no task loss of its own, so algorithm "
                       f"{config.algorithm.name!r} cannot train it; use the algorithm its "
                       "config file names")
    wired = {"params": model.params} if takes_params else {}
    if takes_aggregation:
      wired["aggregation"] = chain_config(config, data.train.num_clients)
    alg = factory(model.loss(True), model.roles, execution=execution, **wired, **fixed, **hp)
    return Built(alg, *model_evaluation(model, data, alg.personal_rows))

  build.hparams = names
  return build
