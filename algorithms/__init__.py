"""Federated algorithms (installed as `fedjax_fm.algorithms`): one file, one factory each."""

from fedjax_fm.algorithms.fedavg import fedavg
from fedjax_fm.algorithms.fedopt import fedadam, fedavgm, fedopt, fedyogi
from fedjax_fm.algorithms.fedper import fedper
from fedjax_fm.algorithms.fedprox import fedprox
from fedjax_fm.algorithms.local_training import local_training

__all__ = ["fedavg", "fedadam", "fedavgm", "fedopt", "fedyogi", "fedper", "fedprox",
           "local_training"]
