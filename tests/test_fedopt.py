"""FedOpt (FedAdam, FedYogi, FedAdagrad, FedAvgM): the server step on a hand-made delta.

Per-example loss 0.5 * ||w - x||^2 and one local SGD step with client_lr = 1 move a client
exactly to the mean of its real examples: w_k = xbar_k, delta_k = xbar_k - w.

Cohort (steps=1, batch=4), w0 = [1, 1, 1]:
  A (weight 3; 3 real examples, 1 padded slot): x = [1,-3,1], [3,0,1], [2,0,1]
     xbar_A = [6,-3,3]/3 = [2,-1,1]  ->  delta_A = [1, -2, 0]
  B (weight 1; 1 real example, 3 padded slots): x = [-3,3,1]  ->  delta_B = [-4, 2, 0]
  weighted mean delta d = (3*[1,-2,0] + [-4,2,0]) / 4 = [-0.25, -1, 0]
  pseudo-gradient g = -d = [0.25, 1, 0]
The weighted mean of the client means is xbar_w = w0 + d = [0.75, 0, 1] (the FedAvg result),
and in any later round from w the mean delta is again xbar_w - w.

Server optimizers (optax, lr = 0.1, b1 = 0.9, b2 = 0.99, eps = 1e-3 unless stated):
  Adam:    m1 = 0.1 g, v1 = 0.01 g^2; bias correction m_hat = m1 / 0.1 = g, v_hat = v1 / 0.01
           = g^2, so the first step is  w1 = w0 - lr * g / (|g| + eps)  (lr * sign(g), shrunk by eps).
  Yogi:    optax starts BOTH moments at 1e-6 and bias-corrects:
           m1 = 0.9e-6 + 0.1 g -> m_hat = g + 9e-6
           v1 = 1e-6 - 0.01 * sign(1e-6 - g^2) * g^2 = 1e-6 + 0.01 g^2 (g^2 > 1e-6; = 1e-6 at g=0)
             -> v_hat = 1e-4 + g^2
           w1 = w0 - lr * (g + 9e-6) / (sqrt(g^2 + 1e-4) + eps)
           (so a coordinate with g = 0 still moves by -lr * 9e-6 / 0.011 = -8.18e-5).
  Adagrad: accumulator starts at 0.1: s1 = 0.1 + g^2; w1 = w0 - lr * g / sqrt(s1 + eps).
  AvgM:    sgd with momentum: t1 = g, w1 = w0 - lr * t1; t2 = g2 + 0.9 t1, ...
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import roles as roles_lib
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import fedadam, fedavgm, fedopt, fedyogi
from fedjax_fm.cohort import Cohort

PAD = 1e4
P3 = [PAD, PAD, PAD]
RTOL = 1e-6
W0 = [1.0, 1.0, 1.0]
MEAN_DELTA = np.array([-0.25, -1.0, 0.0])


def loss_fn(params, batch, rng):
  del rng
  return 0.5 * jnp.sum(jnp.square(params["w"] - batch["x"]), axis=-1), {}


def init_params():
  return {"w": jnp.array(W0, jnp.float32)}


def cohort():
  x = [[[[1, -3, 1], [3, 0, 1], [2, 0, 1], P3]],
       [[[-3, 3, 1], P3, P3, P3]]]
  mask = [[[1, 1, 1, 0]], [[1, 0, 0, 0]]]
  return Cohort(data={"x": jnp.asarray(x, jnp.float32)}, mask=jnp.asarray(mask, jnp.float32),
                weights=jnp.asarray([3.0, 1.0]), client_ids=jnp.asarray([0, 1], jnp.int32))


FACTORIES = {"fedadam": fedadam, "fedyogi": fedyogi, "fedavgm": fedavgm, "fedopt": fedopt}


@functools.lru_cache(maxsize=None)
def _make(name, kwargs):
  alg = FACTORIES[name](loss_fn, roles_lib.assign_roles(init_params()), client_lr=1.0,
                        execution=ClientExecution("vmap"), **dict(kwargs))
  return alg, jax.jit(alg.round)


def run_rounds(name, num_rounds=1, data=None, **kwargs):
  alg, round_fn = _make(name, tuple(sorted(kwargs.items())))
  params = init_params()
  server = alg.init(params, jax.random.key(0))
  client_states = alg.init_clients(params, 2)
  trajectory = []
  for r in range(num_rounds):
    server, client_states, _ = round_fn(server, client_states, data or cohort(),
                                        jax.random.key(r))
    trajectory.append(np.asarray(server.params["w"]))
  return server, trajectory


def test_fedadam_first_step():
  # g = [0.25, 1, 0]:  w1 = 1 - 0.1 * [0.25/0.251, 1/1.001, 0]
  #                       = 1 - 0.1 * [0.996015936255, 0.999000999001, 0]
  server, (w1,) = run_rounds("fedadam", server_lr=0.1)
  np.testing.assert_allclose(w1, [0.900398406375, 0.9000999001, 1.0], rtol=RTOL)
  adam_state = server.opt_state[0]
  assert int(adam_state.count) == 1
  # m1 = 0.1 g, v1 = 0.01 g^2 (stored without bias correction).
  np.testing.assert_allclose(adam_state.mu["w"], [0.025, 0.1, 0.0], rtol=RTOL)
  np.testing.assert_allclose(adam_state.nu["w"], [0.000625, 0.01, 0.0], rtol=RTOL)


def test_fedadam_second_step_uses_server_state():
  # Round 2 starts at w1 = [0.900398406375, 0.9000999001, 1]:
  #   d2 = xbar_w - w1 = [0.75, 0, 1] - w1  ->  g2 = [0.150398406375, 0.9000999001, 0]
  #   m2 = 0.9 * 0.1 g1 + 0.1 g2 = [0.037539840637, 0.18000999001, 0]
  #   v2 = 0.99 * 0.01 g1^2 + 0.01 g2^2 = [0.000844946806, 0.018001798302, 0]
  #   m_hat = m2 / (1 - 0.9^2) = m2 / 0.19 = [0.197578108618, 0.947421000053, 0]
  #   v_hat = v2 / (1 - 0.99^2) = v2 / 0.0199 = [0.042459638513, 0.90461297998, 0]
  #   w2 = w1 - 0.1 * m_hat / (sqrt(v_hat) + 1e-3) = [0.804976489521, 0.800592536181, 1]
  server, (_, w2) = run_rounds("fedadam", num_rounds=2, server_lr=0.1)
  np.testing.assert_allclose(w2, [0.804976489521, 0.800592536181, 1.0], rtol=2e-6)
  assert int(server.opt_state[0].count) == 2
  assert int(server.round) == 2


def test_fedyogi_first_step():
  #   (g + 9e-6) / (sqrt(g^2 + 1e-4) + 1e-3):
  #     g = 0.25: 0.250009 / (0.250199920064 + 0.001) = 0.995259074670
  #     g = 1:    1.000009 / (1.000049998750 + 0.001) = 0.998960093151
  #     g = 0:    9e-6 / (0.01 + 0.001)                = 0.000818181818
  #   w1 = 1 - 0.1 * [...] = [0.900474092533, 0.900103990685, 0.999918181818]
  _, (w1,) = run_rounds("fedyogi", server_lr=0.1)
  np.testing.assert_allclose(w1, [0.900474092533, 0.900103990685, 0.999918181818], rtol=RTOL)


def test_fedadagrad_first_step():
  #   g / sqrt(0.1 + g^2 + 1e-3):
  #     g = 0.25: 0.25 / sqrt(0.1635) = 0.25 / 0.404351332383 = 0.618274208537
  #     g = 1:    1 / sqrt(1.101)     = 1 / 1.049285471166    = 0.953029492430
  #     g = 0:    0
  #   w1 = 1 - 0.1 * [...] = [0.938172579146, 0.904697050757, 1]
  _, (w1,) = run_rounds("fedopt", server="adagrad", server_lr=0.1)
  np.testing.assert_allclose(w1, [0.938172579146, 0.904697050757, 1.0], rtol=RTOL)


def test_fedavgm_two_rounds():
  # server_lr = 0.5, momentum = 0.9.
  #   round 1: t1 = g1 = -d;  w1 = w0 + 0.5 d = [0.875, 0.5, 1]      (same as FedAvg, lr 0.5)
  #   round 2: d2 = xbar_w - w1 = (w0 + d) - (w0 + 0.5 d) = 0.5 d  ->  g2 = -0.5 d
  #            t2 = g2 + 0.9 t1 = -1.4 d;  w2 = w1 - 0.5 t2 = w0 + 1.2 d = [0.7, -0.2, 1]
  _, (w1, w2) = run_rounds("fedavgm", num_rounds=2, server_lr=0.5, momentum=0.9)
  np.testing.assert_allclose(w1, 1.0 + 0.5 * MEAN_DELTA, rtol=RTOL)
  np.testing.assert_allclose(w2, [0.7, -0.2, 1.0], rtol=RTOL)


def test_fedavgm_without_momentum_is_fedavg():
  # momentum 0, server_lr 0.5: w1 = w0 + 0.5 d; w2 = w1 + 0.5 * (0.5 d) = w0 + 0.75 d
  #   = [0.8125, 0.25, 1]
  _, (w1, w2) = run_rounds("fedopt", num_rounds=2, server="avgm", server_lr=0.5, momentum=0.0)
  np.testing.assert_allclose(w1, [0.875, 0.5, 1.0], rtol=RTOL)
  np.testing.assert_allclose(w2, [0.8125, 0.25, 1.0], rtol=RTOL)


def test_no_healthy_client_keeps_server_optimizer_state():
  # Every client non-finite: neither the parameters nor Adam's moments/count may move.
  bad = cohort()
  bad = bad.replace(data={"x": jnp.full_like(bad.data["x"], jnp.nan)})
  server, (w1,) = run_rounds("fedadam", data=bad, server_lr=0.1)
  np.testing.assert_array_equal(w1, W0)
  assert int(server.opt_state[0].count) == 0
  np.testing.assert_array_equal(server.opt_state[0].mu["w"], [0.0, 0.0, 0.0])


def test_unknown_server_optimizer_raises():
  with pytest.raises(ValueError, match="unknown FedOpt server optimizer"):
    fedopt(loss_fn, roles_lib.assign_roles(init_params()), server="sgdd")


def test_bytes_per_client():
  params = init_params()
  alg = fedadam(loss_fn, roles_lib.assign_roles(params))
  assert alg.bytes_per_client(params) == (12, 12)
