"""TAP: replacement and presence-masked aggregation by hand, the superset model's views, and the
grouped round (one jit over all groups) on a tiny random superset model.

Tiny model: fusion hidden 16, 1 layer, 2 heads; three modality-task pairs: image
classification (4 classes), text next-token prediction (vocabulary 12) and image+text answer
scoring (5 answers). No dropout, so the round is deterministic given its inputs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import tap as tap_lib
from fedjax_fm.algorithms import tap_launch, tap_post_fl
from fedjax_fm.cohort import FederatedData, make_cohort
from fedjax_fm.models import tap as model_lib
from fedjax_fm.models.transformer import TransformerConfig
from fedjax_fm.runner import default_compiler_options

FAST = {**default_compiler_options(), "xla_backend_optimization_level": "0"}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)

TASKS = (model_lib.TaskSpec("digits", "classification", 4),
         model_lib.TaskSpec("chars", "next_token", 12),
         model_lib.TaskSpec("vqa", "answer_scoring", 5))
PAIRS = (model_lib.PairSpec("img_cls", ("image",), "digits"),
         model_lib.PairSpec("txt_next", ("text",), "chars"),
         model_lib.PairSpec("img_txt_qa", ("text", "image"), "vqa"))
FUSION = TransformerConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                           vocab_size=40, max_position_embeddings=16, hidden_dropout=0.0,
                           attention_dropout=0.0)
CONFIG = model_lib.TAPConfig(fusion=FUSION, tasks=TASKS, pairs=PAIRS, image_size=4,
                             patch_size=2, num_channels=1, expert_bottleneck=4)


def _paths(tree, keep=lambda x: True):
  return {roles_lib.leaf_path(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if keep(x)}


# ---- replace_if_better ---------------------------------------------------------------------


def test_replace_if_better_two_tasks_by_hand():
  # Task 0 owns "enc" and "head0", task 1 owns "enc" and "head1".
  personal = {"enc": jnp.array([1.0, 1.0]), "head0": jnp.array(2.0), "head1": jnp.array(3.0)}
  global_path = {"enc": jnp.array([10.0, 10.0]), "head0": jnp.array(20.0),
                 "head1": jnp.array(30.0)}
  paths = ({"enc": True, "head0": True, "head1": False},
           {"enc": True, "head0": False, "head1": True})
  # Task 0: 0.5 + 0.1 < 1.0 -> replace. Task 1: 0.95 + 0.1 = 1.05 >= 1.0 -> keep.
  new, replaced = tap_lib.replace_if_better(personal, global_path, jnp.array([1.0, 1.0]),
                                            jnp.array([0.5, 0.95]), jnp.array([0.1, 0.1]),
                                            paths)
  np.testing.assert_array_equal(replaced, [True, False])
  np.testing.assert_array_equal(new["enc"], [10.0, 10.0])   # on task 0's paths
  assert float(new["head0"]) == 20.0
  assert float(new["head1"]) == 3.0                          # task 1 kept its own head
  # Neither task better (margin exactly met is not enough): nothing changes.
  new, replaced = tap_lib.replace_if_better(personal, global_path, jnp.array([1.0, 1.0]),
                                            jnp.array([0.9, 0.9]), 0.1, paths)
  np.testing.assert_array_equal(replaced, [False, False])
  assert float(new["head0"]) == 2.0 and float(new["enc"][0]) == 1.0


def test_replace_if_better_vmaps_over_clients_and_keeps_absent_leaves():
  personal = {"a": jnp.array([1.0, 2.0]), "b": None}
  global_path = {"a": jnp.array([5.0, 6.0]), "b": None}
  fn = jax.vmap(lambda p, g, lp, lg: tap_lib.replace_if_better(p, g, lp, lg, 0.0,
                                                               ({"a": True, "b": True},)))
  new, replaced = fn(personal, global_path, jnp.array([[1.0], [1.0]]),
                     jnp.array([[0.5], [2.0]]))
  np.testing.assert_array_equal(new["a"], [5.0, 2.0])   # client 0 replaced, client 1 not
  np.testing.assert_array_equal(replaced[:, 0], [True, False])
  assert new["b"] is None


def test_replace_if_better_rejects_mismatched_losses():
  with pytest.raises(ValueError, match="one per task"):
    tap_lib.replace_if_better({"a": jnp.ones(())}, {"a": jnp.ones(())}, jnp.ones(2),
                              jnp.ones(2), 0.0, ({"a": True},))


# ---- presence-masked aggregation -----------------------------------------------------------


def test_presence_masked_mean_by_hand():
  old = {"enc": jnp.array([0.0, 0.0]), "head_a": jnp.array(7.0), "head_b": jnp.array(8.0),
         "head_c": jnp.array(9.0), "frozen": None}
  # Group A: two clients (weights 1 and 3) hold enc and head_a.
  up_a = {"enc": jnp.array([[1.0, 2.0], [5.0, 6.0]]), "head_a": jnp.array([1.0, 5.0]),
          "head_b": None, "head_c": None, "frozen": None}
  # Group B: one real client (weight 4) and a padding slot (weight 0, NaN-free garbage).
  up_b = {"enc": jnp.array([[10.0, 20.0], [99.0, 99.0]]), "head_a": None,
          "head_b": jnp.array([2.0, 99.0]), "head_c": None, "frozen": None}
  new = tap_lib.presence_masked_mean([up_a, up_b],
                                     [jnp.array([1.0, 3.0]), jnp.array([4.0, 0.0])], old)
  # enc: (1*[1,2] + 3*[5,6] + 4*[10,20]) / 8 = ([1,2] + [15,18] + [40,80]) / 8
  np.testing.assert_allclose(new["enc"], [56.0 / 8, 100.0 / 8])
  np.testing.assert_allclose(new["head_a"], (1.0 + 15.0) / 4)   # group A only
  np.testing.assert_allclose(new["head_b"], 2.0)                 # the padding slot weighs 0
  assert float(new["head_c"]) == 9.0                             # nobody holds it: old value
  assert new["frozen"] is None
  # All weights zero: everything keeps its old value.
  new = tap_lib.presence_masked_mean([up_a, up_b], [jnp.zeros(2), jnp.zeros(2)], old)
  np.testing.assert_array_equal(new["enc"], [0.0, 0.0])
  assert float(new["head_a"]) == 7.0


# ---- losses ----------------------------------------------------------------------------------


def test_dense_losses_by_hand():
  pred = jnp.zeros((1, 2, 2, 1))
  y = jnp.array([[[[1.0], [0.0]], [[0.0], [1.0]]]])
  loss, metrics = tap_lib.task_loss("dense_regression", pred, {"y": y})
  np.testing.assert_allclose(loss, [0.5])                # two of four pixels off by 1
  np.testing.assert_allclose(metrics["mse"], [0.5])
  # Distillation of regression outputs is their MSE against the teacher's.
  np.testing.assert_allclose(tap_lib.distill_per_example("dense_regression", pred, y, 1.0),
                             [0.5])
  # Per-pixel logits: the KL is averaged over the 4 pixels; one pixel differs.
  student = jnp.zeros((1, 2, 2, 2))
  teacher = student.at[0, 0, 0].set(jnp.log(jnp.array([0.75, 0.25])))
  kl = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
  np.testing.assert_allclose(
      tap_lib.distill_per_example("dense_classification", student, teacher, 1.0), [kl / 4],
      rtol=1e-6)


# ---- the superset model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_parts():
  graphdef, params, _ = model_lib.init_params(CONFIG, seed=0)
  return graphdef, params


def _forward(graphdef, pair):
  return fast_jit(lambda p, x: nnx.merge(graphdef, p)(pair, x))


def _inputs(b=3, t=5):
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.random((b, 4, 4, 1)), jnp.float32),
          "input_ids": jnp.asarray(rng.integers(2, 40, (b, t)), jnp.int32),
          "attention_mask": jnp.ones((b, t), jnp.int32)}


def test_model_outputs_and_views(model_parts):
  graphdef, params = model_parts
  x = _inputs()
  shapes = jax.eval_shape(lambda p: {pair.name: nnx.merge(graphdef, p)(pair.name, x)
                                     for pair in PAIRS}, params)
  assert shapes["img_cls"].shape == (3, 4)
  assert shapes["txt_next"].shape == (3, 12)
  assert shapes["img_txt_qa"].shape == (3, 5)
  view = _paths(model_lib.view_mask(params, CONFIG, "img_cls"), keep=bool)
  assert "encoders/image/patches/projection/kernel" in view
  assert not any(p.startswith(("encoders/text", "encoders/image_text")) for p in view)
  assert not any(p.startswith(("heads/chars", "heads/vqa")) for p in view)
  assert any("adapters/task_digits" in p for p in view)
  assert not any("adapters/task_chars" in p or "adapters/modality_text" in p for p in view)
  qa = _paths(model_lib.view_mask(params, CONFIG, "img_txt_qa"), keep=bool)
  assert "encoders/image_text/embedding" in qa and "encoders/text/word/embedding" in qa
  # Roles: the pretrained tables and the fusion backbone are frozen; LoRA, experts, text norm,
  # image encoder and heads are trained.
  roles = model_lib.tap_roles(params)
  frozen = {roles_lib.leaf_path(p) for p, r in jax.tree_util.tree_leaves_with_path(roles)
            if r == roles_lib.FROZEN}
  assert "encoders/text/word/embedding" in frozen
  assert "fusion/layers/0/attention/query/kernel" in frozen
  assert "encoders/text/norm/scale" not in frozen
  assert not any("lora_" in p or "adapters" in p or p.startswith("heads") for p in frozen)


def test_sub_model_ignores_leaves_outside_its_view(model_parts):
  """A pair's output depends on its view only: changing another task's head and expert and the
  text encoder leaves the image classifier's output unchanged, changing its own head does not."""
  graphdef, params = model_parts
  x = _inputs()
  forward = _forward(graphdef, "img_cls")
  run = lambda p: forward(p, x)
  base = run(params)
  view = model_lib.view_mask(params, CONFIG, "img_cls")
  outside = jax.tree_util.tree_map(lambda v, p: p if v else p + 1.0, view, params)
  np.testing.assert_array_equal(run(outside), base)
  inside = jax.tree_util.tree_map(lambda v, p: p + 1.0 if v else p, view, params)
  assert not np.allclose(run(inside), base)


def test_load_pretrained_from_a_tiny_checkpoint(model_parts, tmp_path):
  """A 2-layer BERT checkpoint in safetensors: the text tables and layer 0 land at the TAP
  paths (torch Linear weights transposed), layer 1 is not used, fresh parts stay."""
  import json
  from safetensors.numpy import save_file
  from fedjax_fm.models import pretrained
  _, params = model_parts
  two_layers = dataclasses.replace(FUSION, num_layers=2)
  rng = np.random.default_rng(0)
  tensors = {}
  shapes = {roles_lib.leaf_path(p): x.shape
            for p, x in jax.tree_util.tree_leaves_with_path(params)}
  for ours, (theirs, _) in pretrained.hf_parameter_map("bert", two_layers).items():
    path = ours.replace("embeddings/", "encoders/text/").replace("encoder/layers/1/",
                                                                 "encoder/layers/0/")
    path = path.replace("encoder/", "fusion/")
    shape = shapes[path]
    shape = shape[::-1] if len(shape) == 2 and "kernel" in path else shape
    tensors[theirs] = rng.normal(size=shape).astype(np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(dict(
      model_type="bert", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, vocab_size=40, max_position_embeddings=16)))
  loaded = model_lib.load_pretrained(params, CONFIG, str(tmp_path))
  np.testing.assert_array_equal(_leaf(loaded, "encoders/text/word/embedding"),
                                tensors["embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(_leaf(loaded, "fusion/layers/0/attention/query/kernel"),
                                tensors["encoder.layer.0.attention.self.query.weight"].T)
  for path in ("fusion/layers/0/attention/lora_q/a", "heads/digits/classifier/kernel",
               "encoders/image/patches/projection/kernel"):
    np.testing.assert_array_equal(_leaf(loaded, path), _leaf(params, path))
  tensors["embeddings.word_embeddings.weight"] = np.zeros((41, 16), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="shape"):
    model_lib.load_pretrained(params, CONFIG, str(tmp_path))


def test_config_errors():
  with pytest.raises(ValueError, match="not among the tasks"):
    model_lib.TAPConfig(fusion=FUSION, tasks=TASKS,
                        pairs=(model_lib.PairSpec("x", ("image",), "nope"),))
  with pytest.raises(ValueError, match="image-only"):
    model_lib.TAPConfig(fusion=FUSION, tasks=(model_lib.TaskSpec("d", "dense_regression", 1),),
                        pairs=(model_lib.PairSpec("x", ("text",), "d"),))
  with pytest.raises(ValueError, match="modalities"):
    model_lib.PairSpec("x", ("audio",), "d")


# ---- the grouped round -----------------------------------------------------------------------

STEPS, BATCH = 2, 3


def _federations(seed=0):
  """Three groups with their own keys and shapes; every client holds 6 examples, the last 2
  flagged as held-out validation examples."""
  rng = np.random.default_rng(seed)
  flag = np.array([0, 0, 0, 0, 1, 1], np.float32)

  def client(keys, classes):
    out = {"y": rng.integers(0, classes, 6).astype(np.int32), tap_lib.VALIDATION_KEY: flag}
    if "image" in keys:
      out["image"] = rng.random((6, 4, 4, 1)).astype(np.float32)
    if "text" in keys:
      out["input_ids"] = rng.integers(2, 40, (6, 5)).astype(np.int32)
      out["attention_mask"] = np.ones((6, 5), np.int32)
    return out

  return (FederatedData.from_clients([client(("image",), 4) for _ in range(3)]),
          FederatedData.from_clients([client(("text",), 12) for _ in range(2)]),
          FederatedData.from_clients([client(("image", "text"), 5) for _ in range(2)]))


def _cohorts(feds, ids_per_group, round_num=0):
  return tuple(make_cohort(f, np.asarray(ids, np.int32), steps=STEPS, batch_size=BATCH, seed=0,
                           round_num=round_num, group=g)
               for g, (f, ids) in enumerate(zip(feds, ids_per_group)))


def _with_padding(cohort):
  """The cohort plus one padding slot (weight 0, id PADDING_ID, nothing real)."""
  from fedjax_fm.cohort import pad_cohort
  return pad_cohort(cohort, cohort.num_clients + 1)


def _toy_superset():
  """A toy superset with TAP's structure, cheap to compile: per-modality encoders, a shared
  layer, a frozen bias and one head per task; pairs as in CONFIG."""
  rng = np.random.default_rng(0)
  r = lambda *shape: jnp.asarray(rng.normal(0, 0.5, shape), jnp.float32)
  params = {"enc": {"image": r(16, 3), "text": r(40, 3)}, "shared": r(3, 3),
            "heads": {"digits": r(3, 4), "chars": r(3, 12), "vqa": r(3, 5)},
            "frozen": r(3)}
  roles = jax.tree_util.tree_map_with_path(
      lambda p, _: roles_lib.FROZEN if roles_lib.leaf_path(p) == "frozen" else roles_lib.SHARED,
      params)

  def output_fn(pair):
    def fn(p, batch, rng):
      del rng
      h = 0.0
      if "image" in pair.modalities:
        h = h + batch["image"].reshape(batch["image"].shape[0], -1) @ p["enc"]["image"]
      if "text" in pair.modalities:
        h = h + jnp.mean(p["enc"]["text"][batch["input_ids"]], axis=1)
      h = jnp.tanh(h @ p["shared"] + p["frozen"])
      return h @ p["heads"][pair.task]
    return fn

  def view(pair):
    def on(path):
      parts = path.split("/")
      if parts[0] == "enc":
        return parts[1] in pair.modalities
      if parts[0] == "heads":
        return parts[1] == pair.task
      return True
    return jax.tree_util.tree_map_with_path(lambda p, _: on(roles_lib.leaf_path(p)), params)

  def groups(delta=0.01, distill_weight=2e-3):
    return tuple(tap_lib.TAPGroup(pair.name, output_fn(pair), CONFIG.task(pair.task).head,
                                  view(pair), delta=delta, distill_weight=distill_weight)
                 for pair in PAIRS)

  return params, roles, groups


def _algorithm(delta=0.01, **kw):
  params, roles, groups = _toy_superset()
  alg = tap_lib.tap(groups(delta), roles, peak_lr=0.05, min_lr=0.05,
                    execution=ClientExecution(strategy="vmap"), **kw)
  return alg, params


def _leaf(tree, path):
  for p, x in jax.tree_util.tree_leaves_with_path(tree):
    if roles_lib.leaf_path(p) == path:
      return x
  raise KeyError(path)


HEAD = "heads/digits"


def test_round_compiles_once_aggregates_and_writes_only_sampled_rows():
  alg, params = _algorithm(replacement="validation", delta=-1e9)  # always replace
  feds = _federations()
  round_fn = fast_jit(alg.round)
  server = alg.init(params, jax.random.key(0))
  states = alg.init_clients(params, (3, 2, 2))

  # Round 1: group 0 samples clients 0 and 2 (plus a padding slot), the others one client each.
  cohorts = _cohorts(feds, ([0, 2], [1], [0]))
  cohorts = (_with_padding(cohorts[0]),) + cohorts[1:]
  new_server, new_states, metrics = round_fn(server, states, cohorts, jax.random.key(1))
  # Round 2 with other clients: same shapes, no new compilation.
  cohorts2 = _cohorts(feds, ([1, 2], [0], [1]), round_num=1)
  cohorts2 = (_with_padding(cohorts2[0]),) + cohorts2[1:]
  round_fn(new_server, new_states, cohorts2, jax.random.key(2))
  assert round_fn._cache_size() == 1
  assert int(new_server.round) == 1

  # Unsampled client 1 of group 0 keeps its initial personal model and +inf loss history.
  p0 = new_states[0].params
  np.testing.assert_array_equal(_leaf(p0, HEAD)[1], _leaf(params, HEAD))
  loss = np.asarray(new_states[0].loss)
  assert np.isinf(loss[1]) and np.isfinite(loss[[0, 2]]).all()
  assert not np.allclose(_leaf(p0, HEAD)[0], _leaf(params, HEAD))
  # Group 0's state holds only its view: no text encoder, no other task's head.
  assert _paths(p0) == {"enc/image", "shared", "heads/digits"}
  assert float(metrics["replaced"]) == 1.0 and float(metrics["img_cls/replaced"]) == 1.0
  assert int(metrics["num_nonfinite_clients"]) == 0
  # Frozen leaves never move.
  np.testing.assert_array_equal(new_server.params["frozen"], params["frozen"])

  # Aggregation: the digits head is held by group 0 only, so it is the example-weighted mean
  # of its two clients' global-path heads; each client's head is what a round with that client
  # alone uploads (the other groups do not touch it).
  def alone(cid):
    from fedjax_fm.cohort import pad_cohort
    only = _cohorts(feds, ([cid], [1], [0]))
    s, _, _ = round_fn(server, states, (pad_cohort(only[0], 3),) + only[1:], jax.random.key(1))
    return _leaf(s.params, HEAD)

  w = feds[0].sizes[[0, 2]].astype(np.float32)
  expected = (w[0] * alone(0) + w[1] * alone(2)) / w.sum()
  np.testing.assert_allclose(_leaf(new_server.params, HEAD), expected, rtol=1e-5, atol=1e-6)
  assert round_fn._cache_size() == 1
  # The text encoder is held by groups 1 and 2 only, and it moved.
  assert not np.allclose(new_server.params["enc"]["text"], params["enc"]["text"])


def test_replacement_modes():
  feds = _federations()
  cohorts = _cohorts(feds, ([0, 1], [0], [1]))
  results = {}
  for name, kw in {"train_first": dict(replacement="train", delta=0.01)}.items():
    alg, params = _algorithm(**kw)
    server = alg.init(params, jax.random.key(0))
    states = alg.init_clients(params, (3, 2, 2))
    _, new_states, metrics = fast_jit(alg.round)(server, states, cohorts, jax.random.key(1))
    results[name] = (new_states, metrics)
  # The reference's rule always replaces at a client's first participation (its personal loss
  # history starts at +inf).
  assert float(results["train_first"][1]["replaced"]) == 1.0
  # The personal loss history now holds finite training losses of the sampled clients.
  assert np.isfinite(np.asarray(results["train_first"][0][0].loss)[[0, 1]]).all()
  # The unsampled client 2 of group 0 keeps +inf.
  assert np.isinf(np.asarray(results["train_first"][0][0].loss)[2])


def test_stage2_evaluator():
  """Before any round personal = server model, so personal_fl equals global exactly; with
  lambda = 0 the distilled student is the fine-tuned teacher (FedAvg + FT)."""
  params, roles, make_groups = _toy_superset()
  feds = _federations()
  tests = _federations(seed=1)
  for weight in (0.0, 1.0):
    groups = make_groups(distill_weight=weight)
    alg = tap_lib.tap(groups, roles, execution=ClientExecution(strategy="vmap"))
    evaluate = tap_post_fl.make_evaluator(groups, roles, feds, tests, post_steps=2, batch_size=3,
                                      post_lr=0.05, compiler_options=FAST)
    out = evaluate(params, alg.init_clients(params, (3, 2, 2)))
    for g in ("img_cls", "txt_next", "img_txt_qa"):
      np.testing.assert_allclose(out[f"personal_fl/{g}/loss"], out[f"global/{g}/loss"],
                                 rtol=1e-6)
      assert not np.isclose(out[f"global_ft/{g}/loss"], out[f"global/{g}/loss"])  # trained
      if weight == 0.0:
        np.testing.assert_allclose(out[f"personalized/{g}/loss"], out[f"global_ft/{g}/loss"],
                                   rtol=1e-6)
      else:
        assert not np.isclose(out[f"personalized/{g}/loss"], out[f"global_ft/{g}/loss"],
                              rtol=1e-6)
    assert set(tap_post_fl.EVAL_MODES) <= {k.split("/")[0] for k in out}
    per_client = np.asarray(out["personalized/img_cls/per_client_loss"])
    assert per_client.shape == (3,) and np.all(np.isfinite(per_client))
    assert "personalized/accuracy" in out


# ---- multi-task clients ----------------------------------------------------------------------


def _multitask_toy():
  """Two 4-class tasks ``a`` and ``b`` on one image encoder; a multi-task group of both (its
  output is each example's own head) and a federation of 2 clients x 8 examples, tasks
  alternating, the last 4 of each client (2 per task) held out."""
  rng = np.random.default_rng(3)
  r = lambda *shape: jnp.asarray(rng.normal(0, 0.5, shape), jnp.float32)
  params = {"enc": r(16, 3), "heads": {"a": r(3, 4), "b": r(3, 4)}}
  roles = jax.tree_util.tree_map(lambda _: roles_lib.SHARED, params)

  def member(task):
    def fn(p, batch, rng):
      del rng
      return jnp.tanh(batch["image"].reshape(batch["image"].shape[0], -1) @ p["enc"]) @ \
          p["heads"][task]
    view = {"enc": True, "heads": {"a": task == "a", "b": task == "b"}}
    return tap_lib.TAPGroup(task, fn, "classification", view)

  group = tap_launch.multitask_group("ab", [member("a"), member("b")])
  clients = [{"image": rng.random((8, 4, 4, 1)).astype(np.float32),
              "y": rng.integers(0, 4, 8).astype(np.int32),
              tap_lib.TASK_KEY: np.tile([0, 1], 4).astype(np.int32),
              tap_lib.VALIDATION_KEY: np.repeat([0.0, 1.0], 4).astype(np.float32)}
             for _ in range(2)]
  return params, roles, group, member, FederatedData.from_clients(clients)


def test_multitask_group_selects_each_examples_head_and_splits_task_metrics():
  params, _, group, member, fed = _multitask_toy()
  batch = fed.client(0)
  out = group.output_fn(params, batch, None)
  on_a = batch[tap_lib.TASK_KEY] == 0
  np.testing.assert_allclose(out[on_a], member("a").output_fn(params, batch, None)[on_a])
  np.testing.assert_allclose(out[~on_a], member("b").output_fn(params, batch, None)[~on_a])
  assert group.task_names == ("a", "b") and group.view["heads"] == {"a": True, "b": True}
  # Means of m * [task t] and of [task t] -> the mean over task t; a task with no example -> 0.
  split = tap_lib.split_task_metrics(
      {"x/loss@a": 0.3, "x/count@a": 0.25, "x/loss@b": 0.0, "x/count@b": 0.0, "x/loss": 1.0},
      ("a", "b"))
  assert split == pytest.approx({"x/a/loss": 1.2, "x/b/loss": 0.0, "x/loss": 1.0})
  with pytest.raises(ValueError, match="head kinds"):
    tap_launch.multitask_group("bad", [member("a"), dataclasses.replace(member("b"),
                                                                        kind="next_token")])


def test_multitask_replacement_swaps_only_the_winning_tasks_paths():
  """Margins -inf for task a (always replaced) and +inf for b (never), a learning rate too small
  to move anything: the personal model (all zeros) takes the server's encoder (on a's paths)
  and head a, and keeps its own head b."""
  params, roles, group, _, fed = _multitask_toy()
  group = dataclasses.replace(group, delta=(-1e9, 1e9))
  alg = tap_lib.tap((group,), roles, peak_lr=1e-12, min_lr=1e-12, weight_decay=0.0,
                    execution=ClientExecution(strategy="vmap"))
  server = alg.init(params, jax.random.key(0))
  (state,) = alg.init_clients(params, (2,))
  assert state.loss.shape == (2, 2)
  state = state.replace(params=jax.tree_util.tree_map(jnp.zeros_like, state.params))
  cohort = make_cohort(fed, np.array([0, 1], np.int32), steps=STEPS, batch_size=4, seed=0,
                       round_num=0)
  _, (new,), metrics = fast_jit(alg.round)(server, (state,), (cohort,), jax.random.key(1))
  assert float(metrics["ab/a/replaced"]) == 1.0 and float(metrics["ab/b/replaced"]) == 0.0
  assert float(metrics["ab/replaced"]) == 1.0
  for k in range(2):
    np.testing.assert_allclose(new.params["enc"][k], params["enc"], atol=1e-6)
    np.testing.assert_allclose(new.params["heads"]["a"][k], params["heads"]["a"], atol=1e-6)
    np.testing.assert_allclose(new.params["heads"]["b"][k], 0.0, atol=1e-6)
  # Per-task training losses of the personal model, one per task, finite.
  assert np.isfinite(np.asarray(new.loss)).all()
  assert {"ab/a/personal_loss", "ab/b/global_loss", "ab/a/accuracy"} <= set(metrics)


def test_stage2_distill_sweep_reports_one_student_per_lambda():
  """lambda 0 in the sweep is plain fine-tuning of the personal model; with the group's own
  lambda also 0 the sweep's student equals TAP's."""
  params, roles, group, _, fed = _multitask_toy()
  group = dataclasses.replace(group, distill_weight=(0.0, 0.0))
  alg = tap_lib.tap((group,), roles, execution=ClientExecution(strategy="vmap"))
  evaluate = tap_post_fl.make_evaluator((group,), roles, (fed,), (fed,), post_steps=2,
                                        batch_size=4, post_lr=0.05, distill_sweep=(0.0, 5.0),
                                        compiler_options=FAST)
  out = evaluate(params, alg.init_clients(params, (2,)))
  np.testing.assert_allclose(out["personalized_lambda0/ab/loss"], out["personalized/ab/loss"],
                             rtol=1e-6)
  assert not np.isclose(out["personalized_lambda5/ab/loss"], out["personalized/ab/loss"],
                        rtol=1e-6)
  assert "personalized_lambda5/ab/b/accuracy" in out and "personalized_lambda5/loss" in out
