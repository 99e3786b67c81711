"""FedPer: the body is averaged like FedAvg, the head (personalization layer) stays per client.

Model: params = {"body": {"w": f32[3]}, "head": {"b": f32[]}}; FedPer's default personal regex
'^head/' makes head/b personal, body/w shared. client_lr = 0.5, one local step per round.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import roles as roles_lib
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import fedper
from fedjax_fm.cohort import Cohort

PAD = 1e4
P3 = [PAD, PAD, PAD]
RTOL = 1e-6
N = 3


def separable_loss(params, batch, rng):
  """0.5 * ||w - x||^2 + 0.5 * (b - y)^2: one step gives w <- 0.5 w + 0.5 xbar, b likewise."""
  del rng
  per_w = 0.5 * jnp.sum(jnp.square(params["body"]["w"] - batch["x"]), axis=-1)
  return per_w + 0.5 * jnp.square(params["head"]["b"] - batch["y"]), {}


def linear_loss(params, batch, rng):
  """0.5 * r^2 with residual r = <w, x> + b - y: grad_w = r x, grad_b = r."""
  del rng
  r = batch["x"] @ params["body"]["w"] + params["head"]["b"] - batch["y"]
  return 0.5 * jnp.square(r), {"abs_residual": jnp.abs(r)}


def make_params(w=(0.0, 0.0, 0.0), b=0.0):
  return {"body": {"w": jnp.array(w, jnp.float32)}, "head": {"b": jnp.array(b, jnp.float32)}}


def build_cohort(x, y, mask, weights, ids):
  return Cohort(data={"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)},
                mask=jnp.asarray(mask, jnp.float32), weights=jnp.asarray(weights, jnp.float32),
                client_ids=jnp.asarray(ids, jnp.int32))


EXECUTIONS = {
    "vmap": ClientExecution("vmap"),
    "chunked": ClientExecution("chunked", chunk_size=1),
    "unrolled": ClientExecution("unrolled", scan_unroll=True),
}
LOSSES = {"separable": separable_loss, "linear": linear_loss}


@functools.lru_cache(maxsize=None)
def _make(loss, strategy):
  params = make_params()
  alg = fedper(LOSSES[loss], roles_lib.assign_roles(params), params, client_lr=0.5,
               execution=EXECUTIONS[strategy])
  return alg, jax.jit(alg.round)


@pytest.mark.parametrize("strategy", list(EXECUTIONS))
def test_two_rounds_body_averaged_head_personal(strategy):
  """N = 3, w0 = [0,0,0], every head row b = 0; separable loss.

  Round 1, cohort (2, 0), weights (2, 2):
    client 2: x = [1,2,3], [3,2,1] -> xbar = [2,2,2]; w = [1,1,1];   y = 4, 4 -> b = 2
    client 0: x = [-2,2,6] twice   -> w = [-1,1,3];                  y = -2, -2 -> b = -1
    body: w = ([1,1,1] + [-1,1,3]) / 2 = [0, 1, 2];  head rows: [-1, 0, 2]
  Round 2, cohort (0, 1), weights (2, 1):
    client 0: x = [2,1,0] twice -> w = 0.5*[0,1,2] + 0.5*[2,1,0] = [1,1,1], delta [1,0,-1]
              y = 1, 1 -> b = 0.5*(-1) + 0.5*1 = 0   (continues from its own row, -1)
    client 1: x = [0,3,2] (+ PAD) -> w = [0,2,2], delta [0,1,0];  y = 6 (+ PAD) -> b = 3
    body: w = [0,1,2] + (2*[1,0,-1] + [0,1,0]) / 3 = [2/3, 4/3, 4/3]
    head rows: [0, 3, 2]  (row 2 not sampled: keeps 2)
  (FedAvg would instead average the head: round 1 b = (2 + -1)/2 = 0.5 for everyone.)
  """
  alg, round_fn = _make("separable", strategy)
  params = make_params()
  server = alg.init(params, jax.random.key(0))
  clients = alg.init_clients(params, N)

  c1 = build_cohort(x=[[[[1, 2, 3], [3, 2, 1]]], [[[-2, 2, 6], [-2, 2, 6]]]],
                    y=[[[4, 4]], [[-2, -2]]], mask=[[[1, 1]], [[1, 1]]], weights=[2, 2],
                    ids=[2, 0])
  server, clients, _ = round_fn(server, clients, c1, jax.random.key(1))
  np.testing.assert_allclose(server.params["body"]["w"], [0.0, 1.0, 2.0], rtol=RTOL)
  np.testing.assert_allclose(clients["head"]["b"], [-1.0, 0.0, 2.0], rtol=RTOL)

  c2 = build_cohort(x=[[[[2, 1, 0], [2, 1, 0]]], [[[0, 3, 2], P3]]],
                    y=[[[1, 1]], [[6, PAD]]], mask=[[[1, 1]], [[1, 0]]], weights=[2, 1],
                    ids=[0, 1])
  server, clients, metrics = round_fn(server, clients, c2, jax.random.key(2))
  np.testing.assert_allclose(server.params["body"]["w"], [2 / 3, 4 / 3, 4 / 3], rtol=RTOL)
  np.testing.assert_allclose(clients["head"]["b"], [0.0, 3.0, 2.0], rtol=RTOL, atol=1e-7)
  assert server.params["head"]["b"] is None
  assert clients["body"]["w"] is None
  assert int(server.round) == 2
  # Round-2 loss before the step (w = [0,1,2]):
  #   client 0: [2,1,0] -> 0.5*(4+0+4) + 0.5*(-1-1)^2 = 4 + 2 = 6, twice;
  #   client 1: [0,3,2] -> 0.5*(0+4+0) + 0.5*(0-6)^2 = 2 + 18 = 20;  (6+6+20)/3 = 32/3
  np.testing.assert_allclose(metrics["loss"], 32.0 / 3.0, rtol=RTOL)


def test_nonfinite_client_keeps_its_head_and_is_left_out_of_the_body():
  """Cohort (0, 1), N = 3, all zeros initially; client 1's x is NaN.

    client 0: x = [2,4,6] twice -> w = [1,2,3];  y = 2, 2 -> b = 1
    client 1: its body delta is NaN -> dropped (weight 0), and its head row is not written,
              although its own head update alone would be finite (b = 0.5*0 + 0.5*5 = 2.5).
    body = [1,2,3] (client 0 alone);  head rows: [1, 0, 0]
  """
  alg, round_fn = _make("separable", "vmap")
  params = make_params()
  server = alg.init(params, jax.random.key(0))
  clients = alg.init_clients(params, N)
  nan3 = [np.nan] * 3
  cohort = build_cohort(x=[[[[2, 4, 6], [2, 4, 6]]], [[nan3, nan3]]], y=[[[2, 2]], [[5, 5]]],
                        mask=[[[1, 1]], [[1, 1]]], weights=[2, 2], ids=[0, 1])
  server, clients, metrics = round_fn(server, clients, cohort, jax.random.key(1))
  np.testing.assert_allclose(server.params["body"]["w"], [1.0, 2.0, 3.0], rtol=RTOL)
  np.testing.assert_allclose(clients["head"]["b"], [1.0, 0.0, 0.0], rtol=RTOL)
  np.testing.assert_allclose(metrics["num_nonfinite_clients"], 1)


def test_coupled_loss_trains_body_with_the_clients_own_head():
  """Linear model r = <w,x> + b - y: the body's gradient depends on the client's own head.

  w0 = [1,0,0]; head rows preset to b = (1, -2, 5); cohort (0, 1), weights (2, 1).
    client 0 (b = 1): x = [1,2,0], y = 0 -> r = 1 + 1 - 0 = 2
                      x = [1,0,0], y = 2 -> r = 1 + 1 - 2 = 0
      grad_w = ([2,4,0] + [0,0,0]) / 2 = [1,2,0];  grad_b = (2 + 0) / 2 = 1
      w = [1,0,0] - 0.5*[1,2,0] = [0.5,-1,0] (delta [-0.5,-1,0]);  b = 1 - 0.5 = 0.5
    client 1 (b = -2): x = [0,1,1], y = 2 (+ PAD) -> r = 0 - 2 - 2 = -4
      grad_w = [0,-4,-4];  grad_b = -4
      w = [1,0,0] + [0,2,2] = [1,2,2] (delta [0,2,2]);  b = -2 + 2 = 0
    body: w = [1,0,0] + (2*[-0.5,-1,0] + [0,2,2]) / 3 = [1,0,0] + [-1,0,2]/3 = [2/3, 0, 2/3]
    head rows: [0.5, 0, 5]
  (Had the clients trained from the initial head b = 0, client 0 would get r = (1, -1) and
  grad_w = [0,1,0]: a different body.)
  Metrics: loss = (0.5*4 + 0 + 0.5*16) / 3 = 10/3;  abs_residual = (2 + 0 + 4) / 3 = 2.
  """
  alg, round_fn = _make("linear", "vmap")
  params = make_params(w=(1.0, 0.0, 0.0))
  server = alg.init(params, jax.random.key(0))
  clients = alg.init_clients(params, N)
  clients = {"body": clients["body"], "head": {"b": jnp.array([1.0, -2.0, 5.0])}}
  cohort = build_cohort(x=[[[[1, 2, 0], [1, 0, 0]]], [[[0, 1, 1], P3]]],
                        y=[[[0, 2]], [[2, PAD]]], mask=[[[1, 1]], [[1, 0]]], weights=[2, 1],
                        ids=[0, 1])
  server, clients, metrics = round_fn(server, clients, cohort, jax.random.key(1))
  np.testing.assert_allclose(server.params["body"]["w"], [2 / 3, 0.0, 2 / 3], rtol=RTOL,
                             atol=1e-7)
  np.testing.assert_allclose(clients["head"]["b"], [0.5, 0.0, 5.0], rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(metrics["loss"], 10.0 / 3.0, rtol=RTOL)
  np.testing.assert_allclose(metrics["abs_residual"], 2.0, rtol=RTOL)


def test_roles_state_layout_and_bytes():
  params = make_params()
  alg = fedper(separable_loss, roles_lib.assign_roles(params), params)
  server = alg.init(params, jax.random.key(0))
  clients = alg.init_clients(params, N)
  assert server.params["head"]["b"] is None
  assert clients["body"]["w"] is None
  assert clients["head"]["b"].shape == (N,)
  # Only the body (3 float32 = 12 bytes) travels; the head never leaves the client.
  assert alg.bytes_per_client(params) == (12, 12)


def test_frozen_leaves_stay_frozen():
  params = {"backbone": {"k": jnp.ones((2, 2), jnp.float32)}, **make_params()}
  roles = roles_lib.assign_roles(params, frozen=r"^backbone/")
  alg = fedper(separable_loss, roles, params)
  server = alg.init(params, jax.random.key(0))
  clients = alg.init_clients(params, N)
  np.testing.assert_array_equal(server.params["backbone"]["k"], np.ones((2, 2)))
  assert clients["backbone"]["k"] is None
  assert alg.bytes_per_client(params) == (12, 12)


def test_custom_personal_regex():
  # Personalising the body instead: only the scalar head (4 bytes) is shared.
  params = make_params()
  alg = fedper(separable_loss, roles_lib.assign_roles(params), params, personal=r"^body/")
  assert alg.bytes_per_client(params) == (4, 4)
  assert alg.init_clients(params, N)["body"]["w"].shape == (N, 3)


def test_personal_regex_matching_nothing_raises():
  params = make_params()
  with pytest.raises(ValueError, match="matches no parameter"):
    fedper(separable_loss, roles_lib.assign_roles(params), params, personal=r"^classifier/")
