"""Transformers at scale: FSDP placement of the frozen backbone, one backbone copy in a FedAvg
round, and bf16 compute. Runs on the 8 fake CPU devices of conftest.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from fedjax_fm import roles as roles_lib
from fedjax_fm import sharding
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import fedavg
from fedjax_fm.cohort import Cohort
from fedjax_fm.models import (AdapterConfig, TransformerConfig, TransformerModel, functional,
                              partitioning, transformer_roles)
from fedjax_fm.runner import RoundRunner

# Sizes chosen so no activation shape ([K, B, T, ...] with B=3, T=6) can be mistaken for a
# client-stacked backbone matrix ([K, 2|16|24|40, 16|24]; 2 = token types).
# No dropout: its threefry bits would add ~10 s of XLA:CPU compile to the round, and dropout
# is tested in test_transformer.py.
CONFIG = TransformerConfig(hidden_size=16, num_layers=1, num_heads=4, intermediate_size=24,
                           vocab_size=40, max_position_embeddings=16, hidden_dropout=0.0,
                           attention_dropout=0.0)
ADAPTERS = AdapterConfig(names=("personal", "shared"), bottleneck=4)
HEAD = {"kind": "classification", "num_classes": 3, "pooling": "mean"}
K, STEPS, BATCH, LENGTH = 4, 2, 3, 6


def _model(config=CONFIG, seed=0):
  return TransformerModel(config, rngs=nnx.Rngs(seed), adapters=ADAPTERS, head=HEAD)


def _batch(seed=0, shape=(BATCH,)):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 40, shape + (LENGTH,))
  lengths = rng.integers(2, LENGTH + 1, shape)
  mask = (np.arange(LENGTH) < lengths[..., None]).astype(np.int32)
  return {"input_ids": jnp.asarray(ids * mask), "attention_mask": jnp.asarray(mask),
          "label": jnp.asarray(rng.integers(0, 3, shape))}


def _flat(tree):
  return {roles_lib.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_fsdp_spec_by_hand():
  assert partitioning.fsdp_spec((8, 12), 4) == P(None, "fsdp")   # 12 is the largest divisible
  assert partitioning.fsdp_spec((12, 6), 4) == P("fsdp", None)   # 6 is not divisible by 4
  assert partitioning.fsdp_spec((8, 8), 4) == P("fsdp", None)    # tie: the first dimension
  assert partitioning.fsdp_spec((6, 10), 4) == P()               # nothing divides: replicated
  assert partitioning.fsdp_spec((16,), 4) == P()                 # vectors stay replicated
  assert partitioning.fsdp_spec((8, 12), 1) == P()


def test_sharded_forward_matches_unsharded():
  mesh = sharding.make_mesh((("clients", 2), ("fsdp", 4)))
  graphdef, params = functional(_model())
  roles = transformer_roles(params)
  specs = _flat(partitioning.param_specs(params, 4, roles))
  assert specs["embeddings/word/embedding"] == P("fsdp", None)            # [40, 16]
  assert specs["encoder/layers/0/mlp/fc_in/kernel"] == P(None, "fsdp")     # [16, 24]
  assert specs["encoder/layers/0/attention/query/bias"] == P()
  assert specs["encoder/layers/0/adapters/shared/down/kernel"] == P()      # trained: replicated
  assert specs["head/classifier/kernel"] == P()
  # Without roles, the backbone is found by path: the same specs.
  assert _flat(partitioning.param_specs(params, 4)) == specs

  placed = partitioning.shard_params(params, mesh, roles)
  word = _flat(placed)["embeddings/word/embedding"]
  assert {s.data.shape for s in word.addressable_shards} == {(10, 16)}  # really split 4 ways
  batch = _batch()
  forward = jax.jit(lambda p: nnx.merge(graphdef, p)(batch["input_ids"],
                                                     batch["attention_mask"]))
  np.testing.assert_allclose(forward(placed), forward(params), atol=1e-5, rtol=0)


def _shapes_in(jaxpr, out):
  """Every variable shape in a jaxpr and its sub-jaxprs (scan, pjit, custom_vjp, ...)."""
  for eqn in jaxpr.eqns:
    for v in list(eqn.invars) + list(eqn.outvars):
      if hasattr(v, "aval") and hasattr(v.aval, "shape"):
        out.add(tuple(v.aval.shape))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          _shapes_in(inner, out)
  return out


def test_fedavg_round_never_stacks_the_backbone():
  graphdef, params = functional(_model())
  roles = transformer_roles(params, personal=("adapters/personal",))
  flat_params, flat_roles = _flat(params), _flat(roles)

  def loss_fn(p, batch, rng):
    logits = nnx.merge(graphdef, p)(batch["input_ids"], batch["attention_mask"], rng=rng)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return loss, {"accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)}

  alg = fedavg(loss_fn, roles, client_lr=0.1, execution=ClientExecution("vmap"))
  cohort = Cohort(data=_batch(1, (K, STEPS, BATCH)), mask=jnp.ones((K, STEPS, BATCH)),
                  weights=jnp.full((K,), 4.0), client_ids=jnp.arange(K, dtype=jnp.int32))
  mesh = sharding.make_mesh((("clients", 2), ("fsdp", 4)))
  runner = RoundRunner(alg, mesh)
  server, clients = runner.place(alg.init(params, jax.random.key(0)), alg.init_clients(params, K))

  # Client-stacked state: only the personal adapters, each with a leading client axis.
  stacked = _flat(clients)
  assert stacked and all(flat_roles[p] == roles_lib.PERSONAL for p in stacked)
  assert all(x.shape == (K,) + flat_params[p].shape for p, x in stacked.items())

  # The compiled round: no value anywhere in it is a backbone matrix with a client axis, while
  # the trained adapter matrices do appear per client (so the check can fail).
  jaxpr = jax.make_jaxpr(alg.round)(server, clients, cohort, jax.random.key(1))
  shapes = _shapes_in(jaxpr.jaxpr, set())
  backbone = {x.shape for p, x in flat_params.items()
              if flat_roles[p] == roles_lib.FROZEN and x.ndim >= 2}
  trained = {x.shape for p, x in flat_params.items()
             if flat_roles[p] != roles_lib.FROZEN and x.ndim >= 2}
  assert backbone and not {(K,) + s for s in backbone} & shapes, \
      {(K,) + s for s in backbone} & shapes
  assert {(K,) + s for s in trained} <= shapes

  new_server, new_clients, metrics = runner(server, clients, cohort, jax.random.key(1))
  assert runner.compilations == 1
  assert np.isfinite(float(metrics["loss"])) and int(metrics["num_nonfinite_clients"]) == 0
  # The server holds every backbone leaf exactly once, unstacked and unchanged; the shared
  # adapters and head moved.
  server_flat = _flat(new_server.params)
  for path, x in flat_params.items():
    role = flat_roles[path]
    if role == roles_lib.PERSONAL:
      assert server_flat.get(path) is None
      continue
    assert server_flat[path].shape == x.shape, path
    if role == roles_lib.FROZEN:
      np.testing.assert_array_equal(server_flat[path], x, err_msg=path)
  assert np.abs(server_flat["encoder/layers/0/adapters/shared/up/kernel"]).max() > 0
  # Each client trained its own personal adapter (zero-initialised up-projection moved).
  personal_up = _flat(new_clients)["encoder/layers/0/adapters/personal/up/kernel"]
  assert personal_up.shape == (K, 4, 16) and np.abs(np.asarray(personal_up)).max() > 0


def test_round_with_fsdp_sharded_backbone_equals_replicated():
  """RoundRunner(param_shardings=...) keeps the frozen backbone split over `fsdp` through the
  round (in and out), and computes what the replicated round computes."""
  graphdef, params = functional(_model())
  roles = transformer_roles(params, personal=("adapters/personal",))

  def loss_fn(p, batch, rng):
    logits = nnx.merge(graphdef, p)(batch["input_ids"], batch["attention_mask"], rng=rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}

  alg = fedavg(loss_fn, roles, client_lr=0.1, execution=ClientExecution("vmap"))
  cohort = Cohort(data=_batch(2, (K, STEPS, BATCH)), mask=jnp.ones((K, STEPS, BATCH)),
                  weights=jnp.arange(1.0, K + 1), client_ids=jnp.arange(K, dtype=jnp.int32))
  mesh = sharding.make_mesh((("clients", 2), ("fsdp", 4)))
  results = []
  for shardings in (None, partitioning.param_shardings(params, mesh, roles)):
    runner = RoundRunner(alg, mesh, param_shardings=shardings)
    server, clients = runner.place(alg.init(params, jax.random.key(0)),
                                   alg.init_clients(params, K))
    for r in range(2):
      server, clients, _ = runner(server, clients, cohort, jax.random.key(r))
    assert runner.compilations == 1
    results.append((server, clients))
  (rep_server, rep_clients), (fsdp_server, fsdp_clients) = results
  kernel = fsdp_server.params["encoder"]["layers"][0]["mlp"]["fc_in"]["kernel"]
  assert "fsdp" in kernel.sharding.spec  # still split after two rounds
  assert len({str(s.index) for s in kernel.addressable_shards}) == 4
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  jax.tree_util.tree_map(close, rep_server.params, fsdp_server.params)
  jax.tree_util.tree_map(close, rep_clients, fsdp_clients)


def test_bf16_compute_is_close_to_fp32():
  bf16 = dataclasses.replace(CONFIG, dtype=jnp.bfloat16)
  g32, p32 = functional(_model(CONFIG))
  g16, p16 = functional(_model(bf16))
  # Same parameters, stored in float32 either way; only the compute dtype differs.
  for a, b in zip(jax.tree_util.tree_leaves(p32), jax.tree_util.tree_leaves(p16)):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  batch = _batch()

  def forward(graphdef, params):
    model = nnx.merge(graphdef, params)
    hidden, mask = model.features(batch["input_ids"], batch["attention_mask"])
    return jnp.mean(model.head(hidden, mask).astype(jnp.float32) ** 2), hidden

  loss32, hidden32 = jax.jit(forward, static_argnums=0)(g32, p32)
  (loss16, hidden16), grads16 = jax.jit(jax.value_and_grad(forward, argnums=1, has_aux=True),
                                        static_argnums=0)(g16, p16)
  assert hidden32.dtype == jnp.float32 and hidden16.dtype == jnp.bfloat16
  # bf16 keeps ~3 significant digits; LayerNormed hidden states are O(1).
  np.testing.assert_allclose(hidden16.astype(jnp.float32), hidden32, atol=0.1, rtol=0)
  assert np.abs(np.asarray(hidden16.astype(jnp.float32) - hidden32)).max() > 0  # really bf16
  np.testing.assert_allclose(loss16, loss32, rtol=0.1)
  # Training in bf16 gives float32 gradients (the parameters' dtype), all finite.
  for path, g in _flat(grads16).items():
    assert g.dtype == jnp.float32 and np.all(np.isfinite(g)), path
