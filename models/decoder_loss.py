"""Next-token cross-entropy of a `DecoderLM`, computed over sequence chunks.

The logits of a federated LoRA round would be ``[clients, batch, T, vocab]``: with a 128k
vocabulary, the largest tensor of the whole program by far (DESIGN.md "Decoder LLMs"). Here the
final hidden states are cut into chunks of `chunk_size` positions along T, and a `lax.scan`
computes each chunk's logits, log-sum-exp, target logit and argmax, keeping only per-example
sums. The chunk body is rematerialised (`jax.checkpoint`), so the backward pass recomputes a
chunk's logits instead of storing them: at most ``[batch, chunk_size, vocab]`` logits exist at
any time, forward or backward.

Example::

    loss, accuracy = causal_lm_loss(model, input_ids, attention_mask, chunk_size=256)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

IGNORE_INDEX = -100  # transformers' label for "no loss here"


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                          weights: jax.Array, chunk_size: int, *,
                          dtype=None, head_axes: str = "dv") -> tuple[jax.Array, jax.Array]:
  """Per-example mean cross-entropy and accuracy of ``hidden @ head`` against `targets`.

  Args:
    hidden: [B, N, D] hidden states.
    head: the output projection, [D, V] (`head_axes` "dv") or [V, D] ("vd", e.g. a tied
      embedding as stored).
    targets: [B, N] int token ids.
    weights: [B, N] 1 where the prediction counts, 0 elsewhere.
    chunk_size: positions per chunk (N is padded up to a multiple with zero weight).
    dtype: the matmul's input dtype (default: hidden's); logits are float32.

  Returns:
    (loss [B], accuracy [B]): weighted means over each example's positions (0 for an example
    with no weighted position).
  """
  b, n, d = hidden.shape
  chunks = -(-n // chunk_size)
  pad = chunks * chunk_size - n
  dtype = dtype or hidden.dtype
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  # [chunks, B, C, ...]: the scan runs over the leading axis.
  split = lambda x: jnp.moveaxis(x.reshape(b, chunks, chunk_size, *x.shape[2:]), 1, 0)
  head = head.astype(dtype)

  @jax.checkpoint
  def chunk(sums, xs):
    h, t, w = xs
    logits = jnp.einsum(f"bcd,{head_axes}->bcv", h.astype(dtype), head,
                        preferred_element_type=jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
    correct = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
    w = w.astype(jnp.float32)
    return (sums[0] + (nll * w).sum(-1), sums[1] + (correct * w).sum(-1)), None

  zeros = jnp.zeros((b,), jnp.float32)
  (nll, correct), _ = jax.lax.scan(chunk, (zeros, zeros),
                                   (split(hidden), split(targets), split(weights)))
  count = jnp.maximum(weights.astype(jnp.float32).sum(-1), 1.0)
  return nll / count, correct / count


def causal_lm_loss(model, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                   labels: jax.Array | None = None, chunk_size: int = 256,
                   positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy of a `DecoderLM`, per example, without full-vocab logits.

  Position t predicts token t + 1; a prediction counts when both tokens are real (mask 1) and,
  with `labels`, the label at t + 1 is not `IGNORE_INDEX` (e.g. to train on answers only).

  Args:
    model: a `decoder.DecoderLM`.
    input_ids: [B, T] tokens (left or right padded).
    attention_mask: [B, T], 1 for real tokens; all ones if None.
    labels: [B, T] unshifted targets (transformers' convention, `IGNORE_INDEX` = no loss);
      None means `input_ids`.
    chunk_size: sequence positions per cross-entropy chunk.
    positions: RoPE positions, as in `DecoderLM.__call__`.

  Returns:
    (loss [B], accuracy [B]): the mean next-token negative log-likelihood and the fraction of
    next tokens that are the argmax, over each example's counted positions.
  """
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  hidden = model.hidden_states(input_ids, attention_mask, positions=positions)
  labels = input_ids if labels is None else labels
  targets = labels[:, 1:]
  weights = attention_mask[:, 1:] * attention_mask[:, :-1] * (targets != IGNORE_INDEX)
  targets = jnp.where(targets == IGNORE_INDEX, 0, targets)
  head, head_axes = model.head()
  return chunked_cross_entropy(hidden[:, :-1], head, targets, weights, chunk_size,
                               dtype=model.config.dtype, head_axes=head_axes)


def lm_loss_fn(graphdef, *, chunk_size: int = 256, input_key: str = "input_ids",
               mask_key: str = "attention_mask"):
  """The engine's ``loss_fn(params, batch, rng) -> (loss [B], {"accuracy": [B]})`` of a
  `DecoderLM` (`fedjax_fm.protocol.LossFn`): next-token cross-entropy over the batch's
  ``input_ids`` and ``attention_mask``, in chunks of `chunk_size` positions, so every algorithm
  that trains a model on its task loss (FedAvg, FedProx, FedPer, Local, FFGG) trains a decoder's
  LoRA unchanged. ``exp(loss)`` is the per-example perplexity."""
  def loss_fn(params, batch, rng):
    del rng  # the decoder has no dropout
    model = nnx.merge(graphdef, params)
    loss, accuracy = causal_lm_loss(model, batch[input_key], batch[mask_key],
                                    chunk_size=chunk_size)
    return loss, {"accuracy": accuracy}

  return loss_fn
