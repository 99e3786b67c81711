"""FedProx on a hand-made quadratic problem.

Per-example loss: l(w; x) = 0.5 * ||w - x||^2 (+ 0.5 * (h - y)^2 when params has a "head").
Local objective: mean_batch l + mu/2 * ||w - w_g||^2 over the *shared* leaves, w_g the global
parameters of the round, so one SGD step is

    w <- w - lr * ((w - xbar) + mu * (w - w_g)).

The first local step starts at w = w_g, where the proximal gradient is zero: FedProx differs
from FedAvg only from the second local step on. With lr = 0.5 and mu = 0.5:

    w1 = 0.5 * w_g + 0.5 * xbar1
    w2 = w1 - 0.5 * (w1 - xbar2) - 0.25 * (w1 - w_g) = 0.25 * w1 + 0.5 * xbar2 + 0.25 * w_g
       = 0.375 * w_g + 0.125 * xbar1 + 0.5 * xbar2
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import roles as roles_lib
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import fedprox
from fedjax_fm.cohort import Cohort

PAD = 1e4
P3 = [PAD, PAD, PAD]
RTOL = 1e-6
W0 = [0.0, 4.0, 8.0]


def loss_fn(params, batch, rng):
  del rng
  per = 0.5 * jnp.sum(jnp.square(params["w"] - batch["x"]), axis=-1)
  if "head" in params:
    per = per + 0.5 * jnp.square(params["head"] - batch["y"])
  return per, {}


def params_w():
  return {"w": jnp.array(W0, jnp.float32)}


def params_wh():
  return {"w": jnp.array(W0, jnp.float32), "head": jnp.array(0.0, jnp.float32)}


def two_client_cohort(ids=(0, 1)):
  """K=2 clients, 2 local steps, batch 2; w_g = [0, 4, 8].

  Client A (weight 4, all 4 slots real):
    step 1: x = [16,0,0], [0,0,0] -> xbar1 = [8,0,0];   y = 2, 2 -> ybar1 = 2
            w1 = 0.5*[0,4,8] + 0.5*[8,0,0] = [4, 2, 4]
    step 2: x = [0,8,0], [0,8,0] -> xbar2 = [0,8,0];    y = 4, 4 -> ybar2 = 4
            grad = (w1 - xbar2) + 0.5*(w1 - w_g) = [4,-6,4] + [2,-1,-2] = [6,-7,2]
            w2 = [4,2,4] - 0.5*[6,-7,2] = [1, 5.5, 3]
            (check: 0.375*[0,4,8] + 0.125*[8,0,0] + 0.5*[0,8,0] = [1, 5.5, 3])
    delta_A = [1, 1.5, -5]        (FedAvg would give w2 = 0.5*w1 + 0.5*xbar2 = [2,5,2])
  Client B (weight 2): step 1 real, step 2 all padding (skipped, no proximal step either):
    step 1: x = [4,2,0], [4,-2,0] -> xbar1 = [4,0,0];   y = 1, 3 -> ybar1 = 2
            w1 = 0.5*[0,4,8] + 0.5*[4,0,0] = [2, 2, 4]
    delta_B = [2, -2, -4]
  """
  x = [[[[16, 0, 0], [0, 0, 0]], [[0, 8, 0], [0, 8, 0]]],
       [[[4, 2, 0], [4, -2, 0]], [P3, P3]]]
  y = [[[2, 2], [4, 4]],
       [[1, 3], [PAD, PAD]]]
  mask = [[[1, 1], [1, 1]],
          [[1, 1], [0, 0]]]
  return Cohort(data={"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)},
                mask=jnp.asarray(mask, jnp.float32), weights=jnp.asarray([4.0, 2.0]),
                client_ids=jnp.asarray(ids, jnp.int32))


# Weighted (4, 2): (4*[1,1.5,-5] + 2*[2,-2,-4]) / 6 = [8, 2, -28] / 6
#   w = [0,4,8] + [4/3, 1/3, -14/3] = [4/3, 13/3, 10/3]
WEIGHTED_W = [4.0 / 3.0, 13.0 / 3.0, 10.0 / 3.0]
# Unweighted: ([1,1.5,-5] + [2,-2,-4]) / 2 = [1.5, -0.25, -4.5]  ->  w = [1.5, 3.75, 3.5]
UNWEIGHTED_W = [1.5, 3.75, 3.5]


@functools.lru_cache(maxsize=None)
def _make(with_head, personal_head, kwargs):
  params = params_wh() if with_head else params_w()
  roles = roles_lib.assign_roles(params, personal=r"^head$" if personal_head else None)
  alg = fedprox(loss_fn, roles, execution=ClientExecution("vmap"), **dict(kwargs))
  return alg, jax.jit(alg.round)


def run(cohort, with_head=False, personal_head=False, num_clients=2, **kwargs):
  """One jitted FedProx round from the initial parameters (each config compiles once)."""
  alg, round_fn = _make(with_head, personal_head, tuple(sorted(kwargs.items())))
  params = params_wh() if with_head else params_w()
  server = alg.init(params, jax.random.key(0))
  client_states = alg.init_clients(params, num_clients)
  return round_fn(server, client_states, cohort, jax.random.key(1))


def test_two_local_steps_hand_derived():
  server, _, metrics = run(two_client_cohort(), mu=0.5, client_lr=0.5)
  np.testing.assert_allclose(server.params["w"], WEIGHTED_W, rtol=RTOL)
  # The reported loss is the data loss only (no proximal term), before each step:
  #   A: step 1 (w_g): [16,0,0] -> 0.5*(256+16+64) = 168; [0,0,0] -> 0.5*80 = 40
  #      step 2 (w1 = [4,2,4]): [0,8,0] -> 0.5*(16+36+16) = 34, twice -> 68
  #   B: [4,2,0] -> 0.5*(16+4+64) = 42; [4,-2,0] -> 0.5*(16+36+64) = 58
  #   loss = (168 + 40 + 68 + 42 + 58) / 6 = 376 / 6
  np.testing.assert_allclose(metrics["loss"], 376.0 / 6.0, rtol=RTOL)
  np.testing.assert_allclose(metrics["examples"], 6.0)


def test_unweighted():
  server, _, _ = run(two_client_cohort(), mu=0.5, client_lr=0.5, weighted=False)
  np.testing.assert_allclose(server.params["w"], UNWEIGHTED_W, rtol=RTOL)


def test_mu_zero_is_fedavg():
  # FedAvg (mu = 0): delta_A = [2,5,2] - [0,4,8] = [2, 1, -6], delta_B = [2, -2, -4] as above.
  #   (4*[2,1,-6] + 2*[2,-2,-4]) / 6 = [12, 0, -32] / 6  ->  w = [2, 4, 8 - 16/3] = [2, 4, 8/3]
  # (differs from the mu = 0.5 result [4/3, 13/3, 10/3] only through client A's second step).
  server, _, _ = run(two_client_cohort(), mu=0.0, client_lr=0.5)
  np.testing.assert_allclose(server.params["w"], [2.0, 4.0, 8.0 / 3.0], rtol=RTOL)


def test_one_local_step_is_fedavg_for_any_mu():
  # Only step 1 real for both clients: the proximal gradient mu * (w_g - w_g) is zero, so
  #   A: w1 = 0.5*[0,4,8] + 0.5*[8,0,0] = [4,2,4] -> delta [4,-2,-4]; B: delta [2,-2,-4] (above)
  #   (4*[4,-2,-4] + 2*[2,-2,-4]) / 6 = [20, -12, -24] / 6  ->  w = [10/3, 2, 4]
  cohort = two_client_cohort()
  cohort = cohort.replace(mask=cohort.mask.at[:, 1].set(0.0))
  server, _, _ = run(cohort, mu=0.5, client_lr=0.5)
  np.testing.assert_allclose(server.params["w"], [10.0 / 3.0, 2.0, 4.0], rtol=RTOL)


def test_proximal_term_only_on_shared_leaves():
  """A personal head is trained by plain SGD: it has no global value to be pulled towards.

  N = 3 clients; the cohort is clients (2, 0) (A -> row 2, B -> row 0); h0 = 0 everywhere.
    A: h1 = 0.5*0 + 0.5*2 = 1;  h2 = 0.5*1 + 0.5*4 = 2.5
       (a proximal term on the head would give h2 = 1 - 0.5*((1 - 4) + 0.5*(1 - 0)) = 2.25)
    B: h1 = 0.5*0 + 0.5*2 = 1 (step 2 is padding)
    row 1 is not sampled: stays 0.
  The shared w is as in the weighted test (the head term does not touch dw).
  """
  server, client_states, _ = run(two_client_cohort(ids=(2, 0)), with_head=True,
                                 personal_head=True, num_clients=3, mu=0.5, client_lr=0.5)
  np.testing.assert_allclose(server.params["w"], WEIGHTED_W, rtol=RTOL)
  assert server.params["head"] is None
  np.testing.assert_allclose(client_states["head"], [1.0, 0.0, 2.5], rtol=RTOL)


def test_proximal_term_on_shared_head():
  """With the head shared, it is pulled towards h_g = 0 like w:
    A: h1 = 1; h2 = 1 - 0.5*((1 - 4) + 0.5*(1 - 0)) = 2.25 -> dh_A = 2.25
    B: h1 = 1 -> dh_B = 1
    h = (4*2.25 + 2*1) / 6 = 11/6
  """
  server, _, _ = run(two_client_cohort(), with_head=True, mu=0.5, client_lr=0.5)
  np.testing.assert_allclose(server.params["w"], WEIGHTED_W, rtol=RTOL)
  np.testing.assert_allclose(server.params["head"], 11.0 / 6.0, rtol=RTOL)


def test_negative_mu_raises():
  params = params_w()
  with pytest.raises(ValueError, match="mu"):
    fedprox(loss_fn, roles_lib.assign_roles(params), mu=-0.1)


def test_bytes_per_client():
  # Shared w (3 float32) both ways; a personal head is never sent.
  params = params_wh()
  alg = fedprox(loss_fn, roles_lib.assign_roles(params, personal=r"^head$"))
  assert alg.bytes_per_client(params) == (12, 12)
  alg = fedprox(loss_fn, roles_lib.assign_roles(params))
  assert alg.bytes_per_client(params) == (16, 16)
