"""TAP: replacement and presence-masked aggregation by hand, the superset model's views, and the
grouped round (one jit over all groups) on a tiny random superset model.

Tiny model: fusion hidden 16, 1 layer, 2 heads; three modality-task pairs: image
classification (4 classes), text next-token prediction (vocabulary 12) and image+text answer
scoring (5 answers). No dropout, so the round is deterministic given its inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm.algorithm import ClientExecution
from fedjax_fm.algorithms import tap as tap_lib
from fedjax_fm.cohort import PADDING_ID, FederatedData, make_cohort
from fedjax_fm.models import functional
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


def test_config_errors():
  with pytest.raises(ValueError, match="not among the tasks"):
    model_lib.TAPConfig(fusion=FUSION, tasks=TASKS,
                        pairs=(model_lib.PairSpec("x", ("image",), "nope"),))
  with pytest.raises(ValueError, match="image-only"):
    model_lib.TAPConfig(fusion=FUSION, tasks=(model_lib.TaskSpec("d", "dense_regression", 1),),
                        pairs=(model_lib.PairSpec("x", ("text",), "d"),))
  with pytest.raises(ValueError, match="modalities"):
    model_lib.PairSpec("x", ("audio",), "d")
