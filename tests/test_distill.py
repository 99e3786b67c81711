"""Distillation losses on hand-computed 2-class examples.

With student logits 0 (p_s = [1/2, 1/2]) and teacher probabilities p_t = [3/4, 1/4]:

    KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812.

At temperature T = 2, teacher logits [2 ln 3, 0] soften to [ln 3, 0], i.e. again p_t = [3/4, 1/4],
so the loss is T^2 * 0.130812 = 0.523248, and its gradient in the student's logits is
T^2 * (p_s - p_t) / T = 2 * ([1/2, 1/2] - [3/4, 1/4]) = [-1/2, 1/2].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import distill

KL_HALF_VS_3_1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812


def test_zero_when_student_equals_teacher():
  logits = jnp.array([[1.0, -2.0, 0.5], [3.0, 3.0, -1.0]])
  np.testing.assert_allclose(distill.kl_per_example(logits, logits, 3.0), [0.0, 0.0], atol=1e-6)
  assert float(distill.kl_distill(logits, logits, 3.0)) == pytest.approx(0.0, abs=1e-6)
  assert float(distill.sigmoid_kl_distill(logits, logits, 3.0)) == pytest.approx(0.0, abs=1e-6)
  # A shift of all logits changes no softmax probability: still zero.
  assert float(distill.kl_distill(logits + 5.0, logits, 1.0)) == pytest.approx(0.0, abs=1e-5)


def test_two_class_value_by_hand():
  student = jnp.zeros((1, 2))
  teacher = jnp.log(jnp.array([[0.75, 0.25]]))
  assert float(distill.kl_distill(student, teacher, 1.0)) == pytest.approx(KL_HALF_VS_3_1,
                                                                           rel=1e-5)
  # T = 2 with teacher logits [2 ln 3, 0]: the same softened distributions, times T^2 = 4.
  teacher_t2 = jnp.array([[2 * math.log(3.0), 0.0]])
  assert float(distill.kl_distill(student, teacher_t2, 2.0)) == pytest.approx(
      4 * KL_HALF_VS_3_1, rel=1e-5)
  # The direction is KL(teacher || student): swapping the roles gives a different number,
  # 1/2 ln(2/3) + 1/2 ln 2 = 0.143841.
  swapped = float(distill.kl_distill(teacher, student, 1.0))
  assert swapped == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2.0), rel=1e-5)


def test_batch_mean_sums_classes_and_positions_and_averages_examples():
  """PyTorch's batchmean: sum over classes and positions, divide by the batch size only."""
  student = jnp.zeros((2, 3, 2))  # [B=2, positions=3, classes=2]
  teacher = jnp.log(jnp.array([0.75, 0.25])) * jnp.array([1.0, 1.0, 0.0])[:, None]
  teacher = jnp.stack([teacher, jnp.zeros((3, 2))])  # example 0: 2 positions differ; example 1: 0
  per_example = distill.kl_per_example(student, teacher, 1.0)
  np.testing.assert_allclose(per_example, [2 * KL_HALF_VS_3_1, 0.0], rtol=1e-5, atol=1e-7)
  assert float(distill.kl_distill(student, teacher, 1.0)) == pytest.approx(KL_HALF_VS_3_1,
                                                                           rel=1e-5)


def test_gradient_has_t_squared_scaling_and_reaches_only_the_student():
  student = jnp.zeros((1, 2))
  teacher = jnp.array([[2 * math.log(3.0), 0.0]])
  g_student, g_teacher = jax.grad(distill.kl_distill, argnums=(0, 1))(student, teacher, 2.0)
  # T^2 * (p_s - p_t) / T with T = 2.
  np.testing.assert_allclose(g_student, [[-0.5, 0.5]], rtol=1e-5)
  np.testing.assert_array_equal(g_teacher, jnp.zeros_like(teacher))
  # Without the T^2 factor the gradient would shrink like 1/T: at T = 4 (teacher [4 ln 3, 0],
  # same softened p_t) it is 4 * ([1/2, 1/2] - [3/4, 1/4]) = [-1, 1], twice the T = 2 value.
  g4 = jax.grad(distill.kl_distill)(student, jnp.array([[4 * math.log(3.0), 0.0]]), 4.0)
  np.testing.assert_allclose(g4, [[-1.0, 1.0]], rtol=1e-5)
  g_sig_teacher = jax.grad(distill.sigmoid_kl_distill, argnums=1)(student, teacher, 2.0)
  np.testing.assert_array_equal(g_sig_teacher, jnp.zeros_like(teacher))


def test_sigmoid_kl_by_hand():
  """One answer: teacher p = sigmoid(0) = 1/2, student q = sigmoid(ln 3) = 3/4:
  1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 0.143841; a second answer with equal logits adds 0.
  """
  student = jnp.array([[math.log(3.0), 1.0]])
  teacher = jnp.array([[0.0, 1.0]])
  value = float(distill.sigmoid_kl_distill(student, teacher, 1.0))
  assert value == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2.0), rel=1e-5)
  # Gradient: T^2 * (q - p) / T per answer = 3/4 - 1/2 at T = 1.
  g = jax.grad(distill.sigmoid_kl_distill)(student, teacher, 1.0)
  np.testing.assert_allclose(g, [[0.25, 0.0]], atol=1e-6)
  # Extreme logits stay finite (log_sigmoid, no log(0)).
  assert np.isfinite(float(distill.sigmoid_kl_distill(jnp.array([[80.0]]),
                                                      jnp.array([[-80.0]]), 1.0)))
  assert np.isfinite(float(distill.kl_distill(jnp.array([[80.0, -80.0]]),
                                              jnp.array([[-80.0, 80.0]]), 1.0)))


def test_distill_per_example_by_name_and_bad_arguments():
  assert distill.distill_per_example("softmax") is distill.kl_per_example
  assert distill.distill_per_example("sigmoid") is distill.sigmoid_kl_per_example
  with pytest.raises(ValueError, match="unknown distillation kind"):
    distill.distill_per_example("mse")
  with pytest.raises(ValueError, match="temperature"):
    distill.kl_distill(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0.0)
