"""Federated algorithms (installed as `fedjax_fm.algorithms`): one file, one factory each.

`build(name, ...)` is the one place a config's algorithm name becomes a factory call for the
algorithms over one model and a loss (the registry). The seed papers' algorithms with their own
model structure are wired by `launch.py`: FedDAT directly (`launch._feddat`), FedPFT, FedBone
and TAP through their `*_launch` modules (`build_algorithm`); FedPFT's alignment lives in
`fedpft_alignment.py`.
"""

import inspect

from fedjax_fm.algorithms.fedavg import fedavg
from fedjax_fm.algorithms.fedopt import fedadam, fedavgm, fedopt, fedyogi
from fedjax_fm.algorithms.fedper import fedper
from fedjax_fm.algorithms.fedprox import fedprox
from fedjax_fm.algorithms.ffgg import ffgg
from fedjax_fm.algorithms.local_training import local_training

__all__ = ["REGISTRY", "build", "fedavg", "fedadam", "fedavgm", "fedopt", "fedyogi", "fedper",
           "fedprox", "ffgg", "local_training"]

REGISTRY = {
    "fedavg": fedavg,
    "fedprox": fedprox,
    "fedopt": fedopt,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fedavgm": fedavgm,
    "fedper": fedper,
    "local": local_training,
    "ffgg": ffgg,
}
_WIRED = ("loss_fn", "roles", "params", "execution")


def build(name: str, loss_fn, roles, params, execution=None, **hparams):
  """Builds an algorithm by its config name with its hyperparameters.

  Raises:
    ValueError: for an unknown name or a hyperparameter the algorithm does not take, naming
      the ones it does take.
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(REGISTRY)}")
  factory = REGISTRY[name]
  sig = inspect.signature(factory)
  if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
    sig = inspect.signature(fedopt)  # the fedopt shorthands forward to fedopt
  accepted = [p for p in sig.parameters if p not in _WIRED]
  unknown = sorted(set(hparams) - set(accepted))
  if unknown:
    raise ValueError(f"algorithm {name!r} takes no hyperparameter {unknown}; it takes "
                     f"{accepted}")
  wired = {"params": params} if "params" in inspect.signature(factory).parameters else {}
  return factory(loss_fn, roles, execution=execution, **wired, **hparams)
