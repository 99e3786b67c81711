"""FFGG (partially personalized FL) on scikit-learn's digits: a global body, personal heads.

Each round the sampled clients fine-tune their personal head for `personal_steps` steps with the
body fixed, then send a gradient of the body at the new head; the server averages and steps
(Mishchenko et al. 2023). Dirichlet(0.3) label skew makes the personal heads matter. Variants are
hyperparameters: `local_steps` (Local FFGG), `max_delay` (asynchronous), `attack` +
`aggregator` (Byzantine-robust).

  python launch.py --config configs/ffgg_digits.py --workdir runs/ffgg
  python launch.py --config configs/ffgg_digits.py:tiny
  python launch.py --config configs/ffgg_digits.py --config.algorithm.hparams.max_delay=3
  python launch.py --config configs/ffgg_digits.py --config.algorithm.hparams.attack=flip \\
      --config.algorithm.hparams.attacker_fraction=0.2 \\
      --config.algorithm.hparams.aggregator=median
"""

import ml_collections

from configs import _algorithms, digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = digits.get_config(arg)
  c.data.partition.update(kind="dirichlet", alpha=0.3)
  c.algorithm = _algorithms.algorithm(
      "ffgg", personal="^head/", personal_lr=0.1, personal_steps=5, server_lr=0.5,
      local_steps=0, max_delay=0, attacker_fraction=0.0, aggregator="mean")
  if arg == "tiny":
    c.algorithm.hparams.personal_steps = 2
  return c
