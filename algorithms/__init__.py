"""Federated algorithms (installed as `fedjax_fm.algorithms`): one file, one factory each, and
`BUILDERS`, the one table from a config's ``algorithm.name`` to its builder.

A builder has one signature (`fedjax_fm.builders`)::

    build(config, model: ModelBundle, data: Federation, execution) -> Built(algorithm, evaluate)

The baselines and FFGG train one model on its task loss, so `loss_builder(factory)` builds them
from the factory's signature: every keyword hyperparameter is read from
``config.algorithm.hparams``, none defaulted. The seed papers' algorithms with their own model
structure have a builder module each: `feddat_launch`, `fedpft_launch` (FedPFT's alignment in
`fedpft_alignment`), `fedbone_launch` and `tap_launch` (TAP's stage 2 in `tap_post_fl`).

To add an algorithm: write its factory in a new file (``algorithms/myalg.py``), add one line
here (``"myalg": loss_builder(myalg)``, or a builder of your own), and give its config file
every hyperparameter (`configs/_algorithms.py` holds the baselines' defaults).
"""

from fedjax_fm.algorithms import fedbone_launch, feddat_launch, fedpft_launch, tap_launch
from fedjax_fm.algorithms.fedavg import fedavg
from fedjax_fm.algorithms.fedopt import fedadam, fedavgm, fedopt, fedyogi
from fedjax_fm.algorithms.fedper import fedper
from fedjax_fm.algorithms.fedprox import fedprox
from fedjax_fm.algorithms.ffgg import ffgg
from fedjax_fm.algorithms.local_only import local_only
from fedjax_fm.builders import AlgorithmBuilder, loss_builder

__all__ = ["BUILDERS", "DATASETS", "MODELS", "builder", "fedavg", "fedadam", "fedavgm", "fedopt", "fedyogi", "fedper",
           "fedprox", "ffgg", "local_only", "loss_builder"]

BUILDERS: dict[str, AlgorithmBuilder] = {
    "fedavg": loss_builder(fedavg),
    "fedprox": loss_builder(fedprox),
    "fedopt": loss_builder(fedopt),
    "fedadam": loss_builder(fedadam),
    "fedyogi": loss_builder(fedyogi),
    "fedavgm": loss_builder(fedavgm),
    "fedper": loss_builder(fedper),
    "local": loss_builder(local_only),
    "ffgg": loss_builder(ffgg),
    "feddat": feddat_launch.build,
    "fedpft": fedpft_launch.build,
    **{name: fedbone_launch.builder(variant)
       for name, variant in fedbone_launch.ALGORITHMS.items()},
    "tap": tap_launch.build,
}

# The data sets and models only an algorithm's own builder knows, for the launcher's tables
# (`fedjax_fm.experiment.DATASETS` / `MODELS` add them to the generic ones).
DATASETS = {
    "multitask_suite": fedbone_launch.build_data,   # GroupedData: one group per task
    "tap_suite": tap_launch.suite_data,             # PairedData: one group per modality-task pair
}
MODELS = {
    "fedbone": fedbone_launch.build_model,
    "tap": tap_launch.build_model,
}


def builder(name: str) -> AlgorithmBuilder:
  """The builder of ``config.algorithm.name``.

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(BUILDERS)}")
  return BUILDERS[name]
