"""FedPFT on hand-built matrices and a tiny transformer.

Model: a 2-layer text transformer (hidden 16, FFN 24, no dropout) with LoRA on q, k, v, o and a
3-class head; roles: LoRA and head shared, the rest frozen. The sub-FM keeps layer 0 whole and
6 of layer 1's 24 FFN neurons.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms.fedpft import fedpft
from fedjax_fm.algorithms.fedpft_alignment import (alignment_loss, least_active_mask,
                                                   make_distiller, neuron_update_mask,
                                                   normalised_mse, product_mismatch)
from fedjax_fm.cohort import Cohort
from fedjax_fm.models import TransformerConfig, TransformerModel, functional, transformer_roles
from fedjax_fm.models.sub_fm import (compress_ffn, model_forward, neuron_saliency, size_report,
                                     top_neurons, with_sub_ffn)
from fedjax_fm.roles import SHARED
from fedjax_fm.runner import RoundRunner, default_compiler_options
from fedjax_fm import sharding

CONFIG = TransformerConfig(hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
                           vocab_size=40, max_position_embeddings=16, hidden_dropout=0.0,
                           attention_dropout=0.0)
LORA = {"rank": 2, "alpha": 4.0, "targets": ("q", "k", "v", "o")}
INPUTS = ("input_ids", "attention_mask")
KEEP, LENGTH = 6, 6
FAST_COMPILE = {**default_compiler_options(), "xla_backend_optimization_level": "0"}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _model():
  build = lambda: TransformerModel(CONFIG, rngs=nnx.Rngs(0), lora=LORA,
                                   head={"kind": "classification", "num_classes": 3,
                                         "pooling": "mean"})
  graphdef, _ = functional(nnx.eval_shape(build))
  params = jax.jit(lambda: functional(build())[1])()  # one program, not one per eager op
  return graphdef, params, transformer_roles(params, trainable=("lora", "head"))


def _inputs(seed, shape):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, LENGTH + 1, shape)
  mask = (np.arange(LENGTH) < lengths[..., None]).astype(np.int32)
  ids = rng.integers(1, 40, shape + (LENGTH,)) * mask
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
          "y": jnp.asarray(rng.integers(0, 3, shape))}


def _cohort(k=3, steps=2, batch=4):
  data = _inputs(1, (k, steps, batch))
  mask = np.ones((k, steps, batch), np.float32)
  mask[-1, 1] = 0.0  # the last client has one batch only
  return Cohort(data=data, mask=jnp.asarray(mask), weights=jnp.asarray(mask.sum((1, 2))),
                client_ids=jnp.arange(k, dtype=jnp.int32))


def _public(n=32):
  return {k: v for k, v in _inputs(2, (n,)).items() if k != "y"}


def _leaves(tree):
  return {roles_lib.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ---- sub-FM construction --------------------------------------------------------------------

# Hand-built FFN with D = 2 hidden units and F = 4 neurons; kernels are (in, out).
W_IN = np.array([[0., 1., 0., 3.],
                 [0., 0., 2., 4.]], np.float32)   # column i = neuron i's input weights
W_OUT = np.array([[0., 0.], [0., 0.], [1., 0.], [0., 0.]], np.float32)  # row i = its outputs


def test_saliency_and_top_k_keep_the_original_order():
  # s_i^2 = |W_in[:, i]|^2 + |W_out[i, :]|^2 = 0, 1, 4 + 1, 9 + 16 -> s = 0, 1, sqrt 5, 5.
  s = neuron_saliency(jnp.asarray(W_IN), jnp.asarray(W_OUT))
  np.testing.assert_allclose(s, [0., 1., np.sqrt(5.), 5.], rtol=1e-6)
  # top-2 by value is (3, 2); kept in original order (2, 3); top-3 adds neuron 1.
  np.testing.assert_array_equal(top_neurons(s, 2), [2, 3])
  np.testing.assert_array_equal(top_neurons(s, 3), [1, 2, 3])
  layer = lambda: {"mlp": {"fc_in": {"kernel": jnp.asarray(W_IN), "bias": jnp.arange(4.)},
                           "fc_out": {"kernel": jnp.asarray(W_OUT), "bias": jnp.ones(2)}},
                   "mlp_norm": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
  params = {"encoder": {"layers": {0: layer(), 1: layer()}}}
  sub = compress_ffn(params, 2, retained_layers=(0,))
  assert list(sub) == [1]  # layer 0 retained whole
  mlp = sub[1]["mlp"]
  np.testing.assert_array_equal(mlp["fc_in"]["kernel"], [[0., 3.], [2., 4.]])
  np.testing.assert_array_equal(mlp["fc_in"]["bias"], [2., 3.])
  np.testing.assert_array_equal(mlp["fc_out"]["kernel"], [[1., 0.], [0., 0.]])
  np.testing.assert_array_equal(mlp["fc_out"]["bias"], [1., 1.])  # fc_out's bias is kept
  with pytest.raises(ValueError, match="keep_neurons"):
    compress_ffn(params, 5)
  with pytest.raises(ValueError, match="retained_layers"):
    compress_ffn(params, 2, retained_layers=(7,))


def test_sub_fm_with_all_neurons_kept_equals_the_fm_exactly():
  graphdef, params, _ = _model()
  sub_params = with_sub_ffn(params, compress_ffn(params, CONFIG.intermediate_size))
  full, sub = _leaves(params), _leaves(sub_params)
  assert full.keys() == sub.keys()
  for path in full:
    np.testing.assert_array_equal(sub[path], full[path], err_msg=path)
  batch = _inputs(0, (3,))
  run = fast_jit(lambda p: nnx.merge(graphdef, p)(batch["input_ids"], batch["attention_mask"]))
  np.testing.assert_array_equal(run(sub_params), run(params))


@functools.lru_cache(maxsize=None)
def _rounds():
  """Three rounds of FedPFT through the runner on a 2-device clients mesh: layer-level
  alignment in init, neuron-level alignment after round 2 (a `lax.cond` in the one program)."""
  graphdef, params, roles = _model()
  alg = fedpft(model_forward(graphdef, INPUTS), roles, params, keep_neurons=KEEP,
               retained_layers=(0,), public=_public(), layer_align_steps=10, align_every=2,
               align_steps=3, align_batch_size=8, align_optimizer=optax.adam(1e-2),
               client_optimizer=optax.adam(0.05), execution=ClientExecution("vmap"))
  runner = RoundRunner(alg, sharding.make_mesh((("clients", 2), ("fsdp", -1))),
                       compiler_options=FAST_COMPILE)
  server = alg.init(params, jax.random.key(0))
  initial = jax.device_get(server)
  server, clients = runner.place(server, alg.init_clients(params, 4))
  history = []
  for r in range(3):
    server, clients, metrics = runner(server, clients, _cohort(k=4), jax.random.key(r))
    history.append((jax.device_get(server), jax.device_get(metrics)))
  return initial, history, runner.compilations


def test_lora_trained_on_the_sub_fm_plugs_into_the_full_fm():
  graphdef, params, roles = _model()
  sub_params = with_sub_ffn(params, compress_ffn(params, KEEP, retained_layers=(0,)))
  shapes = lambda t: {p: x.shape for p, x in _leaves(roles_lib.select(t, roles, SHARED)).items()}
  assert shapes(sub_params) == shapes(params)  # LoRA and head: same paths and shapes
  assert any("lora_q" in p for p in shapes(params)) and "head/classifier/kernel" in shapes(params)
  ffn = lambda t, i: t["encoder"]["layers"][i]["mlp"]["fc_in"]["kernel"].shape
  assert ffn(sub_params, 0) == (16, 24) and ffn(sub_params, 1) == (16, KEEP)
  # After a round on the sub-FM the server holds the FM with the trained LoRA plugged in.
  server, metrics = _rounds()[1][0]
  assert ffn(server.params, 1) == (16, 24)
  assert server.extra.sub_ffn[1]["mlp"]["fc_in"]["kernel"].shape == (16, KEEP)
  lora_b = server.params["encoder"]["layers"][1]["attention"]["lora_q"]["b"]
  assert float(jnp.max(jnp.abs(lora_b))) > 1e-3  # trained (B starts at zero)
  for path, x in _leaves(roles_lib.select(params, roles, roles_lib.FROZEN)).items():
    np.testing.assert_array_equal(_leaves(server.params)[path], x, err_msg=path)
  batch = _inputs(0, (3,))
  logits = fast_jit(lambda p: nnx.merge(graphdef, p)(batch["input_ids"],
                                                      batch["attention_mask"]))(server.params)
  assert logits.shape == (3, 3) and bool(jnp.all(jnp.isfinite(logits)))
  assert 0.0 < float(metrics["ffn_inactive_fraction"]) < 1.0
  assert float(metrics["ffn_exact_zero_fraction"]) == 0.0  # GELU: no exact zeros
  assert float(metrics["examples"]) == 4 * 8 - 4


# ---- alignment ----------------------------------------------------------------------------

def test_normalised_mse_and_product_term_by_hand():
  teacher = jnp.asarray([[[1., 2.], [5., 5.]]])
  student = jnp.asarray([[[1., 0.], [0., 0.]]])
  # second token padded: (0 + 4) / (1 + 4) = 0.8
  np.testing.assert_allclose(normalised_mse(student, teacher, jnp.asarray([[1, 0]])), 0.8)
  block = lambda w_in, w_out: {"mlp": {"fc_in": {"kernel": w_in}, "fc_out": {"kernel": w_out}}}
  t = block(jnp.eye(2), 2 * jnp.eye(2))            # P_T = 2 I: mean(P_T^2) = 8 / 4 = 2
  s = block(jnp.asarray([[1.], [0.]]), jnp.asarray([[1., 0.]]))  # P_S = [[1, 0], [0, 0]]
  # P_T - P_S = diag(1, 2): mean square 5 / 4, over mean(P_T^2) = 2 -> 0.625.
  np.testing.assert_allclose(product_mismatch(s, t), 0.625)
  grad = lambda flag: jax.grad(lambda b: product_mismatch(b, t, flag))(s)
  # d/dW_in = -2/4 (P_T - P_S) W_out^T / 2 = [[-0.25], [0]]
  np.testing.assert_allclose(grad(True)["mlp"]["fc_in"]["kernel"], [[-0.25], [0.]], atol=1e-7)
  # The reference code's detached product: same value, no gradient.
  np.testing.assert_allclose(product_mismatch(s, t, False), 0.625)
  np.testing.assert_array_equal(grad(False)["mlp"]["fc_in"]["kernel"], 0.0)
  # Two layers (the second already equal), product term on layer 1 only, means over 2 layers:
  # hidden (0.8 + 0) / 2 = 0.4, product 0.625 / 2 = 0.3125, loss 0.4 + 2 * 0.3125 = 1.025.
  loss, (hidden, product) = alignment_loss([student, teacher], [teacher, teacher],
                                           jnp.asarray([[1, 0]]), {1: s}, {1: t}, alpha=2.0)
  np.testing.assert_allclose([hidden, product, loss], [0.4, 0.3125, 1.025], rtol=1e-6)


@functools.lru_cache(maxsize=None)
def _distill():
  """One compiled distiller for the alignment tests: AdamW with weight decay (masking only the
  gradient would still decay the kept weights) and a neuron mask on layer 1."""
  graphdef, _, _ = _model()
  return fast_jit(make_distiller(model_forward(graphdef, INPUTS), _public(), steps=40,
                                 batch_size=8, optimizer=optax.adamw(1e-2, weight_decay=0.1),
                                 alpha=0.01))


def test_layer_alignment_loss_decreases():
  _, params, _ = _model()
  sub = compress_ffn(params, KEEP, retained_layers=(0,))
  new_sub, losses = _distill()(sub, params, neuron_update_mask({1: jnp.ones(KEEP)}),
                               jax.random.key(0))
  first, last = float(losses["loss"][0]), float(np.mean(losses["loss"][-5:]))
  assert first > 1e-3 and last < 0.5 * first, (first, last)
  assert float(losses["product"][-1]) < float(losses["product"][0])
  assert set(new_sub) == {1}


def test_least_active_mask_by_hand_and_random_ties():
  activity = jnp.asarray([0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4])
  # p = 0.5 keeps the 4 most active (0.9, 0.8, 0.7, 0.5: neurons 0, 4, 6, 2) and updates the rest.
  mask = least_active_mask(activity, 0.5, jax.random.key(0))
  np.testing.assert_array_equal(mask, [0, 1, 0, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(least_active_mask(activity, 0.25, jax.random.key(0)),
                                [0, 1, 1, 1, 0, 1, 1, 1])
  # All tied (exact-zero APoZ everywhere): still exactly half updated, chosen at random.
  ties = [least_active_mask(jnp.zeros(8), 0.5, jax.random.key(s)) for s in range(4)]
  assert all(float(m.sum()) == 4.0 for m in ties)
  assert len({tuple(np.asarray(m)) for m in ties}) > 1


def test_gradient_mask_leaves_the_most_active_neurons_bit_identical():
  _, params, _ = _model()
  sub = compress_ffn(params, KEEP, retained_layers=(0,))
  activity = jnp.asarray([0.9, 0.1, 0.5, 0.3, 0.8, 0.2])
  updated = least_active_mask(activity, 0.5, jax.random.key(0))  # neurons 1, 3, 5
  np.testing.assert_array_equal(updated, [0, 1, 0, 1, 0, 1])
  new, _ = _distill()(sub, params, neuron_update_mask({1: updated}), jax.random.key(1))
  old_mlp, new_mlp = sub[1]["mlp"], new[1]["mlp"]
  kept, upd = np.array([0, 2, 4]), np.array([1, 3, 5])
  np.testing.assert_array_equal(new_mlp["fc_in"]["kernel"][:, kept],
                                old_mlp["fc_in"]["kernel"][:, kept])
  np.testing.assert_array_equal(new_mlp["fc_in"]["bias"][kept], old_mlp["fc_in"]["bias"][kept])
  np.testing.assert_array_equal(new_mlp["fc_out"]["kernel"][kept],
                                old_mlp["fc_out"]["kernel"][kept])
  changed = lambda a, b: bool(np.all(np.any(np.asarray(a) != np.asarray(b), axis=0)))
  assert changed(new_mlp["fc_in"]["kernel"][:, upd], old_mlp["fc_in"]["kernel"][:, upd])
  assert changed(new_mlp["fc_out"]["kernel"][upd].T, old_mlp["fc_out"]["kernel"][upd].T)
  assert bool(np.any(new_mlp["fc_out"]["bias"] != old_mlp["fc_out"]["bias"]))  # output bias too


# ---- the round ------------------------------------------------------------------------------

def test_round_with_neuron_alignment_compiles_once():
  initial, history, compilations = _rounds()
  assert compilations == 1
  first, last = np.asarray(initial.extra.layer_alignment)
  assert 0.0 < last < first  # layer-level alignment in init
  assert [float(m["neuron_align"]) for _, m in history] == [0.0, 1.0, 0.0]
  kernel = lambda s: np.asarray(s.extra.sub_ffn[1]["mlp"]["fc_in"]["kernel"])
  subs = [kernel(s) for s, _ in history]
  np.testing.assert_array_equal(subs[0], kernel(initial))  # no alignment after round 1
  assert np.sum(np.any(subs[1] != subs[0], axis=0)) == KEEP // 2  # half the neurons updated
  np.testing.assert_array_equal(subs[2], subs[1])
  _, metrics = history[1]
  assert 0.0 < float(metrics["neuron_align_loss_end"]) < float(metrics["neuron_align_loss_start"])
  activity = np.asarray(history[-1][0].extra.activity)
  assert activity.shape == (1, KEEP) and np.all((activity >= 0) & (activity <= 1))


def test_size_report_and_bytes():
  graphdef, params, roles = _model()
  report = size_report(params, roles, KEEP, retained_layers=(0,))
  # layer 1's FFN shrinks from 24 to 6 neurons: (16 * 18) fc_in + 18 bias + (18 * 16) fc_out.
  assert report["fm_params"] - report["sub_fm_params"] == 16 * 18 + 18 + 18 * 16
  assert report["fm_encoder_params"] - report["sub_fm_encoder_params"] == 16 * 18 + 18 + 18 * 16
  lora = 2 * 4 * (16 * 2 + 2 * 16)  # 2 layers x 4 projections x (a + b)
  head = 16 * 3 + 3
  assert report["shared_bytes"] == 4 * (lora + head)
  alg = fedpft(model_forward(graphdef, INPUTS), roles, params, keep_neurons=KEEP,
               retained_layers=(0,), public=_public(), align_every=2, align_steps=1)
  # 3 of 6 neurons re-aligned: fc_in column + bias + fc_out row + index, then fc_out's bias and
  # the LayerNorm of layer 1; up: 6 activity counts and a token count. Every 2nd round.
  refresh = 4 * (3 * (16 + 1 + 16 + 1) + 16 + 2 * 16)
  counts = 4 * (6 + 1)
  assert alg.bytes_per_client(params) == (4 * (lora + head) + refresh // 2,
                                          4 * (lora + head) + counts // 2)


def test_bad_configurations_fail_early():
  graphdef, params, roles = _model()
  forward = model_forward(graphdef, INPUTS)
  with pytest.raises(ValueError, match="public"):
    fedpft(forward, roles, params, keep_neurons=KEEP, layer_align_steps=5)
  with pytest.raises(ValueError, match="compressed sub-FM"):
    fedpft(forward, roles, params, keep_neurons=None, align_every=1, align_steps=1,
           public=_public())
  with pytest.raises(ValueError, match="personal"):
    fedpft(forward, transformer_roles(params, trainable=("lora",), personal=("head",)), params,
           keep_neurons=KEEP)
  with pytest.raises(ValueError, match="align batch size"):
    fedpft(forward, roles, params, keep_neurons=KEEP, public=_public(4), layer_align_steps=1)


def test_full_fm_baseline_keeps_no_sub_fm_state():
  """keep_neurons=None: the sub-FM is the FM, nothing to align, no activity array (orbax
  cannot checkpoint a zero-size one), and only LoRA + head go each way."""
  graphdef, params, roles = _model()
  alg = fedpft(model_forward(graphdef, INPUTS), roles, params, keep_neurons=None)
  server = alg.init(params, jax.random.key(0))
  assert server.extra.sub_ffn == {} and server.extra.activity is None
  assert size_report(params, roles, None)["sub_fm_params"] == size_report(params, roles,
                                                                           None)["fm_params"]
  shared = roles_lib.tree_bytes(roles_lib.select(params, roles, SHARED))
  assert alg.bytes_per_client(params) == (shared, shared)
