"""FedPFT on a decoder LM (issue 15): `fedpft` with `decoder_proxy` runs a tiny decoder's round,
compiled once; clients train LoRA on the compressed sub-FM (every layer's SwiGLU FFN cut to
`KEEP` neurons); the aggregated LoRA plugs back into the full FM at the kept neurons; the
backbone never changes. Alignment and retained layers on the decoder are refused.

The check that clients train on the sub-FM: the same 2 rounds run as the full-FM baseline
(``keep_neurons=None``) on the sub-FM built as a model of its own (width `KEEP`) must give the
sub-FM's LoRA that FedPFT's FM holds at its kept neurons.
"""

import jax
import numpy as np
import optax
import pytest

from fedjax_fm import experiment
from fedjax_fm import roles as roles_lib
from fedjax_fm.algorithms.fedpft import decoder_proxy, fedpft
from fedjax_fm.models import decoder_sub_fm
from tests.test_decoder_algorithms import _config, _paths, run_rounds

KEEP, LAYERS, HIDDEN, WIDTH, RANK = 12, 2, 32, 48, 4
LORA = dict(rank=RANK, alpha=8.0, targets=("v", "gate", "down"))


@pytest.fixture(scope="module")
def federation():
  return experiment.build_data(_config(lora=LORA))


@pytest.fixture(scope="module")
def bundle(federation):
  return experiment.build_model(_config(lora=LORA), federation)


def _run(bundle, params, federation, keep_neurons, num_devices=1):
  """FedPFT with `decoder_proxy` from `params`: 2 rounds on `num_devices` devices."""
  server, _, history, runner = run_rounds(
      lambda ex: fedpft(decoder_proxy(bundle.loss(True)), bundle.roles, params,
                        keep_neurons=keep_neurons, client_optimizer=optax.adam(0.05),
                        execution=ex), params, federation, num_devices)
  return runner.alg, server, history, runner


@pytest.fixture(scope="module")
def run(bundle, federation):
  return _run(bundle, bundle.params, federation, KEEP)


def test_fedpft_runs_a_decoder_round_compiled_once_on_the_sub_fm(bundle, run):
  alg, server, history, runner = run
  assert (runner.traces, runner.compilations) == (1, 1)
  assert all(np.isfinite(h["loss"]) for h in history)
  assert {"ffn_inactive_fraction", "neuron_align"}.isdisjoint(history[0])  # no alignment
  # The server's sub-FM: KEEP neurons in every stacked layer, its kernels cut from the FM's.
  sub = server.extra.sub_ffn
  assert sub["neurons"].shape == (LAYERS, KEEP) and server.extra.activity is None
  assert sub["ffn"]["gate"]["kernel"].shape == sub["ffn"]["up"]["kernel"].shape == \
      (LAYERS, HIDDEN, KEEP)
  assert sub["ffn"]["down"]["kernel"].shape == (LAYERS, KEEP, HIDDEN)
  expected = decoder_sub_fm.compress_decoder_ffn(bundle.params, KEEP)["layers"]["mlp"]
  for n in ("gate", "up", "down"):
    np.testing.assert_array_equal(sub["ffn"][n]["kernel"], expected[n]["kernel"])
  # The FM keeps its full width, its backbone bit for bit; shared LoRA moved.
  initial, got = _paths(bundle.params), _paths(server.params)
  assert got["layers/mlp/gate/kernel"].shape == (LAYERS, HIDDEN, WIDTH)
  for p, x in initial.items():
    assert got[p].shape == x.shape, p
    if "/lora_" not in p:
      np.testing.assert_array_equal(got[p], x, err_msg=p)
  for p in ("layers/attention/lora_v/b", "layers/mlp/lora_gate/b", "layers/mlp/lora_down/a"):
    assert not np.array_equal(got[p], initial[p]), p
  # Up and down: the sub-FM's LoRA, narrower than the FM's.
  full_lora = roles_lib.tree_bytes(roles_lib.select(bundle.params, bundle.roles,
                                                    roles_lib.SHARED))
  cut = 4 * LAYERS * RANK * (WIDTH - KEEP) * 2  # lora_gate/b columns and lora_down/a rows
  assert alg.bytes_per_client(bundle.params) == (full_lora - cut, full_lora - cut)


def test_kept_neurons_lora_is_the_sub_fm_trained_alone_the_rest_untouched(bundle, federation,
                                                                           run):
  _, server, history, _ = run
  neurons = np.asarray(server.extra.sub_ffn["neurons"])
  # The reference: the sub-FM as a model of its own (width KEEP), the same 2 rounds as
  # FedPFT's full-FM baseline (nothing compressed: plain LoRA training on it).
  sub_model = decoder_sub_fm.compress_decoder_ffn(bundle.params, KEEP)
  _, ref, ref_history, _ = _run(bundle, sub_model, federation, None)
  assert ref.extra.sub_ffn == {} and ref.extra.activity is None
  np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in ref_history],
                             rtol=1e-5)
  cut = _paths(decoder_sub_fm.cut_decoder_ffn(server.params, neurons))
  for p, x in _paths(ref.params).items():
    np.testing.assert_allclose(cut[p], x, rtol=1e-5, atol=1e-6, err_msg=p)
  # The other neurons' LoRA slices are the FM's initial ones.
  initial, got = bundle.params["layers"]["mlp"], server.params["layers"]["mlp"]
  for layer in range(LAYERS):
    dropped = np.setdiff1d(np.arange(WIDTH), neurons[layer])
    assert len(dropped) == WIDTH - KEEP
    np.testing.assert_array_equal(got["lora_down"]["a"][layer][dropped],
                                  np.asarray(initial["lora_down"]["a"][layer])[dropped])
    np.testing.assert_array_equal(got["lora_gate"]["b"][layer][:, dropped],
                                  np.asarray(initial["lora_gate"]["b"][layer])[:, dropped])


def test_one_and_eight_devices_agree(bundle, federation, run):
  """The same 2 rounds with the clients over 8 fake devices: cut, train, aggregate and plug
  back give the 1-device run's FM and sub-FM."""
  assert len(jax.devices()) >= 8, "conftest.py sets 8 fake CPU devices"
  _, ref, ref_history, _ = run
  _, got, history, runner = _run(bundle, bundle.params, federation, KEEP, num_devices=8)
  assert runner.compilations == 1
  # Adam(0.05) scales each step to about the learning rate whatever the gradient's size, so
  # the 8-device reductions' float rounding shows in the LoRA at ~1e-5 (measured 1.06e-5).
  close = lambda x, y: np.testing.assert_allclose(x, y, atol=5e-5, rtol=0)
  jax.tree_util.tree_map(close, ref.params, got.params)
  jax.tree_util.tree_map(close, ref.extra.sub_ffn, got.extra.sub_ffn)
  np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in ref_history],
                             rtol=1e-5)


def test_plug_is_the_inverse_of_cut_at_the_kept_neurons(bundle):
  params = bundle.params
  neurons = decoder_sub_fm.salient_neurons(params, KEEP)
  sub = decoder_sub_fm.cut_decoder_ffn(params, neurons)
  bumped = jax.tree_util.tree_map(lambda x: x + 1.0, sub)
  plugged = decoder_sub_fm.plug_decoder_ffn(params, bumped, neurons)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         decoder_sub_fm.cut_decoder_ffn(plugged, neurons), bumped)
  assert plugged["layers"]["mlp"]["down"]["kernel"].shape == (LAYERS, WIDTH, HIDDEN)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer_align_steps=2), "alignment is not supported on the decoder"),
    (dict(align_every=1, align_steps=1), "alignment is not supported on the decoder"),
    (dict(retained_layers=(0,)), r"retained_layers=\(0,\).*stacked"),
])
def test_what_the_decoder_does_not_support_is_named(bundle, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fedpft(decoder_proxy(bundle.loss(True)), bundle.roles, bundle.params, keep_neurons=KEEP,
           public={"input_ids": np.zeros((4, 8), np.int32),
                   "attention_mask": np.ones((4, 8), np.int32)}, **kwargs)


def test_decoder_roles_mistakes_are_named(bundle):
  loss = bundle.loss(True)
  personal = jax.tree_util.tree_map_with_path(
      lambda p, r: roles_lib.PERSONAL if "lora_down" in roles_lib.leaf_path(p) else r,
      bundle.roles)
  with pytest.raises(ValueError, match="personal"):
    fedpft(decoder_proxy(loss), personal, bundle.params, keep_neurons=KEEP)
  kernel = jax.tree_util.tree_map_with_path(
      lambda p, r: roles_lib.SHARED if roles_lib.leaf_path(p) == "layers/mlp/up/kernel" else r,
      bundle.roles)
  with pytest.raises(ValueError, match="layers/mlp/up/kernel is trained"):
    fedpft(decoder_proxy(loss), kernel, bundle.params, keep_neurons=KEEP)
  with pytest.raises(ValueError, match="decoder_proxy"):  # the encoder default on a decoder
    fedpft(lambda p, b, r: None, bundle.roles, bundle.params, keep_neurons=KEEP)
