"""FedAvg on a hand-made quadratic problem, in the style of fedjax's fed_avg_test.py.

Model: params = {"w": f32[3], "head": f32[]}, both shared.
Per-example loss: l(w, h; x, y) = 0.5 * ||w - x||^2 + 0.5 * (h - y)^2.
The gradient of the masked batch mean is (w - xbar, h - ybar), xbar/ybar the mean over the real
(mask = 1) examples of the batch, so one SGD step with lr = 0.5 is

    w <- w - 0.5 * (w - xbar) = 0.5 * w + 0.5 * xbar        (same for h with ybar).

Padding slots hold PAD = 1e4 (finite garbage): if the mask were ignored, every number below
would be far off.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import roles as roles_lib
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import fedavg
from fedjax_fm.cohort import Cohort, FederatedData, make_cohort

PAD = 1e4
P3 = [PAD, PAD, PAD]
RTOL = 1e-6


def loss_fn(params, batch, rng):
  del rng
  per_w = 0.5 * jnp.sum(jnp.square(params["w"] - batch["x"]), axis=-1)
  per_h = 0.5 * jnp.square(params["head"] - batch["y"])
  return per_w + per_h, {"w_loss": per_w}


def init_params():
  return {"w": jnp.array([1.0, 2.0, 3.0], jnp.float32), "head": jnp.array(0.0, jnp.float32)}


def build_cohort(x, y, mask, weights, ids):
  return Cohort(data={"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)},
                mask=jnp.asarray(mask, jnp.float32),
                weights=jnp.asarray(weights, jnp.float32),
                client_ids=jnp.asarray(ids, jnp.int32))


def three_client_cohort():
  """K=3 clients, 2 local steps, batch 2; w0 = [1, 2, 3], h0 = 0, lr = 0.5.

  Client A (4 examples, weight 4), both steps full:
    step 1: x = [3,2,1], [1,2,3] -> xbar = [2,2,2];  y = 1, 3 -> ybar = 2
            w1 = 0.5*[1,2,3] + 0.5*[2,2,2] = [1.5, 2, 2.5];  h1 = 0.5*0 + 0.5*2 = 1
    step 2: x = [5,0,-5], [0,0,0] -> xbar = [2.5,0,-2.5];  y = 4, 2 -> ybar = 3
            w2 = 0.5*[1.5,2,2.5] + 0.5*[2.5,0,-2.5] = [2, 1, 0];  h2 = 0.5 + 1.5 = 2
    delta_A = w2 - w0 = [1, -1, -3];  dh_A = 2
  Client B (2 examples, weight 2), step 2 entirely padding (must be skipped):
    step 1: x = [5,2,3], [1,6,-3] -> xbar = [3,4,0];  y = 4, 0 -> ybar = 2
            w1 = 0.5*[1,2,3] + 0.5*[3,4,0] = [2, 3, 1.5];  h1 = 1
    delta_B = [1, 1, -1.5];  dh_B = 1
  Client C (3 examples, weight 3), the second slot of step 2 is padding:
    step 1: x = [1,0,1], [1,4,5] -> xbar = [1,2,3] = w0 -> w1 = w0;  y = 0, 0 -> h1 = 0
    step 2: x = [3,0,3] (+ PAD) -> xbar = [3,0,3];  y = 4 (+ PAD) -> ybar = 4
            w2 = 0.5*[1,2,3] + 0.5*[3,0,3] = [2, 1, 3];  h2 = 2
    delta_C = [1, -1, 0];  dh_C = 2
  """
  x = [[[[3, 2, 1], [1, 2, 3]], [[5, 0, -5], [0, 0, 0]]],
       [[[5, 2, 3], [1, 6, -3]], [P3, P3]],
       [[[1, 0, 1], [1, 4, 5]], [[3, 0, 3], P3]]]
  y = [[[1, 3], [4, 2]],
       [[4, 0], [PAD, PAD]],
       [[0, 0], [4, PAD]]]
  mask = [[[1, 1], [1, 1]],
          [[1, 1], [0, 0]],
          [[1, 1], [1, 0]]]
  return build_cohort(x, y, mask, weights=[4, 2, 3], ids=[0, 1, 2])


# Weighted (4, 2, 3; total 9):
#   mean delta_w = (4*[1,-1,-3] + 2*[1,1,-1.5] + 3*[1,-1,0]) / 9 = [9, -5, -15] / 9
#   w = [1,2,3] + [1, -5/9, -5/3] = [2, 13/9, 4/3]
#   mean dh = (4*2 + 2*1 + 3*2) / 9 = 16/9  ->  h = 16/9
WEIGHTED_W = np.array([2.0, 13.0 / 9.0, 4.0 / 3.0])
WEIGHTED_H = 16.0 / 9.0
# Unweighted: mean delta_w = ([1,-1,-3] + [1,1,-1.5] + [1,-1,0]) / 3 = [1, -1/3, -1.5]
#   w = [2, 5/3, 1.5];  mean dh = (2 + 1 + 2) / 3 = 5/3
UNWEIGHTED_W = np.array([2.0, 5.0 / 3.0, 1.5])
UNWEIGHTED_H = 5.0 / 3.0


def make_alg(execution=None, **kwargs):
  """FedAvg on the roles of `init_params()` with a jitted round; each config compiles once."""
  return _make_alg(execution or ClientExecution("vmap"), tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=None)
def _make_alg(execution, kwargs):
  alg = fedavg(loss_fn, roles_lib.assign_roles(init_params()), execution=execution,
               **dict(kwargs))
  return alg, jax.jit(alg.round)


def run_round(alg, params, cohort, num_clients=3, round_fn=None):
  server = alg.init(params, jax.random.key(0))
  client_states = alg.init_clients(params, num_clients)
  round_fn = round_fn or jax.jit(alg.round)
  return round_fn(server, client_states, cohort, jax.random.key(1))


def run_cached(cohort, **kwargs):
  alg, round_fn = make_alg(**kwargs)
  return run_round(alg, init_params(), cohort, round_fn=round_fn)


EXECUTIONS = {
    "vmap": ClientExecution("vmap"),
    # chunk_size=2 with K=3 clients: one full chunk and one partial chunk.
    "chunked": ClientExecution("chunked", chunk_size=2),
    # every client traced separately, local steps unrolled too (the CPU default).
    "unrolled": ClientExecution("unrolled", scan_unroll=True),
}


@pytest.mark.parametrize("strategy", list(EXECUTIONS))
def test_weighted_round_hand_derived(strategy):
  execution = EXECUTIONS[strategy]
  server, _, metrics = run_cached(three_client_cohort(), client_lr=0.5, execution=execution)
  np.testing.assert_allclose(server.params["w"], WEIGHTED_W, rtol=RTOL)
  np.testing.assert_allclose(server.params["head"], WEIGHTED_H, rtol=RTOL)
  assert int(server.round) == 1
  # Metrics are measured before each step's update, summed over the 9 real examples:
  #   A: step 1 (w0, h0): [3,2,1] -> 0.5*(4+0+4) + 0.5*1 = 4.5;  [1,2,3] -> 0 + 0.5*9 = 4.5
  #      step 2 (w1=[1.5,2,2.5], h1=1): [5,0,-5] -> 0.5*(12.25+4+56.25) + 0.5*9 = 40.75
  #                                     [0,0,0]  -> 0.5*(2.25+4+6.25) + 0.5*1 = 6.75   sum 56.5
  #   B: [5,2,3] -> 0.5*16 + 0.5*16 = 16;  [1,6,-3] -> 0.5*(0+16+36) + 0 = 26          sum 42
  #   C: step 1: [1,0,1] -> 0.5*8 = 4;  [1,4,5] -> 0.5*8 = 4
  #      step 2 (w1 = w0, h1 = 0): [3,0,3] -> 0.5*8 + 0.5*16 = 12                      sum 20
  #   loss = (56.5 + 42 + 20) / 9 = 118.5 / 9
  # The w-only part ("w_loss"): A 4+0+36.25+6.25 = 46.5, B 8+26 = 34, C 4+4+4 = 12 -> 92.5/9.
  np.testing.assert_allclose(metrics["loss"], 118.5 / 9.0, rtol=RTOL)
  np.testing.assert_allclose(metrics["w_loss"], 92.5 / 9.0, rtol=RTOL)
  np.testing.assert_allclose(metrics["examples"], 9.0)
  np.testing.assert_allclose(metrics["num_nonfinite_clients"], 0)


def test_strategies_agree():
  cohort = three_client_cohort()
  results = []
  for execution in EXECUTIONS.values():  # compiled once each (cached), shared with the above
    server, _, metrics = run_cached(cohort, client_lr=0.5, execution=execution)
    results.append((server.params, metrics))
  for params_i, metrics_i in results[1:]:
    for key in ("w", "head"):
      np.testing.assert_allclose(params_i[key], results[0][0][key], rtol=RTOL)
    np.testing.assert_allclose(metrics_i["loss"], results[0][1]["loss"], rtol=RTOL)


def test_unweighted_round_hand_derived():
  server, _, _ = run_cached(three_client_cohort(), client_lr=0.5, weighted=False)
  np.testing.assert_allclose(server.params["w"], UNWEIGHTED_W, rtol=RTOL)
  np.testing.assert_allclose(server.params["head"], UNWEIGHTED_H, rtol=RTOL)


def test_unweighted_round_ignores_padding_slots():
  # The runner pads a cohort with empty clients (weight 0) to split over devices; unweighted
  # averaging must still count the 3 real clients only, not 4.
  from fedjax_fm.cohort import pad_cohort  # pylint: disable=import-outside-toplevel
  alg, _ = make_alg(client_lr=0.5, weighted=False)
  padded = pad_cohort(three_client_cohort(), 4)
  assert padded.num_clients == 4
  server, _, _ = run_round(alg, init_params(), padded)
  np.testing.assert_allclose(server.params["w"], UNWEIGHTED_W, rtol=RTOL)
  np.testing.assert_allclose(server.params["head"], UNWEIGHTED_H, rtol=RTOL)


def test_server_lr():
  # w <- w0 + server_lr * mean_delta with server_lr = 0.5:
  #   w = [1,2,3] + 0.5 * [1, -5/9, -5/3] = [1.5, 31/18, 13/6];  h = 0.5 * 16/9 = 8/9.
  server, _, _ = run_cached(three_client_cohort(), client_lr=0.5, server_lr=0.5)
  np.testing.assert_allclose(server.params["w"], [1.5, 31.0 / 18.0, 13.0 / 6.0], rtol=RTOL)
  np.testing.assert_allclose(server.params["head"], 8.0 / 9.0, rtol=RTOL)


def test_padding_values_do_not_matter():
  # Same cohort with the padded slots refilled by other garbage: identical result.
  cohort = three_client_cohort()
  pad = cohort.mask == 0
  other = cohort.replace(data={"x": jnp.where(pad[..., None], -123.0, cohort.data["x"]),
                               "y": jnp.where(pad, 77.0, cohort.data["y"])})
  server_a, _, metrics_a = run_cached(cohort, client_lr=0.5)
  server_b, _, metrics_b = run_cached(other, client_lr=0.5)
  for key in ("w", "head"):
    np.testing.assert_array_equal(server_a.params[key], server_b.params[key])
  np.testing.assert_array_equal(metrics_a["loss"], metrics_b["loss"])


def test_nonfinite_client_is_dropped():
  # Client B's real examples are NaN: its delta is non-finite, so its weight becomes 0.
  #   weights (4, 0, 3): delta_w = (4*[1,-1,-3] + 3*[1,-1,0]) / 7 = [1, -1, -12/7]
  #   w = [2, 1, 3 - 12/7] = [2, 1, 9/7];  dh = (4*2 + 3*2) / 7 = 2 -> h = 2
  #   metrics count only the healthy clients: examples = 4 + 3 = 7.
  cohort = three_client_cohort()
  x = cohort.data["x"].at[1, 0].set(jnp.nan)
  cohort = cohort.replace(data={"x": x, "y": cohort.data["y"]})
  server, _, metrics = run_cached(cohort, client_lr=0.5)
  np.testing.assert_allclose(server.params["w"], [2.0, 1.0, 9.0 / 7.0], rtol=RTOL)
  np.testing.assert_allclose(server.params["head"], 2.0, rtol=RTOL)
  np.testing.assert_allclose(metrics["num_nonfinite_clients"], 1)
  np.testing.assert_allclose(metrics["examples"], 7.0)
  # A+C loss sums from test_weighted_round_hand_derived: (56.5 + 20) / 7.
  np.testing.assert_allclose(metrics["loss"], 76.5 / 7.0, rtol=RTOL)


def test_all_clients_nonfinite_leaves_server_unchanged():
  params = init_params()
  cohort = three_client_cohort()
  cohort = cohort.replace(data={"x": jnp.full_like(cohort.data["x"], jnp.nan),
                                "y": cohort.data["y"]})
  server, _, metrics = run_cached(cohort, client_lr=0.5)
  np.testing.assert_array_equal(server.params["w"], params["w"])
  np.testing.assert_array_equal(server.params["head"], params["head"])
  np.testing.assert_allclose(metrics["num_nonfinite_clients"], 3)


def test_examples_metric_is_zero_when_no_client_is_healthy():
  # With every client dropped, no example was used: "examples" must report 0 (and the mean
  # loss over no examples 0), not the clamped denominator 1.
  cohort = three_client_cohort()
  cohort = cohort.replace(data={"x": jnp.full_like(cohort.data["x"], jnp.nan),
                                "y": cohort.data["y"]})
  _, _, metrics = run_cached(cohort, client_lr=0.5)
  np.testing.assert_allclose(metrics["loss"], 0.0)
  np.testing.assert_allclose(metrics["examples"], 0.0)


def test_client_momentum_two_steps():
  # One client, momentum 0.9, lr 0.5, w0 = [1,2,3] (head ignored here: y = h0 = 0).
  #   step 1: xbar = [3,2,1]: g1 = w0 - xbar = [-2,0,2]; t1 = g1; w1 = w0 - 0.5*t1 = [2,2,2]
  #   step 2: xbar = [2,2,2]: g2 = w1 - xbar = [0,0,0]; t2 = g2 + 0.9*t1 = [-1.8,0,1.8]
  #           w2 = w1 - 0.5*t2 = [2.9, 2, 1.1]
  # The client optimizer starts fresh every round: without momentum carried across steps
  # the second step would not move (w1 == xbar).
  cohort = build_cohort(x=[[[[3, 2, 1]], [[2, 2, 2]]]], y=[[[0], [0]]], mask=[[[1], [1]]],
                        weights=[1], ids=[0])
  server, _, _ = run_cached(cohort, client_lr=0.5, client_momentum=0.9)
  np.testing.assert_allclose(server.params["w"], [2.9, 2.0, 1.1], rtol=RTOL)
  np.testing.assert_allclose(server.params["head"], 0.0, atol=1e-7)


@pytest.mark.parametrize("epochs", [1, None])
def test_make_cohort_weights_and_padding(epochs):
  """Cohort built by `make_cohort` from clients of sizes 4, 1, 2 (steps=1, batch=4).

  One local step over the whole (masked) batch makes the result independent of the shuffle.
  With epochs=1 clients B and C are padded (B: 3 slots, C: 2 slots; the padding repeats
  real rows of client A, which must be masked out); with epochs=None the slots are filled by
  cycling (B sees its example 4 times, C each example twice) -- the same means either way.
  w0 = [1,1,1], h0 = 0, lr = 0.5:
    A: x = [0,0,0],[2,0,0],[0,4,0],[2,0,8] -> xbar = [1,1,2]; y = 1,1,1,1 -> ybar = 1
       delta_A = 0.5*(xbar - w0) = [0, 0, 0.5];  dh_A = 0.5
    B: x = [3,3,3] -> delta_B = [1,1,1];  y = 5 -> dh_B = 2.5
    C: x = [1,2,3],[3,2,-3] -> xbar = [2,2,0] -> delta_C = [0.5,0.5,-0.5]; y = 2,0 -> dh_C = 0.5
  weights = sizes (4, 1, 2):
    delta = ([0,0,2] + [1,1,1] + [1,1,-1]) / 7 = [2,2,2]/7  ->  w = [9/7, 9/7, 9/7]
    dh = (4*0.5 + 2.5 + 2*0.5) / 7 = 5.5/7  ->  h = 11/14
  """
  fed = FederatedData.from_clients([
      {"x": np.array([[0, 0, 0], [2, 0, 0], [0, 4, 0], [2, 0, 8]], np.float32),
       "y": np.array([1, 1, 1, 1], np.float32)},
      {"x": np.array([[3, 3, 3]], np.float32), "y": np.array([5], np.float32)},
      {"x": np.array([[1, 2, 3], [3, 2, -3]], np.float32), "y": np.array([2, 0], np.float32)},
  ])
  cohort = make_cohort(fed, np.array([0, 1, 2]), steps=1, batch_size=4, seed=0, round_num=0,
                       epochs=epochs)
  np.testing.assert_array_equal(cohort.weights, [4, 1, 2])
  params = {"w": jnp.ones(3, jnp.float32), "head": jnp.array(0.0, jnp.float32)}
  alg, round_fn = make_alg(client_lr=0.5)  # same roles as init_params(), other values
  server, _, metrics = run_round(alg, params, cohort, round_fn=round_fn)
  np.testing.assert_allclose(server.params["w"], [9 / 7] * 3, rtol=RTOL)
  np.testing.assert_allclose(server.params["head"], 11.0 / 14.0, rtol=RTOL)
  np.testing.assert_allclose(metrics["examples"], 7.0 if epochs == 1 else 12.0)


def test_frozen_leaf_is_constant_and_not_communicated():
  # params + frozen "offset" o = [1,1,1]; loss 0.5*||w + o - x||^2: one step with lr 0.5 gives
  # w1 = w0 - 0.5*(w0 + o - xbar). One client, w0 = [1,2,3], xbar = [4,4,4]:
  #   w1 = [1,2,3] - 0.5*([2,3,4] - [4,4,4]) = [1,2,3] + [1, 0.5, 0] = [2, 2.5, 3]
  def offset_loss(params, batch, rng):
    del rng
    per = 0.5 * jnp.sum(jnp.square(params["w"] + params["offset"] - batch["x"]), axis=-1)
    return per, {}

  params = {"w": jnp.array([1.0, 2.0, 3.0]), "offset": jnp.ones(3)}
  roles = roles_lib.assign_roles(params, frozen=r"^offset$")
  alg = fedavg(offset_loss, roles, client_lr=0.5, execution=ClientExecution("vmap"))
  cohort = build_cohort(x=[[[[4, 4, 4]]]], y=[[[0]]], mask=[[[1]]], weights=[1], ids=[0])
  server, _, _ = run_round(alg, params, cohort, num_clients=1)
  np.testing.assert_allclose(server.params["w"], [2.0, 2.5, 3.0], rtol=RTOL)
  np.testing.assert_array_equal(server.params["offset"], [1.0, 1.0, 1.0])
  # Only w (3 float32 = 12 bytes) goes down and up; the frozen offset is never sent.
  assert alg.bytes_per_client(params) == (12, 12)


def test_bytes_per_client():
  # w: 3 float32 (12 bytes) + head: 1 float32 (4 bytes), both shared, both ways.
  params = init_params()
  alg = fedavg(loss_fn, roles_lib.assign_roles(params))
  assert alg.bytes_per_client(params) == (16, 16)
  # A bfloat16 leaf counts 2 bytes per element.
  params16 = {"w": jnp.zeros(3, jnp.bfloat16), "head": jnp.zeros((), jnp.float32)}
  assert fedavg(loss_fn, roles_lib.assign_roles(params16)).bytes_per_client(params16) == (10, 10)


def test_server_state_layout():
  params = init_params()
  alg = fedavg(loss_fn, roles_lib.assign_roles(params))
  server = alg.init(params, jax.random.key(0))
  assert int(server.round) == 0
  np.testing.assert_array_equal(server.params["w"], params["w"])
  # FedAvg has no personal state: the client-stacked tree has no array leaves.
  assert jax.tree_util.tree_leaves(alg.init_clients(params, 5)) == []
  # sgd(1.0) without momentum keeps no optimizer state.
  assert jax.tree_util.tree_leaves(server.opt_state) == []


def test_adamw_client_optimizer_first_step_is_a_sign_step():
  # One client, one local step: Adam's bias-corrected first step is lr * g / (|g| + eps), i.e.
  # lr * sign(g) per coordinate; vectors get no weight decay. g_w = w - x, g_h = h - y.
  fed = FederatedData.from_clients([{"x": np.array([[0.0, 5.0, 3.0]], np.float32),
                                     "y": np.array([2.0], np.float32)}])
  cohort = make_cohort(fed, np.array([0]), steps=1, batch_size=1, seed=0, round_num=0)
  alg = fedavg(loss_fn, roles_lib.assign_roles(init_params()), client_lr=0.1,
               client_optimizer="adamw")
  server = alg.init(init_params(), jax.random.key(0))
  server, _, _ = jax.jit(alg.round)(server, alg.init_clients(init_params(), 1), cohort,
                                    jax.random.key(1))
  # w = [1, 2, 3] - 0.1 * sign([1, -3, 0]) (0 stays: 0 / (0 + eps)); h = 0 + 0.1
  np.testing.assert_allclose(server.params["w"], [0.9, 2.1, 3.0], rtol=1e-5)
  np.testing.assert_allclose(server.params["head"], 0.1, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown client_optimizer 'adam'"):
    fedavg(loss_fn, roles_lib.assign_roles(init_params()), client_optimizer="adam")
