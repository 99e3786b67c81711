"""FedBone on toy split models with answers derived by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_fm import cohort as cohort_lib, client_update, roles as roles_lib, sharding
from fedjax_fm import runner as runner_lib
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import fedbone as fb
from fedjax_fm.models import fedbone as fedbone_models
from fedjax_fm.models import transformer as transformer_lib
from fedjax_fm.roles import PERSONAL

VMAP = ClientExecution(strategy="vmap")


# A linear split model: E scales the input (personal s), G multiplies by a matrix (theta),
# H is a personal vector w; loss 1/2 (pred - y)^2 with pred = (s x) @ theta @ w.
def _embed(p, batch, rng):
  del rng
  e = p["s"] * batch["x"][:, None, :]                       # [B, 1, 2]
  return e, jnp.ones(e.shape[:2], jnp.int32)


def _general(theta, tokens, mask, rng):
  del mask, rng
  return tokens @ theta["w"]


def _task(p, f, mask, batch, rng):
  del mask, rng
  pred = f[:, 0, :] @ p["w"]
  loss = 0.5 * jnp.square(pred - batch["y"])
  return loss, {"abs_error": jnp.abs(pred - batch["y"])}


def _linear_group(name):
  return fb.TaskGroup(name, _embed, _task, {"s": PERSONAL, "w": PERSONAL})


def _cohort(xs, ys, ids, weights, mask):
  """One example per step: xs [K, steps, 2], ys [K, steps], mask [K, steps]."""
  return cohort_lib.Cohort(
      data={"x": jnp.asarray(xs, jnp.float32)[:, :, None, :],
            "y": jnp.asarray(ys, jnp.float32)[:, :, None]},
      mask=jnp.asarray(mask, jnp.float32)[:, :, None],
      weights=jnp.asarray(weights, jnp.float32), client_ids=jnp.asarray(ids, jnp.int32))


def _linear_params():
  client = {"s": jnp.array(1.0), "w": jnp.array([1.0, 1.0])}
  return {"general": {"w": jnp.eye(2)}, "clients": {"a": client, "b": client}}


def _hand_round(variant):
  """Client 0 (group a): x = [1, 0], y = 0, so pred = 1, residual r = 1 and
  g0 = r outer(e, w) = [[1, 1], [0, 0]]. Client 1 (group b): x = [1, 1], y = 3, pred = 2,
  r = -1, g1 = -[[1, 1], [1, 1]]. <g0, g1> = -2, |g0|^2 = 2, |g1|^2 = 4. Group a also has a
  padded slot (weight 0) whose data would conflict with everything, and client 0's second step
  is masked (the mean is over real steps only).
  """
  alg = fb.fedbone(_general, [_linear_group("a"), _linear_group("b")], variant=variant,
                   general_optimizer=optax.sgd(1.0), client_optimizer=optax.sgd(0.1),
                   execution=VMAP)
  params = _linear_params()
  server = alg.init(params, jax.random.key(0))
  states = alg.init_clients(params, (2, 1))
  pad = cohort_lib.PADDING_ID
  cohort_a = _cohort([[[1, 0], [5, 5]], [[-9, 9], [-9, 9]]], [[0, 0], [100, 100]], [0, pad],
                     [1.0, 0.0], [[1, 0], [0, 0]])
  cohort_b = _cohort([[[1, 1], [1, 1]]], [[3, 3]], [0], [1.0], [[1, 0]])
  return alg, jax.jit(alg.round)(server, states, (cohort_a, cohort_b), jax.random.key(1))


def test_round_applies_the_mean_of_the_projected_client_gradients():
  _, (server, states, metrics) = _hand_round("fedbone")
  # PCGrad: g0~ = g0 - (-2/4) g1 = [[.5, .5], [-.5, -.5]]; g1~ = g1 - (-2/2) g0 = [[0, 0],
  # [-1, -1]]; mean [[.25, .25], [-.75, -.75]]; sgd(1): theta = I - mean.
  np.testing.assert_allclose(server.params["general"]["w"], [[0.75, -0.25], [0.75, 1.75]],
                             atol=1e-6)
  assert float(metrics["conflict_fraction"]) == 1.0
  # Client 0's step: dL/dw = r f = [1, 0], dL/ds = r x theta w = 1 -> w = [.9, 1], s = .9.
  np.testing.assert_allclose(states[0]["w"][0], [0.9, 1.0], atol=1e-6)
  np.testing.assert_allclose(states[0]["s"][0], 0.9, atol=1e-6)
  np.testing.assert_array_equal(states[0]["w"][1], [1.0, 1.0])  # row 1 never sampled
  # Client 1: r = -1, f = [1, 1]: w = [1.1, 1.1]; dL/ds = r * pred / s = -2 -> s = 1.2.
  np.testing.assert_allclose(states[1]["w"][0], [1.1, 1.1], atol=1e-6)
  np.testing.assert_allclose(states[1]["s"][0], 1.2, atol=1e-6)
  np.testing.assert_allclose(metrics["a/loss"], 0.5, atol=1e-6)
  np.testing.assert_allclose(metrics["b/loss"], 0.5, atol=1e-6)


def test_average_and_local_baselines():
  _, (server, _, metrics) = _hand_round("average")
  # Plain mean of g0 and g1: [[0, 0], [-.5, -.5]].
  np.testing.assert_allclose(server.params["general"]["w"], [[1.0, 0.0], [0.5, 1.5]], atol=1e-6)
  assert float(metrics["conflict_fraction"]) == 1.0  # measured, not acted on
  _, (server, states, metrics) = _hand_round("local")
  np.testing.assert_array_equal(server.params["general"]["w"], np.eye(2))
  np.testing.assert_allclose(states[0]["w"][0], [0.9, 1.0], atol=1e-6)  # clients still train


def test_split_gradients_equal_the_end_to_end_gradient():
  # A nonlinear G (tanh) and a masked example, so nothing cancels by accident.
  general_fn = lambda th, e, m, r: jnp.tanh(e @ th["w"]) + th["b"]
  group = _linear_group("a")
  rng = np.random.default_rng(0)
  personal = {"s": jnp.array(0.7), "w": jnp.asarray(rng.normal(size=2), jnp.float32)}
  theta = {"w": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=2), jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=3), jnp.float32)}
  mask = jnp.array([1.0, 1.0, 0.0])
  absent = lambda tree: jax.tree_util.tree_map(lambda _: None, tree)  # nothing frozen
  g_client, g_general, sums = fb.split_step_gradients(group, general_fn, personal,
                                                      absent(personal), theta, absent(theta),
                                                      batch, mask, None)

  def composed(p, th):
    def loss_fn(params, b, r):
      tokens, token_mask = _embed(params, b, r)
      return _task(params, general_fn(th, tokens, token_mask, r), token_mask, b, r)
    return client_update.masked_loss(loss_fn, p, batch, mask, None)[0]

  want_client, want_general = jax.grad(composed, argnums=(0, 1))(personal, theta)
  for got, want in ((g_client, want_client), (g_general, want_general)):
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
  assert float(sums["count"]) == 2.0
  _, none, _ = fb.split_step_gradients(group, general_fn, personal, absent(personal), theta,
                                       absent(theta), batch, mask, None, train_general=False)
  assert none is None


# A second architecture on the same linear G: three tokens per example, mean-pooled into a
# 3-class softmax head (a personal [2, 3] matrix).
def _embed_tokens(p, batch, rng):
  del rng
  e = p["s"] * batch["x"]                                   # [B, 3, 2]
  return e, jnp.ones(e.shape[:2], jnp.int32)


def _task_classes(p, f, mask, batch, rng):
  del mask, rng
  logits = jnp.mean(f, axis=1) @ p["w"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  return loss, {"accuracy": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)}


def test_two_groups_with_different_heads_run_in_one_compiled_round_on_a_mesh():
  groups = [_linear_group("reg"),
            fb.TaskGroup("cls", _embed_tokens, _task_classes, {"s": PERSONAL, "w": PERSONAL})]
  alg = fb.fedbone(_general, groups, execution=VMAP)
  params = {"general": {"w": jnp.eye(2)},
            "clients": {"reg": {"s": jnp.array(1.0), "w": jnp.array([1.0, 1.0])},
                        "cls": {"s": jnp.array(1.0), "w": jnp.zeros((2, 3))}}}
  rng = np.random.default_rng(0)
  feds = [cohort_lib.FederatedData.from_clients(
              [{"x": rng.normal(size=(n, 2)).astype(np.float32),
                "y": rng.normal(size=n).astype(np.float32)} for n in (3, 2, 4)]),
          cohort_lib.FederatedData.from_clients(
              [{"x": rng.normal(size=(n, 3, 2)).astype(np.float32),
                "y": rng.integers(0, 3, n).astype(np.int32)} for n in (2, 5)])]
  mesh = sharding.make_mesh((("clients", 4),), jax.devices()[:4])
  runner = runner_lib.RoundRunner(alg, mesh)
  server, states = runner.place(alg.init(params, jax.random.key(0)),
                                alg.init_clients(params, (4, 4)))  # rows padded to the mesh
  before = jax.tree_util.tree_map(np.asarray, states)
  for r in range(2):
    cohorts = tuple(cohort_lib.make_cohort(f, ids, steps=2, batch_size=2, seed=0, round_num=r)
                    for f, ids in zip(feds, (np.array([r, 2]), np.array([1]))))
    server, states, metrics = runner(server, states, cohorts, jax.random.key(r))
  assert runner.traces == 1 and runner.compilations == 1
  assert {"reg/loss", "reg/abs_error", "cls/loss", "cls/accuracy",
          "conflict_fraction"} <= set(metrics)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert not np.allclose(server.params["general"]["w"], np.eye(2))
  # Sampled rows moved, the others (client 0 of "cls", the padding rows) did not.
  assert not np.array_equal(states[1]["w"][1], before[1]["w"][1])
  for row in (0, 2, 3):
    np.testing.assert_array_equal(states[1]["w"][row], before[1]["w"][row])


def test_suite_client_models_split_gradients_and_evaluation():
  """A tiny transformer encoder as G with two client models of the suite: image patches with a
  per-pixel segmentation head, and text tokens (frozen embedding tables) with a classifier."""
  config = transformer_lib.TransformerConfig(hidden_size=16, num_layers=1, num_heads=2,
                                             intermediate_size=32, vocab_size=50,
                                             hidden_dropout=0.0, attention_dropout=0.0)

  @nnx.jit  # one compiled initialisation instead of an eager program per parameter
  def build():
    rngs = nnx.Rngs(0)
    model = transformer_lib.TransformerModel(config, rngs=rngs,
                                             lora={"rank": 2, "alpha": 4.0, "targets": ("q",)})
    ink = fedbone_models.ClientModel(fedbone_models.ImageTokens(8, 4, 1, 16, rngs=rngs), 16,
                                     "segmentation", 2, bottleneck=4, patch_size=4, rngs=rngs)
    text = fedbone_models.ClientModel(fedbone_models.TextTokens(model.embeddings), 16,
                                      "classification", 3, bottleneck=4, rngs=rngs)
    return model, ink, text

  model, ink_model, text_model = build()
  graphdef, state = nnx.split(model.encoder)
  general = nnx.to_pure_dict(state)
  general_roles = fb.general_roles_for(general, "lora")
  assert roles_lib.count(general_roles, general, "shared") == 2 * 16 * 2  # lora_q a and b
  general_fn = fb.encoder_general_fn(graphdef)
  ink, ink_params = fb.client_task_group("ink", ink_model)
  text, text_params = fb.client_task_group("text", text_model)
  # The word table is frozen (one copy on the server); the text LayerNorm is personal.
  assert text.roles["embedder"]["text"]["word"]["embedding"] == roles_lib.FROZEN
  assert text.roles["embedder"]["text"]["norm"]["scale"] == PERSONAL

  rng = np.random.default_rng(0)
  batch = {"input_ids": jnp.asarray(rng.integers(1, 50, (3, 6)), jnp.int32),
           "attention_mask": jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 6], jnp.int32),
           "token_type_ids": jnp.zeros((3, 6), jnp.int32), "y": jnp.array([0, 2, 1])}
  mask = jnp.array([1.0, 1.0, 0.0])
  personal = roles_lib.select(text_params, text.roles, PERSONAL)
  frozen = roles_lib.select(text_params, text.roles, roles_lib.FROZEN)
  theta = roles_lib.select(general, general_roles, roles_lib.SHARED)
  theta_frozen = roles_lib.select(general, general_roles, roles_lib.FROZEN)
  # LoRA's B starts at zero, so dL/dA would be 0: give B a value to test a real gradient.
  theta = jax.tree_util.tree_map(lambda x: x + 0.1, theta)

  @jax.jit
  def both(personal, theta):
    split = fb.split_step_gradients(text, general_fn, personal, frozen, theta, theta_frozen,
                                    batch, mask, None)[:2]

    def composed(p, th):
      def loss_fn(params, b, r):
        tokens, token_mask = text.embed_fn(params, b, r)
        features = general_fn(roles_lib.merge(th, theta_frozen), tokens, token_mask, r)
        return text.task_fn(params, features, token_mask, b, r)
      return client_update.masked_loss(loss_fn, roles_lib.merge(p, frozen), batch, mask, None)[0]

    return split, jax.grad(composed, argnums=(0, 1))(personal, theta)

  split, end_to_end = both(personal, theta)
  for got, want in zip(jax.tree_util.tree_leaves(split), jax.tree_util.tree_leaves(end_to_end)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert float(optax.tree.norm(split[1])) > 0.0

  images = rng.uniform(size=(8, 8, 8, 1)).astype(np.float32)
  tests = [cohort_lib.FederatedData.from_clients(
               [{"x": images[:5], "y": (images[:5, ..., 0] > 0.5).astype(np.int32)},
                {"x": images[5:], "y": (images[5:, ..., 0] > 0.5).astype(np.int32)}]),
           cohort_lib.FederatedData.from_clients(
               [{k: np.asarray(v) for k, v in batch.items()}])]
  alg = fb.fedbone(general_fn, [ink, text], general_roles=general_roles, execution=VMAP)
  params = {"general": general, "clients": {"ink": ink_params, "text": text_params}}
  out = fb.make_evaluator(general_fn, [ink, text], tests, batch_size=4)(
      alg.init(params, jax.random.key(0)).params, alg.init_clients(params, (2, 1)))
  assert {"personalized/ink/loss", "personalized/ink/pixel_accuracy", "personalized/ink/iou",
          "personalized/text/loss", "personalized/text/accuracy"} <= set(out)
  assert out["personalized/per_client_loss"].shape == (3,)  # 2 ink + 1 text client
  # A fresh segmentation head predicts near 50/50: the loss is about ln 2.
  np.testing.assert_allclose(out["personalized/ink/loss"], np.log(2.0), atol=0.05)
  assert 0.0 <= float(out["personalized/ink/pixel_accuracy"]) <= 1.0


def test_bad_options_are_one_line_errors():
  groups = [_linear_group("a")]
  with pytest.raises(ValueError, match="variant"):
    fb.fedbone(_general, groups, variant="fedavg")
  with pytest.raises(ValueError, match="projection"):
    fb.fedbone(_general, groups, projection="cosine")
  with pytest.raises(ValueError, match="distinct names"):
    fb.fedbone(_general, [_linear_group("a"), _linear_group("a")])
  alg = fb.fedbone(_general, groups)
  with pytest.raises(ValueError, match="one per group"):
    alg.init_clients(_linear_params(), (1, 1))
