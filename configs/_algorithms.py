"""Every hyperparameter of the baselines and FFGG, with its default: the one place they live.

A config file picks an algorithm with `algorithm(name, **overrides)`, which returns
``ConfigDict(name=..., hparams=...)`` holding every knob the algorithm reads, so the resolved
config (the run's ``config.json``) says what the run does. The builders read the hparams with no
fallback (`fedjax_fm.builders.read_hparams`); `tests/test_configs.py` checks these defaults
against the factories' signatures.

A config file's variant argument may name an algorithm (`select`): ``configs/digits.py:fedprox``
or ``configs/digits.py:tiny,fedper`` run the same experiment with that algorithm's knobs.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

_LOCAL_UPDATE = dict(client_lr=0.1, server_lr=1.0, client_optimizer="sgd", weighted=True)
_FEDOPT = dict(server_lr=1e-2, client_lr=0.1, b1=0.9, b2=0.99, eps=1e-3, weighted=True)

HPARAMS = {
    # McMahan et al. 2017; client_momentum: SGD momentum of the client optimizer (None: none).
    "fedavg": dict(_LOCAL_UPDATE, client_momentum=config_dict.placeholder(float)),
    # Li et al. 2020: mu is the proximal weight.
    "fedprox": dict(_LOCAL_UPDATE, mu=0.01),
    # Reddi et al. 2021: server in adam | yogi | adagrad | avgm.
    "fedopt": dict(_FEDOPT, server="adam", momentum=0.9),
    "fedadam": dict(_FEDOPT),
    "fedyogi": dict(_FEDOPT),
    # Hsu et al. 2019: server SGD with momentum.
    "fedavgm": dict(server_lr=1.0, momentum=0.9, client_lr=0.1, weighted=True),
    # Arivazhagan et al. 2019: `personal` is a regex over leaf paths kept on the client.
    "fedper": dict(_LOCAL_UPDATE, personal="^head/"),
    # Every client trains alone; nothing is aggregated.
    "local": dict(client_lr=0.1, client_optimizer="sgd"),
    # FFGG: global + private parameters (docs/algorithms.md 5).
    "ffgg": dict(
        personal=config_dict.placeholder(str), personal_lr=0.5, personal_steps=10,
        server_lr=1.0, local_steps=0, local_lr=0.1, refine_personal=False,
        personal_init="warm", personal_init_scale=1.0, max_delay=0,
        delay_distribution="uniform", attack=config_dict.placeholder(str),
        attacker_fraction=0.0, attacker_ids=config_dict.placeholder(tuple), attack_scale=1.0,
        attack_noise_std=1.0, aggregator="mean", bucket_size=2, trim_fraction=0.1,
        weighted=False),
}


def algorithm(name: str, common: dict | None = None, **overrides) -> ml_collections.ConfigDict:
  """``ConfigDict(name=name, hparams=...)`` with every hyperparameter of `name`.

  Args:
    name: a key of `HPARAMS`.
    common: an experiment's settings for whichever algorithm takes them (e.g. its
      ``client_lr``, which FFGG, taking ``local_lr`` instead, does not).
    **overrides: hyperparameters of `name` that differ from the defaults.

  Raises:
    ValueError: an unknown algorithm or an override it does not take.
  """
  if name not in HPARAMS:
    raise ValueError(f"no default hyperparameters for algorithm {name!r}; known: "
                     f"{sorted(HPARAMS)}")
  hparams = dict(HPARAMS[name])
  overrides = {**{k: v for k, v in (common or {}).items() if k in hparams}, **overrides}
  unknown = sorted(set(overrides) - set(hparams))
  if unknown:
    raise ValueError(f"algorithm {name!r} takes no hyperparameter {unknown}; it takes "
                     f"{sorted(hparams)}")
  for key, value in overrides.items():
    if isinstance(hparams[key], config_dict.FieldReference) and value is not None:
      hparams[key] = config_dict.placeholder(type(value))
      hparams[key].set(value)
    else:
      hparams[key] = value
  return ml_collections.ConfigDict(dict(name=name, hparams=ml_collections.ConfigDict(hparams)))


def aggregation(**overrides) -> ml_collections.ConfigDict:
  """``config.aggregation``: the server chain's aggregator and upload compression
  (`fedjax_fm.chain.ChainConfig`, docs/algorithms.md 7).

  aggregator: mean | median (coordinate-wise, after random bucketing of bucket_size) |
  trimmed_mean (trim_fraction at each end) | norm_bounded_mean (norm_bound, None: the cohort's
  median norm). compression: None | int8 | int4 (stochastic quantization) | top_k
  (top_k_fraction of each leaf, with error_feedback kept on the client). attack: None |
  flip | scale | gaussian: simulated Byzantine clients (attacker_fraction of each cohort send
  -attack_scale * u, attack_scale * u or noise), to measure the robust aggregators.
  """
  c = ml_collections.ConfigDict(dict(
      aggregator="mean", bucket_size=2, trim_fraction=0.1,
      norm_bound=config_dict.placeholder(float), compression=config_dict.placeholder(str),
      top_k_fraction=0.01, error_feedback=True, attack=config_dict.placeholder(str),
      attacker_fraction=0.2, attack_scale=1.0))
  c.update(overrides)
  return c


def privacy(**overrides) -> ml_collections.ConfigDict:
  """``config.privacy``: user-level DP-FedAvg, off until noise_multiplier or target_epsilon is
  set (`fedjax_fm.builders.chain_config`, `fedjax_fm.privacy`).

  clip_norm: the per-client L2 clip (the initial one with adaptive_clip: tracks the
  target_quantile of update norms at clip_learning_rate, its count noised with count_noise_std,
  None: max(cohort / 20, z)). delta None: 1 / number of clients. accountant: rdp | pld.
  sampling: poisson (the usual DP-FedAvg accounting of the rate cohort / clients) | fixed (the
  engine's fixed-size cohorts, replace-one, rdp only).
  """
  c = ml_collections.ConfigDict(dict(
      clip_norm=1.0, noise_multiplier=config_dict.placeholder(float),
      target_epsilon=config_dict.placeholder(float), delta=config_dict.placeholder(float),
      adaptive_clip=False, target_quantile=0.5, clip_learning_rate=0.2,
      count_noise_std=config_dict.placeholder(float), accountant="rdp", sampling="poisson"))
  c.update(overrides)
  return c


def select(arg: str | None, file: str, variants: tuple[str, ...] = ("tiny",),
           algorithms: tuple[str, ...] = tuple(HPARAMS)) -> tuple[str | None, str | None]:
  """Splits a config argument ``"tiny"``, ``"fedprox"`` or ``"tiny,fedprox"`` into
  (variant or None, algorithm or None).

  Raises:
    ValueError: a part that is neither a variant nor an algorithm of this config file.
  """
  variant = name = None
  for part in filter(None, (arg or "").split(",")):
    if part in variants and variant is None:
      variant = part
    elif part in algorithms and name is None:
      name = part
    else:
      raise ValueError(f"unknown argument {part!r} of {file}; use one of {list(variants)}, "
                       f"optionally with an algorithm of {sorted(algorithms)} after a comma "
                       f"(e.g. {file}:tiny,{algorithms[0]})")
  return variant, name
