"""User-level differential privacy of DP-FedAvg: the privacy budget of a run, and the noise for a
budget, from Google's `dp-accounting` (no accountant is written here).

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018) clips each sampled client's update to L2 norm C,
sums, adds N(0, z^2 C^2) once to the sum and divides by the cohort size (`fedjax_fm.chain`:
`clip`, `dp_mean`, `gaussian_noise`). One round is a sampled Gaussian mechanism with noise
multiplier z; `rounds` of them compose. What is protected is a whole client (user-level DP): its
presence (Poisson accounting, add-or-remove-one) or its data (fixed-size accounting,
replace-one).

Sampling, stated:
- ``"poisson"``: each client joins a round independently with probability q = K / N. This is
  the accounting of DP-FedAvg papers, TensorFlow Federated and pfl-research. fedjax_fm's
  cohorts are fixed-size (K of N uniformly without replacement), so with ``"poisson"`` the
  reported epsilon is that of the Poisson scheme with the same rate, the usual approximation.
- ``"fixed"``: exactly the engine's scheme, K of N without replacement, accounted with the RDP
  accountant under replace-one adjacency (Wang, Balle, Kasiviswanathan 2019; one client's
  update replaced by another's moves the sum by up to 2C, so the event's multiplier is z / 2).
  The PLD accountant does not support it.

Example::

    epsilon(1.1, 0.01, 1000, 1e-5)                      # about 2.9 (RDP)
    noise_multiplier(4.0, 0.2, 200, 0.02)               # z reaching epsilon 4 after 200 rounds
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import dp_accounting


def _dp(submodule: str = ""):
  """`dp_accounting` (or one of its submodules), imported on first use: its imports take about
  3 s, which a run without privacy, and every launch's config check, should not pay."""
  return importlib.import_module("dp_accounting" + (f".{submodule}" if submodule else ""))


ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")
# Above this the noise on the mean is over a thousand clip norms per client: not a useful run.
MAX_NOISE_MULTIPLIER = 1e3


def _check(noise: float | None, sampling_rate: float, steps: int, delta: float,
           accountant: str, sampling: str, population: int | None) -> None:
  if noise is not None and not (noise >= 0 and math.isfinite(noise)):
    raise ValueError(f"noise multiplier must be a finite number >= 0, got {noise}")
  if not 0.0 < sampling_rate <= 1.0:
    raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
  if not (isinstance(steps, int) and steps >= 0):
    raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
  if sampling not in SAMPLINGS:
    raise ValueError(f"unknown sampling {sampling!r}; use one of {SAMPLINGS}")
  if sampling == "fixed":
    if accountant != "rdp":
      raise ValueError("fixed-size (without replacement) sampling is accounted by the 'rdp' "
                       "accountant only")
    if population is None or population < 1:
      raise ValueError("fixed-size sampling needs the population (the number of clients)")


def _event(noise: float, sampling_rate: float, sampling: str,
           population: int | None) -> dp_accounting.DpEvent:
  if sampling == "poisson":
    return _dp().PoissonSampledDpEvent(sampling_rate, _dp().GaussianDpEvent(noise))
  cohort = int(round(sampling_rate * population))
  return _dp().SampledWithoutReplacementDpEvent(
      population, cohort, _dp().GaussianDpEvent(noise / 2.0))


# Renyi orders: integers (fast and, for the epsilons of useful runs, 1 to 10, as tight as
# fractional ones) plus the large ones small noise needs.
RDP_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 512)


def _accountant(accountant: str, sampling: str) -> dp_accounting.PrivacyAccountant:
  if accountant == "pld":
    return _dp("pld").PLDAccountant()
  relation = (_dp().NeighboringRelation.REPLACE_ONE if sampling == "fixed"
              else _dp().NeighboringRelation.ADD_OR_REMOVE_ONE)
  return _dp("rdp").RdpAccountant(list(RDP_ORDERS), neighboring_relation=relation)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "rdp", *, sampling: str = "poisson",
            population: int | None = None) -> float:
  """Epsilon of `steps` rounds of the sampled Gaussian mechanism at `delta`.

  Args:
    noise_multiplier: z, the noise std on the sum over the clip norm (0: no privacy, inf).
    sampling_rate: q = cohort size / number of clients.
    steps: rounds.
    delta: the target delta, in (0, 1) (often 1 / number of clients or smaller).
    accountant: ``"rdp"`` (Renyi DP, Mironov 2017) or ``"pld"`` (privacy loss distributions,
      tighter, slower).
    sampling: ``"poisson"`` or ``"fixed"`` (see the module doc); `population` for ``"fixed"``.

  Raises:
    ValueError: a negative or NaN noise, a rate outside (0, 1], a delta outside (0, 1), an
      unknown accountant or sampling.
  """
  _check(noise_multiplier, sampling_rate, steps, delta, accountant, sampling, population)
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  acc = _accountant(accountant, sampling)
  acc.compose(_event(noise_multiplier, sampling_rate, sampling, population), steps)
  return float(acc.get_epsilon(delta))


def epsilons_per_round(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
                       accountant: str = "rdp", *, sampling: str = "poisson",
                       population: int | None = None, points: int = 40) -> list[float]:
  """Epsilon after each of rounds 1..`rounds`, for the run's ``privacy/epsilon``.

  The accountant runs at `points` rounds evenly spread up to `rounds` (the last included;
  every round when rounds <= points); a round in between reports the epsilon of the next
  accounted round, an upper bound (epsilon grows with the rounds), so the report is never
  optimistic and the last round's value is exact.
  """
  _check(noise_multiplier, sampling_rate, rounds, delta, accountant, sampling, population)
  if rounds == 0:
    return []
  if noise_multiplier == 0:
    return [math.inf] * rounds
  grid = sorted({max(1, int(math.ceil(rounds * (i + 1) / min(points, rounds))))
                 for i in range(min(points, rounds))})
  at = {r: epsilon(noise_multiplier, sampling_rate, r, delta, accountant, sampling=sampling,
                   population=population) for r in grid}
  out, j = [], 0
  for r in range(1, rounds + 1):
    while grid[j] < r:
      j += 1
    out.append(at[grid[j]])
  return out


def noise_multiplier(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                     accountant: str = "rdp", *, sampling: str = "poisson",
                     population: int | None = None, tolerance: float = 1e-3) -> float:
  """The smallest noise multiplier (within `tolerance`) whose `steps` rounds stay within
  (target_epsilon, delta): `dp_accounting.calibrate_dp_mechanism` over `epsilon`.

  Raises:
    ValueError: a target that is not a positive finite number, bad arguments as in `epsilon`,
      or a target that needs a noise multiplier above `MAX_NOISE_MULTIPLIER` (unreachable in
      `steps` rounds at this rate).
  """
  if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
    raise ValueError(f"target epsilon must be a positive finite number, got {target_epsilon}")
  _check(None, sampling_rate, steps, delta, accountant, sampling, population)
  if steps == 0:
    return 0.0
  if epsilon(MAX_NOISE_MULTIPLIER, sampling_rate, steps, delta, accountant, sampling=sampling,
             population=population) > target_epsilon:
    raise ValueError(f"epsilon {target_epsilon} at delta {delta} is unreachable in {steps} "
                     f"rounds at sampling rate {sampling_rate:.4g}: even noise multiplier "
                     f"{MAX_NOISE_MULTIPLIER:g} exceeds it; raise the target or delta, or lower "
                     f"the rounds or the cohort")
  return float(_dp().calibrate_dp_mechanism(
      lambda: _accountant(accountant, sampling),
      lambda z: _dp().SelfComposedDpEvent(
          _event(z, sampling_rate, sampling, population), steps),
      target_epsilon, delta,
      bracket_interval=_dp().ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER),
      tol=tolerance))


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
  """The noise multiplier of the updates when adaptive clipping also releases a noised count
  (Andrew et al. 2021, Section 3): the count sum_k (1[||u_k|| <= C] - 1/2) has sensitivity 1/2,
  so its noise std s is a multiplier 2 s, and the two Gaussian releases together are one with
  z^-2 = z_update^-2 + (2 s)^-2. Returns z_update for the accounted z.

  Raises:
    ValueError: if 2 s <= z (the count's noise alone would spend the budget).
  """
  if noise_multiplier == 0:
    return 0.0
  if 2 * count_noise_std <= noise_multiplier:
    raise ValueError(f"adaptive clipping's count noise std {count_noise_std} is too small for "
                     f"noise multiplier {noise_multiplier}: it must exceed "
                     f"{noise_multiplier / 2:g}")
  return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


def check_privacy_values(clip_norm: float | None, noise: float | None,
                         target_epsilon: float | None, delta: float | None) -> None:
  """One-line errors for values no run can use, before anything is built.

  Raises:
    ValueError: a clip norm or noise multiplier that is negative, zero (clip) or NaN; a
      target epsilon that is not positive and finite; a delta outside (0, 1); both a noise
      multiplier and a target epsilon.
  """
  if clip_norm is not None and not (clip_norm > 0 and math.isfinite(clip_norm)):
    raise ValueError(f"config.privacy.clip_norm must be a positive finite number, got "
                     f"{clip_norm}")
  if noise is not None and not (noise >= 0 and math.isfinite(noise)):
    raise ValueError(f"config.privacy.noise_multiplier must be a finite number >= 0, got {noise}")
  if target_epsilon is not None and not (target_epsilon > 0 and math.isfinite(target_epsilon)):
    raise ValueError(f"config.privacy.target_epsilon must be a positive finite number, got "
                     f"{target_epsilon}")
  if noise is not None and target_epsilon is not None:
    raise ValueError("set one of config.privacy.noise_multiplier and "
                     "config.privacy.target_epsilon (the other None)")
  if delta is not None and not 0.0 < delta < 1.0:
    raise ValueError(f"config.privacy.delta must be in (0, 1), got {delta}")

