"""The server chain's links on hand-derived examples, and the chain inside FedAvg's round."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import chain as chain_lib
from fedjax_fm import roles as roles_lib
from fedjax_fm.algorithms import fedavg, local_only
from tests.test_fedavg import init_params, loss_fn, three_client_cohort

SGD1 = chain_lib.server_optimizer(optax.sgd(1.0))


def run(links, updates, weights, mask=None, params=None, state=None, client=None, round_num=0,
        rng=0):
  """Applies chain(*links, sgd(1)) once; returns the ChainOutput."""
  c = chain_lib.chain(*links, SGD1)
  updates = {k: jnp.asarray(v, jnp.float32) for k, v in updates.items()}
  weights = jnp.asarray(weights, jnp.float32)
  if params is None:
    params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:], x.dtype), updates)
  mask = jnp.ones(weights.shape, bool) if mask is None else jnp.asarray(mask)
  apply = jax.jit(lambda *args: c.apply(*args[:6], round_num=args[6], client=args[7]))
  return apply(params, updates, weights, mask, state or c.init(params), jax.random.key(rng),
               jnp.asarray(round_num, jnp.int32), client)


def test_finite_filter_zeroes_the_row_and_the_weight():
  # Client 1 has a NaN: dropped; mean of the others (1*[1, 2] + 3*[5, 6]) / 4 = [4, 5].
  out = run([chain_lib.finite_filter(), chain_lib.weighted_mean()],
            {"a": [[1.0, 2.0], [np.nan, 0.0], [5.0, 6.0]]}, [1.0, 9.0, 3.0])
  np.testing.assert_array_equal(out.accepted, [True, False, True])
  np.testing.assert_allclose(out.params["a"], [4.0, 5.0])


def test_clip_scales_each_client_to_the_norm():
  # norms 5 and 0.5; clip 1: [3, 4] -> [0.6, 0.8], [0.3, 0.4] untouched; mean [0.45, 0.6].
  out = run([chain_lib.clip(1.0), chain_lib.weighted_mean()],
            {"a": [[3.0, 4.0], [0.3, 0.4]]}, [1.0, 1.0])
  np.testing.assert_allclose(out.params["a"], [0.45, 0.6], rtol=1e-6)
  np.testing.assert_allclose(out.metrics["clipped_fraction"], 0.5)


def test_adaptive_clip_moves_the_norm_towards_the_quantile():
  # C = 1; norms 0.5, 2, 3, 0.1: two of four below, b = 0.5. Target 0.25, lr 0.2:
  #   C' = exp(-0.2 * (0.5 - 0.25)) = exp(-0.05) = 0.951229
  # Round 2 at C' with the same norms: b = 0.5 again, C'' = exp(-0.1) = 0.904837.
  link = chain_lib.adaptive_clip(1.0, target_quantile=0.25, learning_rate=0.2)
  updates = {"a": [[0.5, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.1]]}
  out = run([link, chain_lib.weighted_mean()], updates, [1.0] * 4)
  np.testing.assert_allclose(out.state.links[0], np.exp(-0.05), rtol=1e-6)
  np.testing.assert_allclose(out.metrics["clip_norm"], 1.0)
  # Clipped to 1: [0.5, 0], [0, 1], [1, 0], [0, 0.1] -> mean [0.375, 0.275].
  np.testing.assert_allclose(out.params["a"], [0.375, 0.275], rtol=1e-6)
  out2 = run([link, chain_lib.weighted_mean()], updates, [1.0] * 4, state=out.state)
  np.testing.assert_allclose(out2.state.links[0], np.exp(-0.1), rtol=1e-6)


def test_no_accepted_client_moves_nothing_not_even_link_state():
  link = chain_lib.adaptive_clip(1.0, target_quantile=0.9)
  out = run([chain_lib.finite_filter(), link, chain_lib.weighted_mean()],
            {"a": [[np.nan], [np.inf]]}, [1.0, 1.0], params={"a": jnp.array([7.0])})
  np.testing.assert_array_equal(out.params["a"], [7.0])
  np.testing.assert_array_equal(out.state.links[1], 1.0)


@pytest.mark.parametrize("bits, low, high", [(8, 63 / 127, 64 / 127), (4, 3 / 7, 4 / 7)])
def test_quantize_is_unbiased_on_its_grid(bits, low, high):
  # One client; max |u| = 1 sets s = 1 / (2^(b-1) - 1). 1 and -1 are on the grid (exact);
  # 0.5 lies halfway between two levels: each with probability 1/2, mean 0.5.
  u = np.full((1, 4002), 0.5, np.float32)
  u[0, 0], u[0, 1] = 1.0, -1.0
  out = run([chain_lib.quantize(bits), chain_lib.weighted_mean()], {"a": u}, [1.0])
  q = np.asarray(out.params["a"])
  np.testing.assert_allclose(q[:2], [1.0, -1.0], rtol=1e-6)
  np.testing.assert_allclose(np.unique(q[2:]), [low, high], rtol=1e-6)
  assert abs(q[2:].mean() - 0.5) < 0.01    # 4000 fair coins: std of the mean ~ 0.0006 * scale
  # Upload: ceil(10 * bits / 8) bytes + a float32 scale.
  assert chain_lib.quantize(bits).upload_bytes({"a": jnp.zeros(10)}) == (10 * bits // 8) + 4


def test_top_k_with_error_feedback():
  # u = [0.1, -3, 2], residual e = [0.5, 0, 0], k = 1: v = [0.6, -3, 2] -> sends [0, -3, 0],
  # keeps [0.6, 0, 2]. Next round u = 0: v = [0.6, 0, 2] -> sends [0, 0, 2], keeps [0.6, 0, 0].
  link = chain_lib.top_k(1 / 3)
  links = [link, chain_lib.weighted_mean()]
  rows = ({"a": jnp.array([[0.5, 0.0, 0.0]])}, None, None)
  out = run(links, {"a": [[0.1, -3.0, 2.0]]}, [1.0], client=rows)
  np.testing.assert_allclose(out.params["a"], [0.0, -3.0, 0.0])
  np.testing.assert_allclose(out.client[0]["a"], [[0.6, 0.0, 2.0]], rtol=1e-6)
  out = run(links, {"a": [[0.0, 0.0, 0.0]]}, [1.0], client=out.client)
  np.testing.assert_allclose(out.params["a"], [0.0, 0.0, 2.0])
  np.testing.assert_allclose(out.client[0]["a"], [[0.6, 0.0, 0.0]], rtol=1e-6)
  # One value and one int32 index per kept coordinate: ceil(0.01 * 1000) = 10 -> 80 bytes.
  assert chain_lib.top_k(0.01).upload_bytes({"a": jnp.zeros(1000)}) == 80


def test_byzantine_link_flips_a_fraction_of_the_accepted_clients():
  # 5 clients all sending [1]; fraction 0.4 -> 2 attackers send -3 * [1]: (3 - 6) / 5 = -0.6.
  attack = chain_lib.byzantine_lib.ByzantineAttack("flip", fraction=0.4, scale=3.0)
  out = run([chain_lib.byzantine(attack), chain_lib.finite_filter(), chain_lib.weighted_mean()],
            {"a": [[1.0]] * 5}, [1.0] * 5)
  np.testing.assert_allclose(out.params["a"], [-0.6], rtol=1e-6)
  assert int(out.metrics["num_attackers"]) == 2


def test_dp_mean_divides_by_the_real_cohort():
  # Slots: 3 real (one non-finite, dropped), 1 padding (weight 0). Weights are ignored:
  # ([2] + [4]) / 3 real clients = [2].
  out = run([chain_lib.finite_filter(), chain_lib.clip(100.0), chain_lib.dp_mean()],
            {"a": [[2.0], [np.nan], [4.0], [0.0]]}, [5.0, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(out.params["a"], [2.0])


def test_median_trimmed_and_norm_bounded():
  rows = {"a": [[1.0], [2.0], [6.0], [7.0], [-100.0]]}
  out = run([chain_lib.coordinate_median()], rows, [1.0] * 5)
  np.testing.assert_allclose(out.params["a"], [2.0])           # median of -100, 1, 2, 6, 7
  out = run([chain_lib.trimmed_mean(0.2)], rows, [1.0] * 5)
  np.testing.assert_allclose(out.params["a"], [3.0])           # drop -100 and 7: (1 + 2 + 6) / 3
  # norms 1, 2, 6, 7, 100: median bound 6; 7 -> 6, -100 -> -6: (1 + 2 + 6 + 6 - 6) / 5 = 1.8.
  out = run([chain_lib.norm_bounded_mean()], rows, [1.0] * 5)
  np.testing.assert_allclose(out.params["a"], [1.8], rtol=1e-6)
  np.testing.assert_allclose(out.metrics["norm_bound"], 6.0)
  out = run([chain_lib.norm_bounded_mean(1.0)], rows, [1.0] * 5)
  np.testing.assert_allclose(out.params["a"], [0.6], rtol=1e-6)  # (1 + 1 + 1 + 1 - 1) / 5


def test_gaussian_noise_is_calibrated_to_clip_and_cohort():
  # z = 2, C = 0.5, 4 real clients: std on the mean = 2 * 0.5 / 4 = 0.25.
  zeros = {"a": np.zeros((4, 8000), np.float32)}
  out = run([chain_lib.clip(0.5), chain_lib.dp_mean(), chain_lib.gaussian_noise(2.0)], zeros,
            [1.0] * 4)
  np.testing.assert_allclose(out.metrics["noise_std"], 0.25)
  assert abs(float(jnp.std(out.params["a"])) - 0.25) < 0.005
  assert abs(float(jnp.mean(out.params["a"]))) < 0.005


def test_privacy_report_and_server_optimizer():
  out = run([chain_lib.weighted_mean(), chain_lib.privacy_report([0.5, 0.9, 1.2])],
            {"a": [[2.0]]}, [1.0], params={"a": jnp.array([1.0])}, round_num=1)
  np.testing.assert_allclose(out.metrics["privacy/epsilon"], 0.9)
  np.testing.assert_allclose(out.params["a"], [3.0])   # sgd(1) on -delta: 1 + 2


def test_chain_refuses_bad_orders():
  with pytest.raises(ValueError, match="ends with exactly one server optimizer"):
    chain_lib.chain(chain_lib.weighted_mean())
  with pytest.raises(ValueError, match="exactly one aggregating link"):
    chain_lib.chain(chain_lib.clip(1.0), SGD1)
  with pytest.raises(ValueError, match="client -> aggregate"):
    chain_lib.chain(chain_lib.weighted_mean(), chain_lib.clip(1.0), SGD1)
  with pytest.raises(ValueError, match="calibrated to a clip norm"):
    chain_lib.chain(chain_lib.dp_mean(), chain_lib.gaussian_noise(1.0), SGD1)
  with pytest.raises(ValueError, match="noise_multiplier"):
    chain_lib.gaussian_noise(float("nan"))
  with pytest.raises(ValueError, match="clip_norm"):
    chain_lib.clip(-1.0)
  with pytest.raises(ValueError, match="DP mean"):
    chain_lib.ChainConfig(aggregator="median", clip_norm=1.0)


def test_fedavg_round_with_top_k_error_feedback():
  # tests/test_fedavg.py's three clients: deltas w A [1, -1, -3], B [1, 1, -1.5], C [1, -1, 0];
  # h 2, 1, 2; weights 4, 2, 3. top_k(0.3): one of w's three coordinates (C's tie -> index 0),
  # h whole. Sent w: A [0, 0, -3], B [0, 0, -1.5], C [1, 0, 0] -> mean (4A + 2B + 3C) / 9 =
  # [1/3, 0, -5/3]; w = [4/3, 2, 4/3]. h = (8 + 2 + 6) / 9 = 16/9. Residuals: what was not sent.
  params = init_params()
  alg = fedavg(loss_fn, roles_lib.assign_roles(params), client_lr=0.5,
               aggregation=chain_lib.ChainConfig(compression="top_k", top_k_fraction=0.3))
  server = alg.init(params, jax.random.key(0))
  clients = alg.init_clients(params, 4)
  server, clients, _ = jax.jit(alg.round)(server, clients, three_client_cohort(),
                                          jax.random.key(1))
  np.testing.assert_allclose(server.params["w"], [4 / 3, 2.0, 4 / 3], rtol=1e-6)
  np.testing.assert_allclose(server.params["head"], 16 / 9, rtol=1e-6)
  assert alg.personal_rows(clients) is clients["personal"]   # what an evaluator merges
  residual = clients["chain"][1]
  np.testing.assert_allclose(residual["w"], [[1, -1, 0], [1, 1, 0], [0, -1, 0], [0, 0, 0]],
                             atol=1e-6)
  np.testing.assert_allclose(residual["head"], [0, 0, 0, 0], atol=1e-6)
  assert alg.bytes_per_client(params) == (16, 16)  # up: (1 value + 1 index) * 2 leaves * 4 B
  int8 = fedavg(loss_fn, roles_lib.assign_roles(params),
                aggregation=chain_lib.ChainConfig(compression="int8"))
  assert int8.bytes_per_client(params) == (16, (3 + 4) + (1 + 4))


def test_compression_needs_something_shared():
  params = init_params()
  with pytest.raises(ValueError, match="needs an algorithm that sends shared parameters"):
    local_only(loss_fn, roles_lib.assign_roles(params),
               aggregation=chain_lib.ChainConfig(compression="int8"))


def test_chain_state_survives_a_checkpoint(tmp_path):
  # An adaptive clip norm moved by one round is part of the server state: saved and restored
  # exactly (what makes a resumed DP run continue bit-identically).
  from fedjax_fm.checkpoint import Checkpointer
  params = init_params()
  alg = fedavg(loss_fn, roles_lib.assign_roles(params), client_lr=0.5,
               aggregation=chain_lib.ChainConfig(clip_norm=0.5, adaptive_clip=True,
                                                 target_quantile=0.9))
  server, _, _ = jax.jit(alg.round)(alg.init(params, jax.random.key(0)),
                                    alg.init_clients(params, 4), three_client_cohort(),
                                    jax.random.key(1))
  assert float(server.chain[1]) != 0.5               # [finite_filter, adaptive_clip, ...]
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, {"server": server}, {"history": []})
  ckpt.wait()
  _, restored, _ = ckpt.restore({"server": alg.init(params, jax.random.key(0))})
  ckpt.close()
  np.testing.assert_array_equal(restored["server"].chain[1], server.chain[1])
