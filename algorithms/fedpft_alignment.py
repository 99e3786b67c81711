"""FedPFT's alignment of the sub-FM to the FM: distillation on the server's public data.

Peng et al. "FedPFT: Federated Proxy Fine-Tuning of Foundation Models." IJCAI 2024
(arXiv:2404.11536); docs/algorithms.md sections 3.3-3.5. The loss (`alignment_loss`: per layer a
normalised hidden-state MSE, plus alpha times the mismatch of the FFN weight products), the
neuron-level gradient mask (`least_active_mask` picks the neurons to update by activity,
`neuron_update_mask` turns the choice into multipliers) and the distiller that both alignment
levels run (`make_distiller`, with `default_align_optimizer`). When each level runs, and
where this deviates from the reference code, is in `fedjax_fm.algorithms.fedpft`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_fm.models.sub_fm import Forward, ffn_block, with_sub_ffn


def normalised_mse(student: jax.Array, teacher: jax.Array, token_mask: jax.Array) -> jax.Array:
  """mean((h_T - h_S)^2) / mean(h_T^2) over the real tokens ([B, T, D] states, [B, T] mask)."""
  m = token_mask[..., None].astype(jnp.float32)
  num = jnp.sum(m * jnp.square(teacher.astype(jnp.float32) - student.astype(jnp.float32)))
  den = jnp.sum(m * jnp.square(teacher.astype(jnp.float32)))
  return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)


def ffn_product(block: Mapping) -> jax.Array:
  """P = W_in W_out [D, D], the FFN's linear part (x -> x P with (in, out) kernels)."""
  return block["mlp"]["fc_in"]["kernel"] @ block["mlp"]["fc_out"]["kernel"]


def product_mismatch(student_block: Mapping, teacher_block: Mapping,
                     product_grad: bool = True) -> jax.Array:
  """mean((P_T - P_S)^2) / mean(P_T^2); with ``product_grad=False`` P_S is a constant (the
  reference code's ``.data``), so the term adds to the loss but not to the gradient."""
  p_t = jax.lax.stop_gradient(ffn_product(teacher_block))
  p_s = ffn_product(student_block)
  if not product_grad:
    p_s = jax.lax.stop_gradient(p_s)
  return jnp.mean(jnp.square(p_t - p_s)) / jnp.mean(jnp.square(p_t))


def alignment_loss(student_hidden: Sequence[jax.Array], teacher_hidden: Sequence[jax.Array],
                   token_mask: jax.Array, student_sub: Mapping[int, Mapping],
                   teacher_blocks: Mapping[int, Mapping], *, alpha: float,
                   product_grad: bool = True) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """FedPFT's layer-wise distillation loss (docs/algorithms.md 3.3), mean over all layers.

  Returns:
    (loss, (hidden term, product term)): loss = hidden + alpha * product, each a mean over
    the distilled layers (retained layers contribute no product term).
  """
  num_layers = len(teacher_hidden)
  hidden = sum(normalised_mse(s, t, token_mask)
               for s, t in zip(student_hidden, teacher_hidden)) / num_layers
  product = sum((product_mismatch(student_sub[i], teacher_blocks[i], product_grad)
                 for i in student_sub), jnp.zeros(())) / num_layers
  return hidden + alpha * product, (hidden, product)


def neuron_update_mask(updated: Mapping[int, jax.Array]) -> dict[int, dict]:
  """Gradient mask over the sub-FFN for neuron-level alignment (docs/algorithms.md 3.5, 3.10).

  Args:
    updated: {layer: [k] 1.0 for a neuron to update, 0.0 for one to keep}.

  Returns:
    A tree like `compress_ffn`'s with broadcastable multipliers: neuron i's fc_in column,
    fc_in bias and fc_out row get `updated[i]`; fc_out's bias and the LayerNorm are updated.
  """
  one = jnp.ones((), jnp.float32)
  return {i: {"mlp": {"fc_in": {"kernel": u[None, :], "bias": u},
                      "fc_out": {"kernel": u[:, None], "bias": one}},
              "mlp_norm": {"scale": one, "bias": one}} for i, u in updated.items()}


def least_active_mask(activity: jax.Array, retained_ratio: float, rng: jax.Array) -> jax.Array:
  """[k] 1.0 for the (1 - p) least active neurons (to update), 0.0 for the p most active
  (kept). Ties (e.g. equal activity) are broken at random."""
  k = activity.shape[-1]
  num_kept = int(round(retained_ratio * k))
  order = jnp.lexsort((jax.random.uniform(rng, (k,)), -activity))  # most active first
  rank = jnp.zeros((k,), jnp.int32).at[order].set(jnp.arange(k, dtype=jnp.int32))
  return (rank >= num_kept).astype(jnp.float32)


def make_distiller(forward: Forward, public: Mapping[str, jax.Array], *, steps: int,
                   batch_size: int, optimizer: optax.GradientTransformation, alpha: float,
                   product_grad: bool = True, mask_key: str = "attention_mask"):
  """Sub-FM -> FM distillation on the server's public data (both alignment levels).

  Returns:
    distill(sub_ffn, params, update_mask, rng) -> (new sub_ffn, {"loss", "hidden", "product"}
    each [steps], measured before each step's update). The teacher is `params` (the FM with its
    current LoRA), the student ``with_sub_ffn(params, sub_ffn)``; only `sub_ffn` is trained, with
    a fresh `optimizer`, on `batch_size` random public examples per step. `update_mask` (a tree
    of multipliers, `neuron_update_mask`, or None for all) scales both the gradients and the
    optimizer's updates, so masked weights stay bit-identical even under weight decay.
  """
  n = int(public[mask_key].shape[0])
  if not 1 <= batch_size <= n:
    raise ValueError(f"align batch size {batch_size} must be in 1..{n} (the public examples)")
  public = {k: jnp.asarray(v) for k, v in public.items()}

  def student_loss(sub, params, teacher_hidden, teacher_blocks, batch):
    _, inter = forward(with_sub_ffn(params, sub), batch, None)
    return alignment_loss(inter["hidden_states"], teacher_hidden, batch[mask_key], sub,
                          teacher_blocks, alpha=alpha, product_grad=product_grad)

  grad_fn = jax.value_and_grad(student_loss, has_aux=True)

  def distill(sub_ffn, params, update_mask, rng):
    teacher_blocks = {i: ffn_block(params, i) for i in sub_ffn}
    masked = ((lambda t: t) if update_mask is None else
              (lambda t: jax.tree_util.tree_map(lambda x, m: x * m.astype(x.dtype), t,
                                                update_mask)))

    def step(carry, key):
      sub, opt_state = carry
      idx = jax.random.choice(key, n, (batch_size,), replace=False)
      batch = {k: jnp.take(v, idx, axis=0) for k, v in public.items()}
      _, t_inter = forward(params, batch, None)
      t_hidden = jax.lax.stop_gradient(t_inter["hidden_states"])
      (loss, (hidden, product)), grads = grad_fn(sub, params, t_hidden, teacher_blocks, batch)
      updates, opt_state = optimizer.update(masked(grads), opt_state, sub)
      sub = optax.apply_updates(sub, masked(updates))
      return (sub, opt_state), {"loss": loss, "hidden": hidden, "product": product}

    (sub_ffn, _), losses = jax.lax.scan(step, (sub_ffn, optimizer.init(sub_ffn)),
                                        jax.random.split(rng, steps))
    return sub_ffn, losses

  return distill


def default_align_optimizer(learning_rate: float = 6e-4) -> optax.GradientTransformation:
  """AdamW as the reference distils (lr 6e-4, weight decay 0.01, clip 1.0), constant lr."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(learning_rate, weight_decay=0.01))
