"""Knowledge-distillation losses: temperature-softened KL between teacher and student logits.

Hinton, Vinyals, Dean 2015 ("Distilling the Knowledge in a Neural Network"): the student matches
the teacher's softened distribution softmax(z_t / T); the loss is multiplied by T^2 so that its
gradient keeps the same scale as T changes (the gradient of the softened KL with respect to the
student's logits is (p_s - p_t) / T).

    KL_T(z_t || z_s) = T^2 * sum_j p_t,j * (log p_t,j - log p_s,j),  p = softmax(z / T)

The direction is KL(teacher || student), PyTorch's ``kl_div(log_softmax(z_s / T),
softmax(z_t / T))``, as FedDAT's mutual distillation uses it (Chen et al. 2024, "FedDAT: An
Approach for Foundation Model Finetuning in Multi-Modal Heterogeneous Federated Learning",
AAAI; its reference code). The teacher side is always under `stop_gradient`: gradients reach
the student only.

Reductions follow PyTorch's ``batchmean``: the KL is summed over classes *and* any further
non-batch axes (positions of a sequence model), then averaged over the batch. The per-example
functions return the [B] sums, which is what the engine's losses return (`fedjax_fm.client_update.
masked_loss` averages them over the real examples of a padded batch, giving exactly the
batch-mean over real examples).

`sigmoid_kl_per_example` is the multi-label counterpart for heads whose logits are independent
sigmoids (ViLT's VQA answer-scoring head): a Bernoulli KL per answer, summed over answers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DISTILL_KINDS = ("softmax", "softmax_tokens", "sigmoid")


def _check_temperature(temperature: float):
  if not temperature > 0:
    raise ValueError(f"distillation temperature {temperature} must be > 0")


def _sum_non_batch(x: jax.Array) -> jax.Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def kl_per_example(student_logits: jax.Array, teacher_logits: jax.Array,
                   temperature: float) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per example.

  Args:
    student_logits: [B, ..., C] logits; the gradient flows here.
    teacher_logits: [B, ..., C] logits; treated as constants (stop_gradient).
    temperature: T > 0.

  Returns:
    [B] float32: the KL summed over classes and any middle axes, times T^2.

  Example::

      kl_per_example(jnp.zeros((1, 2)), jnp.log(jnp.array([[0.75, 0.25]])), 1.0)
      # = 0.75 log(0.75 / 0.5) + 0.25 log(0.25 / 0.5) = 0.1308
  """
  _check_temperature(temperature)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  log_p_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
  log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  # exp(log p) underflows to exactly 0 where the teacher gives no mass, and 0 * finite = 0.
  kl = jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student)
  return temperature ** 2 * _sum_non_batch(kl)


def kl_distill(student_logits: jax.Array, teacher_logits: jax.Array,
               temperature: float) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch-mean (PyTorch ``batchmean``).

  Returns:
    A float32 scalar: `kl_per_example` averaged over the leading (batch) axis.
  """
  return jnp.mean(kl_per_example(student_logits, teacher_logits, temperature))


def sigmoid_kl_per_example(student_logits: jax.Array, teacher_logits: jax.Array,
                           temperature: float) -> jax.Array:
  """T^2 * sum over answers of the Bernoulli KL(sigmoid(teacher / T) || sigmoid(student / T)).

  For multi-label heads (VQA answer scoring), whose logits are independent sigmoid
  probabilities rather than one softmax distribution.

  Returns:
    [B] float32.
  """
  _check_temperature(temperature)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  student = student_logits.astype(jnp.float32) / temperature
  p_teacher = jax.nn.sigmoid(teacher)
  # log p = log_sigmoid(z), log(1 - p) = log_sigmoid(-z): finite for any logit.
  kl = (p_teacher * (jax.nn.log_sigmoid(teacher) - jax.nn.log_sigmoid(student))
        + (1.0 - p_teacher) * (jax.nn.log_sigmoid(-teacher) - jax.nn.log_sigmoid(-student)))
  return temperature ** 2 * _sum_non_batch(kl)


def sigmoid_kl_distill(student_logits: jax.Array, teacher_logits: jax.Array,
                       temperature: float) -> jax.Array:
  """Batch-mean of `sigmoid_kl_per_example`."""
  return jnp.mean(sigmoid_kl_per_example(student_logits, teacher_logits, temperature))


def token_kl_per_example(student_logits: jax.Array, teacher_logits: jax.Array,
                         temperature: float) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per position of a sequence model,
  averaged over each example's positions whose teacher logits are not all zero.

  For a language model's [B, T, vocab] logits, whose task loss is a per-token mean: the KL term
  is then per token too, on the task loss's scale (the sum of `kl_per_example` grows with the
  sequence length). Positions to leave out (padding) carry all-zero logits in the teacher
  (`fedjax_fm.algorithms.feddat_decoder` zeroes them in every forward); a real logit vector is
  never exactly zero.

  Returns:
    [B] float32 (0 for an example with no counted position).
  """
  _check_temperature(temperature)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  log_p_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
  log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  live = jnp.any(teacher != 0, axis=-1).astype(jnp.float32)
  return temperature ** 2 * _sum_non_batch(kl * live) / jnp.maximum(_sum_non_batch(live), 1.0)


def distill_per_example(kind: str):
  """The per-example distillation loss by name: ``"softmax"``, ``"softmax_tokens"`` or
  ``"sigmoid"``."""
  if kind == "softmax":
    return kl_per_example
  if kind == "softmax_tokens":
    return token_kl_per_example
  if kind == "sigmoid":
    return sigmoid_kl_per_example
  raise ValueError(f"unknown distillation kind {kind!r}; use one of {DISTILL_KINDS}")
