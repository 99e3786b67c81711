"""The existing algorithms on a decoder LM with LoRA (issue 15, part 3): FedAvg, FedProx, FedPer,
Local and FFGG run a tiny decoder's round through their factories unchanged, each compiled
once; the frozen backbone is one server copy, never stacked per client; FedAvg lowers the
next-token loss; 1 and 8 fake devices agree. Also the ``decoder`` model builder's config
contract and the synthetic token federation.

Cheap by construction: one numpy-random model and one federation per module, 2 rounds per
algorithm, one 8-device rerun.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_fm import cohort as cohort_lib
from fedjax_fm import experiment
from fedjax_fm import roles as roles_lib
from fedjax_fm import sharding
from fedjax_fm.algorithms import fedavg, fedper, fedprox, ffgg, local_only
from fedjax_fm.builders import Federation
from fedjax_fm.data import lm as lm_data
from fedjax_fm.models import builders as model_builders
from fedjax_fm.models import decoder_sub_fm
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.runner import RoundRunner, padded_rows

NUM_CLIENTS, COHORT, STEPS, BATCH, SEQ, VOCAB = 8, 8, 2, 4, 12, 64
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8)


def _config(**model):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name="synthetic_lm", num_clients=NUM_CLIENTS, examples_per_client=12,
      test_examples_per_client=4, seq_len=SEQ, vocab_size=VOCAB, num_dialects=3,
      empty_clients="error"))
  c.model = ml_collections.ConfigDict({**dict(
      name="decoder", path=None, shape=SHAPE, pretrain=None,
      lora=dict(rank=4, alpha=8.0, targets=("v", "down")),
      trainable=("lora",), personal=(), dtype="float32", param_dtype="float32", remat="none",
      loss_chunk=16), **model})
  return c


@pytest.fixture(scope="module")
def federation():
  return experiment.build_data(_config())


@pytest.fixture(scope="module")
def bundle(federation):
  return experiment.build_model(_config(), federation)


def _paths(tree):
  return {roles_lib.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


ALGORITHMS = {
    "fedavg": lambda loss, roles, params, ex: fedavg(loss, roles, client_lr=0.05,
                                                     client_optimizer="adamw", execution=ex),
    "fedprox": lambda loss, roles, params, ex: fedprox(loss, roles, mu=0.01, client_lr=1.0,
                                                       execution=ex),
    "fedper": lambda loss, roles, params, ex: fedper(loss, roles, params, personal="lora_down",
                                                     client_lr=1.0, execution=ex),
    "local": lambda loss, roles, params, ex: local_only(loss, roles, client_lr=1.0,
                                                        execution=ex),
    "ffgg": lambda loss, roles, params, ex: ffgg(loss, roles, params, personal="lora_down",
                                                 personal_lr=0.5, personal_steps=2,
                                                 server_lr=1.0, execution=ex),
}
# The client state each algorithm keeps: which LoRA components are personal.
PERSONAL = {"fedavg": (), "fedprox": (), "fedper": ("lora_down",), "ffgg": ("lora_down",),
            "local": ("lora_v", "lora_down")}


def run_rounds(make_alg, params, federation, num_devices=1, rounds=2):
  """`rounds` rounds of ``make_alg(execution)`` from `params` on the first `num_devices` devices
  (clients over all of them); returns (server, clients, per-round metrics, the runner)."""
  mesh = sharding.make_mesh(devices=jax.devices()[:num_devices])
  alg = make_alg(ClientExecution("vmap", mesh=mesh))
  runner = RoundRunner(alg, mesh)
  server, clients = runner.place(alg.init(params, jax.random.key(0)),
                                 alg.init_clients(params, padded_rows(NUM_CLIENTS, mesh)))
  history = []
  for r in range(rounds):
    ids = cohort_lib.sample_clients(7, r, NUM_CLIENTS, COHORT)
    cohort = cohort_lib.make_cohort(federation.train, ids, steps=STEPS, batch_size=BATCH, seed=7,
                                    round_num=r)
    server, clients, metrics = runner(server, clients, cohort, jax.random.key(r))
    history.append(jax.device_get(metrics))
  return jax.device_get(server), jax.device_get(clients), history, runner


def _run(name, bundle, federation, num_devices=1, rounds=2):
  return run_rounds(lambda ex: ALGORITHMS[name](bundle.loss(True), bundle.roles, bundle.params,
                                                ex),
                    bundle.params, federation, num_devices, rounds)


@pytest.fixture(scope="module")
def runs(bundle, federation):
  """Each algorithm's 1-device run, computed once (the device check reuses FedPer's)."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = _run(name, bundle, federation, rounds=4 if name == "fedavg" else 2)
    return cache[name]

  return get


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithm_runs_a_decoder_round_compiled_once_backbone_never_stacked(name, bundle, runs):
  server, clients, history, runner = runs(name)
  assert (runner.traces, runner.compilations) == (1, 1)
  assert all(np.isfinite(h["loss"]) for h in history)
  # Client state: only the personal LoRA components, one row per client; no backbone leaf.
  client_paths = _paths(clients)
  components = {p.split("/")[2] for p in client_paths}
  assert components == set(PERSONAL[name]), sorted(client_paths)
  assert all(x.shape[0] == NUM_CLIENTS for x in client_paths.values())
  # The server's backbone is the initial one, bit for bit; a shared LoRA factor moved.
  initial, got = _paths(bundle.params), _paths(server.params)
  for p, x in initial.items():
    if "/lora_" not in p:
      np.testing.assert_array_equal(got[p], x, err_msg=p)
  moved = [p for p in got if "/lora_" in p and p.endswith("/b") and
           not np.array_equal(got[p], initial[p])]
  if name == "local":
    assert not moved  # nothing shared, the server never changes
  else:
    assert moved and not any(p.split("/")[2] in PERSONAL[name] for p in moved)
  if PERSONAL[name]:  # personal rows were trained on the client
    b = next(x for p, x in client_paths.items() if p.endswith("/b"))
    assert np.abs(b).max() > 0


def test_fedavg_lowers_the_next_token_loss(runs):
  _, _, history, runner = runs("fedavg")
  losses = [float(h["loss"]) for h in history]
  assert runner.compilations == 1
  assert losses[-1] < losses[0] - 0.04, losses  # measured: 4.167 -> 4.080 (log 64 = 4.159)


def test_one_and_eight_devices_give_the_same_parameters(bundle, federation, runs):
  assert len(jax.devices()) >= 8, "conftest.py sets 8 fake CPU devices"
  ref = runs("fedper")
  got = _run("fedper", bundle, federation, num_devices=8)
  for a, b in ((ref[0].params, got[0].params), (ref[1], got[1])):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0), a, b)
  np.testing.assert_allclose(ref[2][-1]["loss"], got[2][-1]["loss"], rtol=1e-5)


def test_loss_builder_builds_fedavg_on_the_decoder(bundle, federation):
  config = _config()
  config.algorithm = ml_collections.ConfigDict(dict(name="fedavg", hparams=dict(
      client_lr=1.0, server_lr=1.0, client_momentum=None, client_optimizer="sgd",
      weighted=True)))
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  built = experiment.build_algorithm(config, bundle, federation,
                                     ClientExecution("vmap", mesh=mesh))
  assert built.algorithm is not None and built.evaluate is not None


def test_decoder_bundle_roles_dtypes_and_inputs(federation):
  config = _config()
  config.model.param_dtype = "bfloat16"
  config.model.dtype = "bfloat16"
  config.model.personal = ("lora_down",)
  b = experiment.build_model(config, federation)
  assert b.input_keys == ("input_ids", "attention_mask")
  params, roles = _paths(b.params), _paths(b.roles)
  for p, x in params.items():
    lora = "/lora_" in p
    assert str(x.dtype) == ("float32" if lora else "bfloat16"), p
    expected = (roles_lib.PERSONAL if "/lora_down/" in p else roles_lib.SHARED) if lora \
        else roles_lib.FROZEN
    assert roles[p] == expected, p
  assert params["layers/attention/q/kernel"].shape == (2, 32, 32)  # stacked over layers
  assert b.extras["decoder_config"].remat == "none"


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.__delattr__("loss_chunk"), r"config.model.loss_chunk"),
    (lambda m: m.__delattr__("personal"), r"config.model.personal"),
    (lambda m: setattr(m, "path", "/some/folder"), "exactly one of config.model.path"),
    (lambda m: setattr(m, "param_dtype", "fp8"), "param_dtype"),
    (lambda m: setattr(m, "loss_chunk", 0), "loss_chunk must be a positive integer"),
    (None, None),
])
def test_decoder_config_mistakes_are_named(federation, edit, match):
  if edit is None:  # no LoRA at all
    with pytest.raises(ValueError, match="rank, alpha and targets"):
      model_builders.decoder_model(_config(lora=None), federation)
    return
  config = _config()
  edit(config.model)
  with pytest.raises(ValueError, match=match):
    model_builders.decoder_model(config, federation)


def test_synthetic_dialects_follow_their_rule_and_pad_right():
  fed = lm_data.synthetic_dialects(4, 5, 10, 32, num_dialects=2, seed=3)
  assert fed.num_clients == 4 and list(fed.sizes) == [5] * 4
  for c in range(4):
    data = fed.client(c)
    ids, mask = data["input_ids"], data["attention_mask"]
    assert ids.dtype == np.int32 and mask.shape == (5, 10)
    assert np.all(np.diff(mask, axis=1) <= 0) and np.all(mask.sum(1) >= 5)  # right padding
    step = (ids[:, 1:] - ids[:, :-1]) % 32
    real = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    assert np.all(step[real] == 1 + c % 2)
  assert isinstance(experiment.build_data(_config()), Federation)


def test_decoder_sub_fm_keeps_salient_swiglu_neurons_stacked_and_runs_on_the_fm_graph(bundle,
                                                                                     federation):
  params = bundle.params
  mlp = params["layers"]["mlp"]
  sub = decoder_sub_fm.compress_decoder_ffn(params, keep_neurons=12)
  got = sub["layers"]["mlp"]
  assert got["gate"]["kernel"].shape == got["up"]["kernel"].shape == (2, 32, 12)
  assert got["down"]["kernel"].shape == (2, 12, 32) and got["lora_down"]["a"].shape == (2, 12, 4)
  assert decoder_sub_fm.ffn_fraction(params, sub) < 1
  # Layer by layer, the kept neurons are the top-12 by ||[gate col, up col, down row]||.
  for layer in range(2):
    s = np.sqrt((np.asarray(mlp["gate"]["kernel"][layer]) ** 2).sum(0) +
                (np.asarray(mlp["up"]["kernel"][layer]) ** 2).sum(0) +
                (np.asarray(mlp["down"]["kernel"][layer]) ** 2).sum(1))
    keep = np.sort(np.argsort(-s)[:12])
    np.testing.assert_array_equal(got["down"]["kernel"][layer],
                                  np.asarray(mlp["down"]["kernel"][layer])[keep])
    np.testing.assert_array_equal(got["lora_down"]["a"][layer],
                                  np.asarray(mlp["lora_down"]["a"][layer])[keep])
  # Keeping every neuron is the identity; the narrower tree runs on the FM's own graphdef.
  full = decoder_sub_fm.compress_decoder_ffn(params, keep_neurons=48)
  jax.tree_util.tree_map(np.testing.assert_array_equal, full, params)
  batch = {k: jnp.asarray(v[:4]) for k, v in federation.train.arrays.items()}
  loss = jax.jit(lambda p: bundle.loss(False)(p, batch, None)[0],
                 compiler_options={"xla_backend_optimization_level": "0"})
  assert np.all(np.isfinite(loss(sub)))
