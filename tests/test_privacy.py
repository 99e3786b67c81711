"""User-level DP: the accountant's answers, the noise for a budget, the config's refusals, and a
DP-FedAvg run on the real digits reporting epsilon every round."""

import math

import dp_accounting
import numpy as np
import pytest

from fedjax_fm import builders, chain as chain_lib, privacy
from fedjax_fm.experiment import run
from tests import tiny


def test_epsilon_of_one_full_round_is_the_gaussian_mechanism():
  # q = 1, one step: the Gaussian mechanism; PLD is tight, so it matches the analytic
  # epsilon (Balle & Wang 2018), and RDP is an upper bound.
  exact = dp_accounting.get_epsilon_gaussian(1.0, 1e-5)
  pld = privacy.epsilon(1.0, 1.0, 1, 1e-5, "pld")
  assert pld == pytest.approx(exact, rel=1e-2)
  assert privacy.epsilon(1.0, 1.0, 1, 1e-5, "rdp") >= pld


def test_epsilon_grows_with_rounds_and_rate_and_shrinks_with_noise():
  base = privacy.epsilon(1.0, 0.1, 100, 1e-5)
  assert privacy.epsilon(1.0, 0.1, 200, 1e-5) > base
  assert privacy.epsilon(1.0, 0.2, 100, 1e-5) > base
  assert privacy.epsilon(2.0, 0.1, 100, 1e-5) < base
  assert privacy.epsilon(0.0, 0.1, 100, 1e-5) == math.inf
  assert privacy.epsilon(1.0, 0.1, 0, 1e-5) == 0.0


def test_noise_multiplier_meets_the_target_and_no_more():
  z = privacy.noise_multiplier(4.0, 0.2, 50, 0.02)
  assert privacy.epsilon(z, 0.2, 50, 0.02) <= 4.0
  assert privacy.epsilon(z * 0.99, 0.2, 50, 0.02) > 4.0   # within the 1e-3 tolerance


def test_epsilons_per_round_bound_each_round_and_end_exact():
  eps = privacy.epsilons_per_round(1.5, 0.2, 10, 0.02, points=4)
  assert len(eps) == 10 and eps == sorted(eps)
  # Accounted at rounds 3, 5, 8, 10; round 4 reports round 5's epsilon (an upper bound).
  assert eps[3] == eps[4] == privacy.epsilon(1.5, 0.2, 5, 0.02)
  assert eps[3] > privacy.epsilon(1.5, 0.2, 4, 0.02)
  assert eps[-1] == privacy.epsilon(1.5, 0.2, 10, 0.02)


def test_adaptive_clipping_raises_the_update_noise():
  # z^-2 = z_u^-2 + (2 s)^-2 with z = 1, s = 1: z_u = (1 - 1/4)^-1/2 = 1.154701
  assert privacy.update_noise_multiplier(1.0, 1.0) == pytest.approx(1.154701, rel=1e-6)
  with pytest.raises(ValueError, match="count noise std 0.4 is too small"):
    privacy.update_noise_multiplier(1.0, 0.4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=-1.0), "noise_multiplier must be a finite number >= 0"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier must be .*finite"),
    (dict(clip_norm=-0.5, noise_multiplier=1.0), "clip_norm must be a positive finite"),
    (dict(clip_norm=float("nan"), noise_multiplier=1.0), "clip_norm must be .*finite"),
    (dict(delta=1.0, noise_multiplier=1.0), r"delta must be in \(0, 1\)"),
    (dict(delta=0.0, target_epsilon=4.0), r"delta must be in \(0, 1\)"),
    (dict(noise_multiplier=1.0, target_epsilon=4.0), "set one of"),
    (dict(target_epsilon=1e-6, delta=1e-8), "unreachable in 3 rounds"),
])
def test_bad_privacy_configs_are_one_line_errors(kwargs, message):
  config = tiny.config("digits")
  config.privacy.update(kwargs)
  with pytest.raises(ValueError, match=message) as err:
    builders.validate_config(config)
    builders.chain_config(config, num_clients=8)
  assert "\n" not in str(err.value)


def test_fixed_size_sampling_is_rdp_only_and_looser_than_poisson():
  with pytest.raises(ValueError, match="'rdp' accountant only"):
    privacy.epsilon(1.0, 0.2, 10, 1e-3, "pld", sampling="fixed", population=50)
  fixed = privacy.epsilon(1.0, 0.2, 10, 1e-3, sampling="fixed", population=50)
  assert fixed > privacy.epsilon(1.0, 0.2, 10, 1e-3)   # replace-one: sensitivity 2C


def test_dp_fedavg_on_digits_reports_epsilon_every_round():
  assert builders.chain_config(tiny.config("digits"), 8) == chain_lib.ChainConfig()  # DP off
  config = tiny.config("digits")          # 8 clients, cohort 4: q = 0.5, delta = 1/8
  config.rounds = config.eval_every = 2
  config.privacy.update(target_epsilon=4.0, adaptive_clip=True)
  cc = builders.chain_config(config, num_clients=8)
  # Calibrated to the target within the tolerance; the accounted z is the count's noise
  # (max(cohort / 20, z) = z), and the updates' noise is raised to 2 z / sqrt(3).
  z = cc.count_noise_std
  assert 3.9 < cc.epsilons[-1] <= 4.0
  assert cc.epsilons[-1] == pytest.approx(privacy.epsilon(z, 0.5, 2, 1 / 8))
  assert cc.noise_multiplier == pytest.approx(2 * z / math.sqrt(3))
  history = run(config, None, progress=False)
  np.testing.assert_allclose([h["privacy/epsilon"] for h in history], cc.epsilons, rtol=1e-6)
  assert all(h["train/noise_std"] > 0 for h in history)
  # The adaptive clip starts at clip_norm and moves: its state lives in the server state.
  assert history[0]["train/clip_norm"] == pytest.approx(config.privacy.clip_norm)
  assert history[-1]["train/clip_norm"] != history[0]["train/clip_norm"]
