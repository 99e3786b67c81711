"""FedDAT on a decoder LM (issue 16): the three LoRA adapters as one rank-3r LoRA compute the
weighted sum of their updates; two rounds of the builder's algorithm on the tiny Shakespeare
config move A_s (shared) and each sampled client's own A_c only, and leave the backbone
untouched, compiled once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import cohort as cohort_lib
from fedjax_fm import experiment, sharding
from fedjax_fm import roles as roles_lib
from fedjax_fm.algorithms import feddat_decoder
from fedjax_fm.data.text import CHAR_VOCAB_SIZE
from fedjax_fm.runner import RoundRunner, padded_rows
from tests import tiny


@pytest.fixture(scope="module")
def setup():
  config = tiny.config("llm_shakespeare", "tiny,feddat")
  config.data.sample_clients = 0
  config.model.pretrain = None   # a random backbone: the update rules do not need a trained one
  config.model.shape = dict(vocab_size=CHAR_VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2, num_kv_heads=1, head_dim=8)
  data = experiment.build_data(config)
  model = experiment.build_model(config, data)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  built = experiment.build_algorithm(config, model, data,
                                     experiment.build_execution(config, mesh))
  return config, data, model, built, mesh


def _flat(tree):
  return {roles_lib.leaf_path(p): np.asarray(x) for p, x in
          jax.tree_util.tree_leaves_with_path(tree)}


def test_the_rank_3r_lora_is_the_weighted_sum_of_the_three(setup):
  *_, built, _ = setup
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                                  built.params)
  weights = {"personal": 0.5, "shared": 0.25, "frozen": 2.0}
  mixed = _flat(feddat_decoder.mixed_params(params, weights))
  adapters = {n: _flat(params["adapters"][n]) for n in feddat_decoder.NAMES}
  for path in adapters["shared"]:
    if not path.endswith("/a"):
      continue
    b = path[:-1] + "b"
    expected = sum(w * adapters[n][path] @ adapters[n][b] for n, w in weights.items())
    np.testing.assert_allclose(mixed[path] @ mixed[b], expected, rtol=1e-4, atol=1e-4)
  # Everything else is the backbone's.
  backbone = _flat(params["backbone"])
  assert {p: mixed[p].shape for p in backbone} == {p: x.shape for p, x in backbone.items()}


def test_two_rounds_train_shared_and_own_adapters_only(setup):
  config, data, model, built, mesh = setup
  alg = built.algorithm
  runner = RoundRunner(alg, mesh)
  n = data.train.num_clients
  server, clients = runner.place(alg.init(built.params, jax.random.key(0)),
                                 alg.init_clients(built.params, padded_rows(n, mesh)))
  before = _flat(built.params)
  sampled = set()
  for r in range(2):
    ids = cohort_lib.sample_clients(0, r, n, config.cohort_size)
    sampled |= set(int(i) for i in ids)
    cohort = cohort_lib.make_cohort(data.train, ids, steps=config.local_steps,
                                    batch_size=config.batch_size, seed=0, round_num=r)
    server, clients, metrics = runner(server, clients, cohort, jax.random.key(r))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["distill"]) >= 0.0
  assert runner.compilations == 1
  after = _flat(jax.device_get(server.params))
  for path, x in before.items():
    if path.startswith("backbone/"):
      np.testing.assert_array_equal(after[path], x, err_msg=path)
  shared_b = [p for p in before if p.startswith("adapters/shared/") and p.endswith("/b")]
  assert shared_b and all(np.abs(after[p]).max() > 0 for p in shared_b)
  rows = _flat(jax.device_get(clients))
  personal_b = [p for p in rows if p.startswith("adapters/personal/") and p.endswith("/b")]
  assert personal_b
  for p in personal_b:
    moved = {c for c in range(n) if np.abs(rows[p][c]).max() > 0}
    assert moved == sampled, p   # only sampled clients trained their own A_c
