"""FedDAT on a tiny transformer: the round against a plain per-client loop, and a learning check.

Model: a 1-layer text transformer (hidden 16, no dropout) with three adapters per layer,
("personal", "shared", "frozen") = (A_c, A_s, Ā_s), and a 3-class head. Roles: A_c and the head
personal, A_s shared, Ā_s and the backbone frozen. The adapters' up-projections start at zero
(identity adapters, all forwards equal, KL = 0); the test gives each adapter its own random
up-projection so that every forward and both distillation terms are non-trivial, and sets the
frozen copy to 100 so that any forward still using it (instead of the received A_s) is far off.

The reference (`reference_client`) is a plain Python loop over one client's batches that writes the
local update of docs/algorithms.md 2.2 out by hand, with its own KL:

    z_t = DAT(A_c, Ā_s = A_s received)      (weights 1/2, 1/2)
    (1) L_s = mean_b 1/2 [CE(z_s, y) + T^2 KL(softmax(z_t/T) || softmax(z_s/T))]; Adam on A_s, head
    (2) L_c = mean_b 1/2 [CE(z_c, y) + T^2 KL(softmax(z_s/T) || softmax(z_c/T))]; Adam on A_c, head

with one Adam state per parameter group (A_s, A_c, head), as PyTorch keeps per-parameter state.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm import sharding
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import fedavg
from fedjax_fm.algorithms.feddat import (adapter_mix_loss, adapter_weights_by_mode,
                                         classification_task_loss, feddat, model_logits_fn,
                                         vqa_task_loss)
from fedjax_fm.cohort import Cohort
from fedjax_fm.models import (AdapterConfig, TransformerConfig, TransformerModel, functional,
                              transformer_roles)
from fedjax_fm.runner import RoundRunner, default_compiler_options

CONFIG = TransformerConfig(hidden_size=16, num_layers=1, num_heads=4, intermediate_size=24,
                           vocab_size=40, max_position_embeddings=16, hidden_dropout=0.0,
                           attention_dropout=0.0)
NAMES = ("personal", "shared", "frozen")
ADAPTERS = AdapterConfig(names=NAMES, bottleneck=4)
STEPS, BATCH, LENGTH, T, LR = 2, 3, 6, 3.0, 0.05
INPUTS = ("input_ids", "attention_mask")
# XLA:CPU's backend optimisations double the compile time of these tiny programs and buy nothing
# here; the numbers do not depend on them (the reference runs the same way).
FAST_COMPILE = {**default_compiler_options(), "xla_backend_optimization_level": "0"}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def _adapter(params, name):
  return params["encoder"]["layers"][0]["adapters"][name]


def _model_params(num_classes=3, seed=0):
  model = TransformerModel(CONFIG, rngs=nnx.Rngs(seed), adapters=ADAPTERS,
                           head={"kind": "classification", "num_classes": num_classes,
                                 "pooling": "mean"})
  graphdef, params = functional(model)
  rng = np.random.default_rng(seed + 100)
  for name in ("personal", "shared"):
    up = _adapter(params, name)["up"]
    up["kernel"] = jnp.asarray(rng.normal(0, 0.3, up["kernel"].shape), jnp.float32)
  frozen = _adapter(params, "frozen")
  frozen["up"]["kernel"] = jnp.full_like(frozen["up"]["kernel"], 100.0)  # must be overwritten
  roles = transformer_roles(params, trainable=("adapters/shared",),
                            personal=("adapters/personal", "head"))
  return graphdef, params, roles


def _batches(seed, shape):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 40, shape + (LENGTH,))
  lengths = rng.integers(2, LENGTH + 1, shape)
  mask = (np.arange(LENGTH) < lengths[..., None]).astype(np.int32)
  return {"input_ids": jnp.asarray(ids * mask), "attention_mask": jnp.asarray(mask),
          "label": jnp.asarray(rng.integers(0, 3, shape))}


def _stack(*trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _hand_kl(student, teacher):
  p_t = jax.nn.softmax(teacher / T, -1)
  return T ** 2 * jnp.sum(p_t * (jax.nn.log_softmax(teacher / T, -1)
                                 - jax.nn.log_softmax(student / T, -1)), -1)


OPT = optax.adam(LR)


@functools.partial(fast_jit, static_argnums=(0, 6))
def reference_step(graphdef, params, a_s_received, state, batch, m, kd=True):
  """One mini-batch of the local update, written out by hand (jitted only for speed); kd=False:
  without mutual distillation, each sub-step on its cross-entropy alone."""
  a_s, a_c, head, s_state, c_state, h_state = state

  def logits(a_s, a_c, head, weights):
    p = jax.tree_util.tree_map(lambda x: x, params)
    layer = p["encoder"]["layers"][0]["adapters"]
    layer["shared"], layer["personal"], layer["frozen"] = a_s, a_c, a_s_received  # Ā_s
    p["head"] = head
    return nnx.merge(graphdef, p)(batch["input_ids"], batch["attention_mask"],
                                  adapter_weights=weights)

  y = batch["label"]
  mean = lambda v: jnp.sum(v * m) / jnp.sum(m)  # over the real examples
  ce = optax.softmax_cross_entropy_with_integer_labels
  adam = lambda g, s, p: (lambda u, s2: (optax.apply_updates(p, u), s2))(*OPT.update(g, s, p))
  dat = {"personal": 0.5, "frozen": 0.5}
  z_t = logits(a_s, a_c, head, dat)

  def loss_global(a_s_, head_):
    z = logits(a_s_, a_c, head_, {"shared": 1.0})
    return mean(0.5 * (ce(z, y) + _hand_kl(z, z_t)) if kd else ce(z, y)), z

  (g_s, g_h), z_s = jax.grad(loss_global, argnums=(0, 1), has_aux=True)(a_s, head)
  a_s, s_state = adam(g_s, s_state, a_s)
  head, h_state = adam(g_h, h_state, head)

  def loss_local(a_c_, head_):
    z = logits(a_s, a_c_, head_, dat)
    return mean(0.5 * (ce(z, y) + _hand_kl(z, z_s)) if kd else ce(z, y))

  g_c, g_h = jax.grad(loss_local, argnums=(0, 1))(a_c, head)
  a_c, c_state = adam(g_c, c_state, a_c)
  head, h_state = adam(g_h, h_state, head)
  return a_s, a_c, head, s_state, c_state, h_state


def reference_client(graphdef, params, personal, data, mask, kd=True):
  """One client's FedDAT local update as a plain loop over its batches; a batch with no real
  example is skipped. Returns the trained (A_s, A_c, head)."""
  a_s = _adapter(params, "shared")
  a_c, head = _adapter(personal, "personal"), personal["head"]
  state = (a_s, a_c, head, OPT.init(a_s), OPT.init(a_c), OPT.init(head))
  for step in range(mask.shape[0]):
    if np.asarray(mask[step]).any():
      batch = jax.tree_util.tree_map(lambda x: x[step], data)
      state = reference_step(graphdef, params, a_s, state, batch, mask[step], kd)
  return state[:3]


@functools.lru_cache(maxsize=None)
def setup():
  """4 clients: 0 and 1 train (weights 3 and 1); 2 is padding (weight 0, no example);
  3 has a NaN personal adapter (weight 5), so its update is non-finite and must be dropped."""
  graphdef, params, roles = _model_params()
  data = _batches(1, (4, STEPS, BATCH))
  mask = np.ones((4, STEPS, BATCH), np.float32)
  mask[1, 1, 2] = 0.0  # one padded slot in client 1's second batch
  mask[2] = 0.0
  cohort = Cohort(data=data, mask=jnp.asarray(mask), weights=jnp.array([3.0, 1.0, 0.0, 5.0]),
                  client_ids=jnp.arange(4, dtype=jnp.int32))
  logits_fn = model_logits_fn(graphdef, INPUTS)
  task = classification_task_loss("label")
  return graphdef, params, roles, cohort, logits_fn, task


def _client_states(alg, params):
  states = alg.init_clients(params, 4)
  rng = np.random.default_rng(7)
  # Clients start from different personal adapters and heads.
  states = jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.normal(0, 0.05, x.shape),
                                                            x.dtype), states)
  nan = lambda x: x.at[3].set(jnp.nan)
  states["encoder"]["layers"][0]["adapters"]["personal"]["down"]["kernel"] = nan(
      states["encoder"]["layers"][0]["adapters"]["personal"]["down"]["kernel"])
  return states


@functools.lru_cache(maxsize=None)
def run_round():
  graphdef, params, roles, cohort, logits_fn, task = setup()
  alg = feddat(logits_fn, roles, params, task_loss=task, temperature=T,
               client_optimizer=optax.adam(LR), execution=ClientExecution("vmap"))
  server = alg.init(params, jax.random.key(0))
  # A stale frozen copy in the server state must not matter: the round resets it.
  stale = jax.tree_util.tree_map(lambda x: x, server.params)
  _adapter(stale, "frozen")["up"]["kernel"] = jnp.full_like(
      _adapter(stale, "frozen")["up"]["kernel"], -50.0)
  server = server.replace(params=stale)
  clients = _client_states(alg, params)
  new_server, new_clients, metrics = fast_jit(alg.round)(server, clients, cohort,
                                                        jax.random.key(1))
  return alg, server, clients, new_server, new_clients, metrics


@functools.lru_cache(maxsize=None)
def reference_results():
  graphdef, params, roles, cohort, _, _ = setup()
  _, _, clients, _, _, _ = run_round()
  out = []
  for k in (0, 1):
    row = jax.tree_util.tree_map(lambda x: x[k], clients)
    out.append(reference_client(graphdef, params, row,
                                jax.tree_util.tree_map(lambda x: x[k], cohort.data),
                                cohort.mask[k]))
  return out


def _close(a, b, atol=2e-5):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                                 atol=atol, rtol=0), a, b)


def _max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_round_matches_per_client_loop_and_weighted_mean():
  _, params, _, _, _, _ = setup()
  _, _, clients, new_server, new_clients, metrics = run_round()
  (s0, c0, h0), (s1, c1, h1) = reference_results()
  # The server's A_s is the data-size-weighted mean (3 : 1) of the clients' trained A_s; the
  # padded client (weight 0) and the NaN client are left out.
  expected = jax.tree_util.tree_map(lambda a, b: (3 * a + b) / 4, s0, s1)
  _close(_adapter(new_server.params, "shared"), expected)
  assert _max_abs_diff(_adapter(new_server.params, "shared"), _adapter(params, "shared")) > 1e-3
  assert _max_abs_diff(s0, s1) > 1e-3  # the two clients really trained A_s differently
  # Personal rows: each client's own A_c and head, as the loop computes them.
  for k, (c, h) in enumerate(((c0, h0), (c1, h1))):
    row = jax.tree_util.tree_map(lambda x: x[k], new_clients)
    _close(_adapter(row, "personal"), c)
    _close(row["head"], h)
  assert _max_abs_diff(c0, c1) > 1e-3
  assert int(metrics["num_nonfinite_clients"]) == 1
  assert float(metrics["examples"]) == 2 * STEPS * BATCH - 1  # clients 0, 1 (3 is dropped)
  for name in ("loss", "task_loss", "distill", "accuracy", "global_loss", "global_distill"):
    assert np.isfinite(float(metrics[name])), name
  assert float(metrics["distill"]) > 0 and float(metrics["global_distill"]) > 0


def test_without_mutual_distillation_each_sub_step_fits_its_task_loss_alone():
  """The "w/o MKD" ablation: the same two sub-steps and parameter groups, no KL term."""
  graphdef, params, roles, cohort, logits_fn, task = setup()
  alg = feddat(logits_fn, roles, params, task_loss=task, temperature=T,
               client_optimizer=optax.adam(LR), mutual_distillation=False,
               execution=ClientExecution("vmap"))
  clients = _client_states(alg, params)
  _, new_clients, metrics = fast_jit(alg.round)(alg.init(params, jax.random.key(0)), clients,
                                                cohort, jax.random.key(1))
  assert "distill" not in metrics and "global_distill" not in metrics
  row = jax.tree_util.tree_map(lambda x: x[0], clients)
  _, c0, h0 = reference_client(graphdef, params, row,
                               jax.tree_util.tree_map(lambda x: x[0], cohort.data),
                               cohort.mask[0], kd=False)
  new_row = jax.tree_util.tree_map(lambda x: x[0], new_clients)
  _close(_adapter(new_row, "personal"), c0)
  _close(new_row["head"], h0)
  distilled = jax.tree_util.tree_map(lambda x: x[0], run_round()[4])
  assert _max_abs_diff(new_row["head"], distilled["head"]) > 1e-4   # the KL term mattered


def test_padded_and_nonfinite_clients_keep_their_rows():
  _, _, clients, _, new_clients, _ = run_round()
  for k in (2, 3):
    before = jax.tree_util.tree_map(lambda x: x[k], clients)
    after = jax.tree_util.tree_map(lambda x: x[k], new_clients)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), before, after)
  assert np.isnan(np.asarray(
      _adapter(new_clients, "personal")["down"]["kernel"][3])).all()


def test_personal_leaves_never_reach_the_server_and_the_copy_is_the_received_a_s():
  _, params, roles, _, _, _ = setup()
  _, server, _, new_server, new_clients, _ = run_round()
  flat_roles = {roles_lib.leaf_path(p): r for p, r in jax.tree_util.tree_leaves_with_path(roles)}
  client_paths = [roles_lib.leaf_path(p) for p, _ in
                  jax.tree_util.tree_leaves_with_path(new_clients)]
  assert client_paths and all(flat_roles[p] == roles_lib.PERSONAL for p in client_paths)
  assert any(p.startswith("head/") for p in client_paths)
  assert any("/adapters/personal/" in p for p in client_paths)
  server_paths = {roles_lib.leaf_path(p) for p, _ in
                  jax.tree_util.tree_leaves_with_path(new_server.params)}
  assert not any(p.startswith("head/") or "/adapters/personal/" in p for p in server_paths)
  # Ā_s after the round = the A_s the clients received (not the stale -50, not the new A_s).
  _close(_adapter(new_server.params, "frozen"), _adapter(server.params, "shared"), atol=0)
  assert _max_abs_diff(_adapter(new_server.params, "frozen"),
                       _adapter(new_server.params, "shared")) > 1e-3
  # The backbone is untouched.
  np.testing.assert_array_equal(new_server.params["encoder"]["layers"][0]["mlp"]["fc_in"]
                                ["kernel"], params["encoder"]["layers"][0]["mlp"]["fc_in"]
                                ["kernel"])


def test_bytes_per_client_count_only_the_global_adapter():
  _, params, _, _, _, _ = setup()
  alg = run_round()[0]
  # down [16, 4] + [4], up [4, 16] + [16] float32 in 1 layer: (64 + 4 + 64 + 16) * 4 bytes.
  assert alg.bytes_per_client(params) == (592, 592)


def test_unweighted_sequential_round_compiles_once_and_resets_the_copy_every_round():
  """Clients 0 and 1 only, `weighted=False` (the reference code's mean), clients run one after
  the other (`sequential`) on a 2 x 4 mesh: round 1 gives the plain mean of the loop's A_s."""
  graphdef, params, roles, cohort, logits_fn, task = setup()
  (s0, c0, _), (s1, c1, _) = reference_results()
  alg = feddat(logits_fn, roles, params, task_loss=task, temperature=T,
               client_optimizer=optax.adam(LR), weighted=False,
               execution=ClientExecution("sequential", chunk_size=1))
  runner = RoundRunner(alg, sharding.make_mesh((("clients", 2), ("fsdp", 4))),
                       compiler_options=FAST_COMPILE)
  cohort = jax.tree_util.tree_map(lambda x: x[:2], cohort)
  clients = jax.tree_util.tree_map(lambda x: x[:2], run_round()[2])
  server, clients = runner.place(alg.init(params, jax.random.key(0)), clients)
  received = []
  for r in range(3):
    received.append(jax.device_get(_adapter(server.params, "shared")))
    server, clients, metrics = runner(server, clients, cohort, jax.random.key(r))
    _close(_adapter(server.params, "frozen"), received[-1], atol=0)  # Ā_s = received A_s
    assert np.isfinite(float(metrics["loss"]))
    if r == 0:
      unweighted = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, s0, s1)
      _close(_adapter(server.params, "shared"), unweighted)
      weighted = _adapter(run_round()[3].params, "shared")
      assert _max_abs_diff(_adapter(server.params, "shared"), weighted) > 1e-4
      _close(_adapter(jax.device_get(clients), "personal"), _stack(c0, c1))
  assert runner.compilations == 1
  assert int(server.round) == 3
  assert _max_abs_diff(received[1], received[2]) > 1e-4


def test_bad_roles_and_names_fail_early():
  graphdef, params, _, _, logits_fn, task = setup()
  all_shared = transformer_roles(params, trainable=("adapters", "head"))
  with pytest.raises(ValueError, match="'personal' to have role 'personal'"):
    feddat(logits_fn, all_shared, params, task_loss=task)
  roles = transformer_roles(params, trainable=("adapters/shared",),
                            personal=("adapters/personal", "head"))
  with pytest.raises(ValueError, match="matches no parameter"):
    feddat(logits_fn, roles, params, task_loss=task, adapter_names=("personal", "global", "frozen"))
  with pytest.raises(ValueError, match="distinct"):
    feddat(logits_fn, roles, params, task_loss=task, adapter_names=("personal", "shared"))


def _two_label_maps(seed, n):
  """Sequences of tokens all from {1..10} (class 0) or all from {11..20} (class 1); client 1
  sees the labels flipped, so one shared head cannot be right for both."""
  rng = np.random.default_rng(seed)
  cls = rng.integers(0, 2, (2, n))
  ids = rng.integers(1, 11, (2, n, LENGTH)) + 10 * cls[..., None]
  labels = np.stack([cls[0], 1 - cls[1]])
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((2, n, LENGTH), jnp.int32),
          "label": jnp.asarray(labels)}


def test_feddat_personalizes_where_fedavg_cannot():
  """10 rounds x 4 local steps x batch 8 on 2 clients with opposite label maps; accuracy of each
  client's own model (FedDAT: its DAT; FedAvg: the global model) on 64 held-out examples each."""
  graphdef, params, roles = _model_params(num_classes=2, seed=1)
  rounds, steps, batch = 10, 4, 8
  train = _two_label_maps(0, steps * batch)
  test = _two_label_maps(1, 64)
  data = jax.tree_util.tree_map(lambda x: x.reshape((2, steps, batch) + x.shape[2:]), train)
  cohort = Cohort(data=data, mask=jnp.ones((2, steps, batch)), weights=jnp.ones(2),
                  client_ids=jnp.arange(2, dtype=jnp.int32))
  logits_fn = model_logits_fn(graphdef, INPUTS)
  task = classification_task_loss("label")
  dat_loss = adapter_mix_loss(logits_fn, task, adapter_weights_by_mode(NAMES)["dat"])
  shared_loss = adapter_mix_loss(logits_fn, task, {"shared": 1.0})

  def accuracy(loss_fn, server_params, clients):
    """Each client's model (server parameters + its personal row) on its own test data."""

    def one_client(row, data):
      return jnp.mean(loss_fn(roles_lib.merge(server_params, row), data, None)[1]["accuracy"])

    return [float(a) for a in fast_jit(jax.vmap(one_client))(clients, test)]

  alg = feddat(logits_fn, roles, params, task_loss=task,
               client_optimizer=optax.adam(1e-2), execution=ClientExecution("vmap"))
  server, clients = alg.init(params, jax.random.key(0)), alg.init_clients(params, 2)
  round_fn = fast_jit(alg.round)
  losses = []
  for r in range(rounds):
    server, clients, metrics = round_fn(server, clients, cohort, jax.random.key(r))
    losses.append(float(metrics["task_loss"]))
  feddat_acc = accuracy(dat_loss, server.params, clients)

  avg_roles = transformer_roles(params, trainable=("adapters/shared", "head"))
  avg = fedavg(lambda p, b, r: shared_loss(p, b, r), avg_roles, client_lr=0.5,
               execution=ClientExecution("vmap"))
  avg_server, avg_clients = avg.init(params, jax.random.key(0)), avg.init_clients(params, 2)
  avg_round = fast_jit(avg.round)
  for r in range(rounds):
    avg_server, avg_clients, _ = avg_round(avg_server, avg_clients, cohort, jax.random.key(r))
  fedavg_acc = accuracy(shared_loss, avg_server.params, avg_clients)
  print(f"FedDAT DAT accuracy per client {feddat_acc}, task loss by round {losses}; "
        f"FedAvg accuracy per client {fedavg_acc}")
  assert losses[-1] < losses[0]
  # Measured: FedDAT 0.92 and 0.97, FedAvg 0.36 and 0.53 (one shared head: the two label maps
  # contradict each other, so it cannot beat chance on both clients).
  assert min(feddat_acc) >= 0.85
  assert np.mean(fedavg_acc) <= 0.7
  assert np.mean(feddat_acc) - np.mean(fedavg_acc) >= 0.25


def test_vqa_head_with_sigmoid_distillation_first_step_by_hand():
  """A linear toy with VQA soft targets: logits = x @ (head + sum_i w_i A_i), everything 0 at
  the start, SGD with lr 1, one client, one step, batch x = I_2, targets t = [[1, 0], [.3, 1]].

  Step (1): z_s = z_teach = 0, so the KL and its gradient vanish; soft BCE summed over the 2
  answers is 2 ln 2; its gradient in the logits is sigmoid(0) - t = 1/2 - t, so
      dL_s/dA_s = 1/2 * mean_b x_b (1/2 - t_b)^T = 1/2 * 1/2 [[-.5, .5], [.2, -.5]]
      A_s <- -dL_s/dA_s = [[.125, -.125], [-.05, .125]]   (the head moves the same way).
  The VQA score of the top answer (answer 0 on ties) is mean(1, .3) = .65.
  Step (2): z_c = x @ head' != 0 = z_s, so the distillation term is positive.
  """
  params = {"head": {"w": jnp.zeros((2, 2))},
            "adapters": {n: {"w": jnp.zeros((2, 2))} for n in NAMES}}
  roles = roles_lib.assign_roles(params, personal=r"^(head|adapters/personal)/",
                                 frozen=r"^adapters/frozen/")

  def logits_fn(p, batch, rng, weights):
    del rng
    w = p["head"]["w"] + sum(weights.get(n, 0.0) * p["adapters"][n]["w"] for n in NAMES)
    return batch["x"] @ w

  alg = feddat(logits_fn, roles, params, task_loss=vqa_task_loss("targets"), distill="sigmoid",
               client_optimizer=optax.sgd(1.0), execution=ClientExecution("vmap"))
  data = {"x": jnp.eye(2)[None, None], "targets": jnp.array([[[[1.0, 0.0], [0.3, 1.0]]]])}
  cohort = Cohort(data=data, mask=jnp.ones((1, 1, 2)), weights=jnp.ones(1),
                  client_ids=jnp.zeros(1, jnp.int32))
  server, clients, metrics = fast_jit(alg.round)(alg.init(params, jax.random.key(0)),
                                                 alg.init_clients(params, 1), cohort,
                                                 jax.random.key(1))
  expected = [[0.125, -0.125], [-0.05, 0.125]]
  np.testing.assert_allclose(server.params["adapters"]["shared"]["w"], expected, atol=1e-6)
  np.testing.assert_allclose(server.params["adapters"]["frozen"]["w"], np.zeros((2, 2)))
  assert float(metrics["global_task_loss"]) == pytest.approx(2 * np.log(2.0), rel=1e-6)
  assert float(metrics["global_distill"]) == pytest.approx(0.0, abs=1e-7)
  assert float(metrics["global_vqa_score"]) == pytest.approx(0.65, rel=1e-6)
  assert float(metrics["distill"]) > 1e-4
  assert server.params["head"]["w"] is None  # the head is personal
  # The head took both sub-steps: step (1) moved it to `expected`, step (2) moved it further.
  assert float(jnp.max(jnp.abs(clients["head"]["w"][0] - jnp.asarray(expected)))) > 1e-3
  assert alg.bytes_per_client(params) == (16, 16)  # A_s only: 4 float32
