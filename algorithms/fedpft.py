"""FedPFT: federated proxy fine-tuning of a foundation model through a compressed sub-FM.

Peng, Fan, Chen, Wang, Pan, Wen, Zhang, Wang. "FedPFT: Federated Proxy Fine-Tuning of Foundation
Models." IJCAI 2024 (arXiv:2404.11536). Restated in ALGORITHMS.md section 3 from the paper and its
reference code (pzp-dzd/FedPFT, 35edea0).

The server owns the FM and never ships it. Clients get a **sub-FM** (the proxy): every layer not
in `retained_layers` keeps only `keep_neurons` of its FFN neurons, the most salient ones, in their
original order (`compress_ffn`); attention, embeddings and LayerNorms are the FM's. Clients train
LoRA on the attention projections (q, k, v, o) and the head on the sub-FM; since attention is not
compressed, the aggregated LoRA has the FM's leaf paths and shapes and plugs straight into the FM,
which is what the server holds in ``ServerState.params`` and what is evaluated. The sub-FM's
compressed FFN blocks live in ``ServerState.extra.sub_ffn``.

Two alignments reduce the mismatch between the sub-FM and the FM, both by distillation on a
*public* data set held by the server, disjoint from the clients' data (`public` below; the launch
builder uses speeches of plays no client holds):

1. Layer level, once before FL (in ``init``): the sub-FM's compressed FFN blocks (fc_in, fc_out and
   the FFN's output LayerNorm, i.e. HF BERT's ``intermediate`` and ``output`` modules) are trained
   to match the FM's hidden state after every layer (`alignment_loss`)::

     L = 1/L_all sum_l [ mse(h_T^l, h_S^l) / mean((h_T^l)^2)
                         + alpha * [l compressed] mean((P_T^l - P_S^l)^2) / mean((P_T^l)^2) ]

   with P^l = W_in^l W_out^l, the FFN's linear part. The reference code reads the student's
   weights through ``.data`` there, so the product term has no gradient and only changes the
   logged loss (ALGORITHMS.md 3.8, item 2); the paper means it as a regulariser, so here it
   carries a gradient (``product_grad=True``; False reproduces the reference code).

2. Neuron level, every `align_every` rounds, after aggregation: clients report per-neuron
   activation counts of their compressed FFNs, gathered during local training; the server ranks
   neurons by the fraction of active tokens, keeps the `align_retained_ratio` (p) most active
   ones frozen and distils only the other (1 - p) neurons' fc_in columns, fc_in biases and fc_out
   rows (plus the FFN output bias and LayerNorm, as the reference code does) through a gradient
   mask (`neuron_update_mask`); the updated sub-FFN goes to the clients with the next round.
   The teacher is the FM with the aggregated LoRA, the student the sub-FM with the same LoRA
   (the reference code's student carries the last-trained client's LoRA, 3.8 item 4).

   "Active" is ``|GELU(x)| > active_threshold``, not the reference code's ``!= 0``: GELU is
   exactly zero essentially never, so the exact-zero APoZ is ~0 for every neuron and the
   reference's split into frozen and updated neurons is decided by its random pre-shuffle
   (3.8 item 1). The round metrics ``ffn_exact_zero_fraction`` and ``ffn_inactive_fraction``
   show both statistics on the clients' real data. Ties are still broken at random.

Round (one jitted program; the alignment is a `lax.cond` on the round counter, so the round
compiles once): the shared LoRA + head is broadcast; every sampled client runs `local_steps`
optimizer steps on the sub-FM (`fedjax_fm.local.train_steps`); non-finite clients are dropped;
the server takes the weighted mean of the deltas (by data size, the paper's figure; the reference
code's uniform mean with ``weighted=False``) and applies `server_optimizer`; on alignment rounds
the sub-FFN is re-aligned as above.

Baselines from the same factory: ``layer_align_steps=0, align_every=0`` is the sub-FM without
alignment (FedOT-like); ``keep_neurons=None`` compresses nothing, so the sub-FM is the FM and the
algorithm is FedAvg on LoRA of the full FM (the upper bound).

Deviations, each on purpose: constant client learning rate (the reference decays it linearly over
rounds); a fixed number of server distillation steps per alignment with a fresh optimizer (the
reference halves its gradient accumulation every alignment); dropout off during distillation.

Communication (`bytes_per_client`, per round, amortised): down = LoRA + head plus, divided by
`align_every`, the re-aligned weights (the updated neurons' rows and columns with their indices,
the FFN output biases and LayerNorms); up = LoRA + head plus the activation counts divided by
`align_every`. The one-time download of the sub-FM itself is reported by `size_report`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from fedjax_fm import aggregate, clients, local, roles as roles_lib
from fedjax_fm.algorithm import (Algorithm, ClientExecution, ServerState, default_execution,
                                  stacked_personal)
from fedjax_fm.cohort import Cohort
from fedjax_fm.roles import FROZEN, PERSONAL, SHARED

PyTree = Any
# forward(params, batch, rng) -> (logits [B, C], intermediates) with intermediates as
# `TransformerModel(..., return_intermediates=True)` returns them; rng None = no dropout.
Forward = Callable[[PyTree, Mapping[str, jax.Array], jax.Array | None],
                   tuple[jax.Array, Mapping[str, Sequence[jax.Array]]]]

_ACTIVE, _TOKENS, _ZEROS = "_active", "_tokens", "_exact_zeros"


@struct.dataclass
class ProxyState:
  """The server's sub-FM state (``ServerState.extra``).

  Attributes:
    sub_ffn: {layer index: {"mlp": {"fc_in", "fc_out"}, "mlp_norm"}} of every compressed layer,
      with ``keep_neurons`` FFN neurons (see `compress_ffn`).
    activity: [compressed layers, keep_neurons], the fraction of the clients' real tokens on
      which each neuron was active in the last round (what neuron-level alignment ranks by);
      None when nothing is compressed.
    layer_alignment: [2], the layer-level alignment loss at its first and last step (zeros
      without layer-level alignment).
  """
  sub_ffn: PyTree
  activity: jax.Array
  layer_alignment: jax.Array


# ----------------------------------------------------------------------------------------------
# Sub-FM construction
# ----------------------------------------------------------------------------------------------

def layer_indices(params: PyTree) -> tuple[int, ...]:
  """The encoder layer indices of a `TransformerModel`'s parameter tree."""
  return tuple(sorted(params["encoder"]["layers"]))


def neuron_saliency(fc_in_kernel: jax.Array, fc_out_kernel: jax.Array) -> jax.Array:
  """s_i = ||[W_in[i, :], W_out[:, i]]||_2 for every FFN neuron i (ALGORITHMS.md 3.2).

  Flax kernels are (in, out): neuron i's input weights are column i of fc_in's kernel [D, F]
  and its output weights row i of fc_out's kernel [F, D]. Returns [F].
  """
  return jnp.sqrt(jnp.sum(jnp.square(fc_in_kernel), axis=0)
                  + jnp.sum(jnp.square(fc_out_kernel), axis=1))


def top_neurons(saliency: jax.Array, k: int) -> jax.Array:
  """Indices of the `k` most salient neurons, in their original (ascending) order."""
  if not 1 <= k <= saliency.shape[-1]:
    raise ValueError(f"keep {k} neurons of {saliency.shape[-1]}: choose 1 <= keep_neurons <= "
                     "the FFN width")
  return jnp.sort(jax.lax.top_k(saliency, k)[1])


def _block(params: PyTree, i: int) -> dict:
  """Layer i's FFN block as the sub-FM stores it: {"mlp": {fc_in, fc_out}, "mlp_norm"}."""
  layer = params["encoder"]["layers"][i]
  return {"mlp": {"fc_in": dict(layer["mlp"]["fc_in"]), "fc_out": dict(layer["mlp"]["fc_out"])},
          "mlp_norm": dict(layer["mlp_norm"])}


def compress_ffn(params: PyTree, keep_neurons: int,
                 retained_layers: Sequence[int] = ()) -> dict[int, dict]:
  """The sub-FM's FFN blocks: layer-wise FFN compression by neuron saliency (ALGORITHMS.md 3.2).

  Every layer not in `retained_layers` keeps its `keep_neurons` most salient neurons in their
  original order: fc_in kernel columns and bias entries, fc_out kernel rows; fc_out's bias and
  the LayerNorm are copied. Pure and jit-able (`keep_neurons` is static).

  Args:
    params: a `TransformerModel`'s parameters (the FM).
    keep_neurons: k, FFN neurons kept per compressed layer.
    retained_layers: layers kept whole (not in the result).

  Returns:
    {layer index: {"mlp": {"fc_in": {kernel [D, k], bias [k]}, "fc_out": {kernel [k, D],
    bias [D]}}, "mlp_norm": {scale, bias}}} for the compressed layers; `with_sub_ffn` puts it
    into a parameter tree.
  """
  indices = layer_indices(params)
  unknown = sorted(set(retained_layers) - set(indices))
  if unknown:
    raise ValueError(f"retained_layers {unknown} are not layers of the model (it has "
                     f"{len(indices)}); use indices in 0..{len(indices) - 1}")
  sub = {}
  for i in indices:
    if i in retained_layers:
      continue
    block = _block(params, i)
    fc_in, fc_out = block["mlp"]["fc_in"], block["mlp"]["fc_out"]
    idx = top_neurons(neuron_saliency(fc_in["kernel"], fc_out["kernel"]), keep_neurons)
    block["mlp"] = {
        "fc_in": {"kernel": jnp.take(fc_in["kernel"], idx, axis=1),
                  "bias": jnp.take(fc_in["bias"], idx, axis=0)},
        "fc_out": {"kernel": jnp.take(fc_out["kernel"], idx, axis=0), "bias": fc_out["bias"]}}
    sub[i] = block
  return sub


def with_sub_ffn(params: PyTree, sub_ffn: Mapping[int, Mapping]) -> PyTree:
  """`params` with the FFN blocks of `sub_ffn` in place of the FM's: the sub-FM's parameters.

  Only the compressed layers' fc_in, fc_out and mlp_norm change; the tree keeps its structure
  (narrower arrays merge with the same graph definition), so LoRA and head leaves, and trees
  from `roles.select` with None leaves, pass through.
  """
  if not sub_ffn:
    return params
  layers = dict(params["encoder"]["layers"])
  for i, block in sub_ffn.items():
    layer = dict(layers[i])
    layer["mlp"] = {**layer["mlp"], **block["mlp"]}
    layer["mlp_norm"] = block["mlp_norm"]
    layers[i] = layer
  return {**params, "encoder": {**params["encoder"], "layers": layers}}


def _count(tree: PyTree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def size_report(params: PyTree, roles: PyTree, keep_neurons: int | None,
                retained_layers: Sequence[int] = ()) -> dict[str, int]:
  """Parameter counts and bytes of the FM and the sub-FM (shapes only; nothing is computed).

  Returns:
    ``fm_params`` / ``sub_fm_params`` (all parameters, LoRA and head included),
    ``fm_encoder_params`` / ``sub_fm_encoder_params`` (the encoder's frozen backbone: the
    paper's "transformer parameters"), ``sub_fm_bytes`` (the one-time download of the frozen
    sub-FM) and ``shared_bytes`` (LoRA + head: what goes each way every round).
  """
  sub = ({} if keep_neurons is None else
         jax.eval_shape(lambda p: compress_ffn(p, keep_neurons, retained_layers), params))
  sub_params = jax.eval_shape(lambda p: with_sub_ffn(p, sub), params)
  frozen = lambda p: roles_lib.select(p, roles, FROZEN)
  encoder = lambda p: {"encoder": frozen(p)["encoder"]}
  nbytes = lambda t: roles_lib.tree_bytes(t)
  return {"fm_params": _count(params), "sub_fm_params": _count(sub_params),
          "fm_encoder_params": _count(encoder(params)),
          "sub_fm_encoder_params": _count(encoder(sub_params)),
          "sub_fm_bytes": nbytes(frozen(sub_params)),
          "shared_bytes": nbytes(roles_lib.select(params, roles, SHARED))}


# ----------------------------------------------------------------------------------------------
# Alignment by distillation
# ----------------------------------------------------------------------------------------------

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
  """FedPFT's layer-wise distillation loss (ALGORITHMS.md 3.3), mean over all layers.

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
  """Gradient mask over the sub-FFN for neuron-level alignment (ALGORITHMS.md 3.5, 3.10).

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
    teacher_blocks = {i: _block(params, i) for i in sub_ffn}
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


def model_forward(graphdef: nnx.GraphDef,
                  input_keys: str | Sequence[str] = ("input_ids", "attention_mask"),
                  train: bool = True) -> Forward:
  """`Forward` of a `TransformerModel` graph definition: (logits, intermediates).

  Args:
    graphdef: the model's graph definition (`fedjax_fm.models.functional`).
    input_keys: batch keys passed positionally.
    train: dropout on when a key is given (False: never).
  """
  keys = (input_keys,) if isinstance(input_keys, str) else tuple(input_keys)

  def forward(params, batch, rng):
    model = nnx.merge(graphdef, params)
    return model(*(batch[k] for k in keys), rng=rng if train else None,
                 return_intermediates=True)

  return forward


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------

def default_align_optimizer(learning_rate: float = 6e-4) -> optax.GradientTransformation:
  """AdamW as the reference distils (lr 6e-4, weight decay 0.01, clip 1.0), constant lr."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(learning_rate, weight_decay=0.01))


def _check_roles(params: PyTree, roles: PyTree):
  """Only LoRA on attention and the head may be trained: the sub-FM's FFN is not the FM's."""
  for path, role in jax.tree_util.tree_leaves_with_path(roles):
    p = roles_lib.leaf_path(path)
    if role == PERSONAL:
      raise ValueError(f"FedPFT keeps no personal parameters, but {p} is personal; make it "
                       "shared (transformer_roles(params, trainable=('lora', 'head')))")
    if role == SHARED and ("/mlp/" in p or "/mlp_norm/" in p):
      raise ValueError(f"{p} is trained, but the sub-FM's FFN differs from the FM's; train "
                       "LoRA on attention only (LoRAConfig(targets=('q', 'k', 'v', 'o')))")
  if "encoder" not in params or "layers" not in params["encoder"]:
    raise ValueError("FedPFT needs a TransformerModel's parameters (encoder/layers/...)")


def fedpft(forward: Forward, roles: PyTree, params: PyTree, *,
           keep_neurons: int | None,
           retained_layers: Sequence[int] = (),
           public: Mapping[str, np.ndarray] | None = None,
           layer_align_steps: int = 0,
           align_every: int = 0,
           align_steps: int = 0,
           align_batch_size: int = 16,
           align_retained_ratio: float = 0.5,
           alpha: float = 0.01,
           product_grad: bool = True,
           active_threshold: float = 1e-2,
           align_optimizer: optax.GradientTransformation | None = None,
           client_optimizer: optax.GradientTransformation | None = None,
           server_optimizer: optax.GradientTransformation = optax.sgd(1.0),
           label_key: str = "y",
           mask_key: str = "attention_mask",
           weighted: bool = True,
           execution: ClientExecution | None = None) -> Algorithm:
  """Builds FedPFT (Peng et al. 2024); see the module docstring.

  Example::

      model = TransformerModel(config, rngs=nnx.Rngs(0), head={"kind": "classification",
                               "num_classes": 4}, lora={"targets": ("q", "k", "v", "o")})
      graphdef, params = functional(model)
      roles = transformer_roles(params, trainable=("lora", "head"))
      alg = fedpft(model_forward(graphdef, ("input_ids", "attention_mask")), roles, params,
                   keep_neurons=64, retained_layers=(0,), public=public_arrays,
                   layer_align_steps=100, align_every=2, align_steps=20)

  Args:
    forward: (params, batch, rng) -> (logits, intermediates) (`model_forward`).
    roles: LoRA (attention only) and head shared, everything else frozen.
    params: the FM's initial parameters (structure, and the FFN widths).
    keep_neurons: FFN neurons kept per compressed layer; None compresses nothing (the sub-FM is
      the FM: FedAvg-LoRA on the full FM).
    retained_layers: layers kept whole (the reference keeps the first and the last).
    public: the server's public inputs (the forward's input keys, [n, T]), disjoint from the
      clients' data; needed when any alignment step is asked for.
    layer_align_steps: steps of layer-level alignment before FL (0: none).
    align_every: neuron-level alignment after every this many rounds (0: never).
    align_steps: distillation steps per neuron-level alignment.
    align_batch_size: public examples per distillation step.
    align_retained_ratio: p, the fraction of most active neurons kept frozen.
    alpha: weight of the weight-product term of the distillation loss.
    product_grad: whether the product term carries a gradient (the paper) or not (the code).
    active_threshold: a neuron is active on a token where |activation| > this.
    align_optimizer: the distillation optimizer; `default_align_optimizer()` if None.
    client_optimizer: local optimizer, fresh each round; Adam(8e-4) (the README's lr) if None.
    server_optimizer: fed the pseudo-gradient -mean(delta); `sgd(1.0)` is plain averaging.
    label_key, mask_key: batch keys of the labels and the token mask.
    weighted: weight clients by their example counts (the paper) or equally (the code).
    execution: how clients run inside the program; `default_execution()` if None.

  Returns:
    An `Algorithm` whose server state holds the FM (with the aggregated LoRA and head) in
    ``params`` and a `ProxyState` in ``extra``. Round metrics: ``loss``, ``accuracy`` (on the
    sub-FM during local training), ``ffn_inactive_fraction`` / ``ffn_exact_zero_fraction``
    (compressed layers' activations), ``neuron_align`` (1 on alignment rounds),
    ``neuron_align_loss_start`` / ``_end``, ``layer_align_loss_start`` / ``_end`` (of init's
    layer-level alignment), ``num_nonfinite_clients``, ``examples``.

  Raises:
    ValueError: for inconsistent roles or hyperparameters.
  """
  execution = execution or default_execution()
  client_optimizer = client_optimizer or optax.adam(8e-4)
  align_optimizer = align_optimizer or default_align_optimizer()
  _check_roles(params, roles)
  if keep_neurons is None and (layer_align_steps or align_every):
    raise ValueError("alignment needs a compressed sub-FM; set keep_neurons, or "
                     "layer_align_steps=0 and align_every=0 for the full-FM baseline")
  for name, value in (("layer_align_steps", layer_align_steps), ("align_every", align_every),
                      ("align_steps", align_steps)):
    if value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}")
  if align_every and not align_steps:
    raise ValueError("align_every > 0 needs align_steps > 0 (distillation steps per alignment)")
  if not 0.0 <= align_retained_ratio <= 1.0:
    raise ValueError(f"align_retained_ratio {align_retained_ratio} must be in [0, 1]")
  if not active_threshold >= 0:
    raise ValueError(f"active_threshold {active_threshold} must be >= 0")
  if (layer_align_steps or align_every) and public is None:
    raise ValueError("alignment distils on the server's public data; pass public=")

  shapes = jax.eval_shape(lambda p: p, params)
  sub_shapes = ({} if keep_neurons is None else
                jax.eval_shape(lambda p: compress_ffn(p, keep_neurons, tuple(retained_layers)),
                               shapes))
  compressed = tuple(sorted(sub_shapes))
  compress = jax.jit(lambda p: compress_ffn(p, keep_neurons, tuple(retained_layers)))
  num_neurons = keep_neurons or 0
  needs_distill = bool(layer_align_steps or align_every)
  if needs_distill:
    missing = sorted({mask_key} - set(public))
    if missing:
      raise ValueError(f"public data lacks {missing}; give it the forward's input keys")
  layer_distill = (jax.jit(make_distiller(
      forward, public, steps=layer_align_steps, batch_size=align_batch_size,
      optimizer=align_optimizer, alpha=alpha, product_grad=product_grad, mask_key=mask_key))
                   if layer_align_steps else None)
  neuron_distill = (make_distiller(
      forward, public, steps=align_steps, batch_size=align_batch_size,
      optimizer=align_optimizer, alpha=alpha, product_grad=product_grad, mask_key=mask_key)
                    if align_every else None)

  # ---- the local update of one client: train LoRA + head on the sub-FM, count activity ----
  def objective(trainable, frozen_sub, batch, mask, key):
    params_k = roles_lib.merge(trainable, frozen_sub)
    live = mask > 0
    batch = jax.tree_util.tree_map(
        lambda a: jnp.where(live.reshape(live.shape + (1,) * (a.ndim - 1)), a,
                            jnp.zeros_like(a)), dict(batch))
    logits, inter = forward(params_k, batch, key)
    labels = batch[label_key]
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    weight = jnp.where(live, mask, 0.0)
    count = jnp.sum(weight)
    loss_sum = jnp.sum(jnp.where(live, per_example * mask, 0.0))
    sums = {"loss_sum": loss_sum, "count": count,
            "accuracy_sum": jnp.sum(weight * (jnp.argmax(logits, -1) == labels))}
    if compressed:
      tokens = batch[mask_key].astype(jnp.float32) * live[:, None]
      acts = [inter["ffn_activations"][i].astype(jnp.float32) for i in compressed]
      sums[_ACTIVE] = jnp.stack([jnp.einsum("bt,btf->f", tokens,
                                            (jnp.abs(a) > active_threshold).astype(jnp.float32))
                                 for a in acts])
      sums[_ZEROS] = sum(jnp.einsum("bt,btf->", tokens, (a == 0).astype(jnp.float32))
                         for a in acts)
      sums[_TOKENS] = jnp.sum(tokens)
    return loss_sum / jnp.maximum(count, 1.0), sums

  # ---- the contract ----
  def init(params: PyTree, rng: jax.Array) -> ServerState:
    shared = roles_lib.select(params, roles, SHARED)
    full = roles_lib.merge(shared, roles_lib.select(params, roles, FROZEN))
    sub = {} if keep_neurons is None else compress(full)
    layer_losses = jnp.zeros((2,), jnp.float32)
    if layer_distill is not None:
      sub, losses = layer_distill(sub, full, None, rng)
      layer_losses = jnp.stack([losses["loss"][0], losses["loss"][-1]])
    # Nothing compressed (the full-FM baseline): no activity to keep (and orbax refuses
    # zero-size arrays in checkpoints).
    activity = jnp.zeros((len(compressed), num_neurons), jnp.float32) if compressed else None
    extra = ProxyState(sub_ffn=sub, activity=activity, layer_alignment=layer_losses)
    return ServerState(round=jnp.zeros((), jnp.int32), params=full,
                       opt_state=server_optimizer.init(shared), extra=extra)

  def init_clients(params: PyTree, num_clients: int) -> PyTree:
    return stacked_personal(params, roles, num_clients)

  def bytes_per_client(params: PyTree) -> tuple[int, int]:
    """LoRA + head both ways; alignment's sub-FFN refresh (down) and activity counts (up)
    amortised over `align_every` rounds."""
    shared = roles_lib.tree_bytes(roles_lib.select(params, roles, SHARED))
    if not align_every:
      return shared, shared
    # Down: per compressed layer the updated neurons' fc_in column, fc_in bias and fc_out row
    # with their int32 indices, plus fc_out's bias and the LayerNorm (float32).
    hidden = sub_shapes[compressed[0]]["mlp"]["fc_out"]["bias"].shape[0]
    updated = num_neurons - int(round(align_retained_ratio * num_neurons))
    refresh = len(compressed) * 4 * (updated * (2 * hidden + 2) + 3 * hidden)
    counts = len(compressed) * num_neurons * 4 + 4  # float32 counts per neuron + token count
    return shared + refresh // align_every, shared + counts // align_every

  def round_fn(server: ServerState, client_states: PyTree, cohort: Cohort, rng: jax.Array):
    shared = roles_lib.select(server.params, roles, SHARED)
    frozen = roles_lib.select(server.params, roles, FROZEN)
    sub_ffn = server.extra.sub_ffn
    frozen_sub = with_sub_ffn(frozen, sub_ffn)  # the proxy the clients train on
    local_rng, align_rng = jax.random.split(rng)
    keys = jax.random.split(local_rng, cohort.num_clients)

    def one_client(data_k, mask_k, key_k):
      trained, sums = local.train_steps(
          lambda t, b, m, k: objective(t, frozen_sub, b, m, k), client_optimizer, shared,
          data_k, mask_k, key_k, execution.scan_unroll)
      delta = jax.tree_util.tree_map(jnp.subtract, trained, shared)
      return delta, sums

    deltas, sums = execution.map(one_client)(cohort.data, cohort.mask, keys)
    deltas = execution.constrain(deltas)

    ok = aggregate.finite_clients((deltas, sums["loss_sum"]))
    weights = cohort.weights if weighted else (cohort.weights > 0).astype(cohort.weights.dtype)
    weights = jnp.where(ok, weights, 0.0)
    mean_delta = aggregate.weighted_mean(aggregate.zero_where_bad(deltas, ok), weights)
    new_shared, new_opt_state = aggregate.server_update(server_optimizer, shared,
                                                        server.opt_state, mean_delta)
    any_ok = jnp.any(ok)
    new_shared, new_opt_state = aggregate.keep_if(any_ok, (new_shared, new_opt_state),
                                                  (shared, server.opt_state))
    new_params = roles_lib.merge(new_shared, frozen)  # the LoRA plugs into the full FM

    activity = server.extra.activity
    metrics = {}
    if compressed:
      def healthy_sum(x):  # summed over the clients that count
        return jnp.sum(jnp.where(ok.reshape(ok.shape + (1,) * (x.ndim - 1)), x, 0.0), axis=0)

      stats = {k: healthy_sum(sums.pop(k)) for k in (_ACTIVE, _ZEROS, _TOKENS)}
      tokens = jnp.maximum(stats[_TOKENS], 1.0)
      activity = jnp.where(stats[_TOKENS] > 0, stats[_ACTIVE] / tokens, activity)
      cells = tokens * len(compressed) * num_neurons
      metrics["ffn_inactive_fraction"] = 1.0 - jnp.sum(stats[_ACTIVE]) / cells
      metrics["ffn_exact_zero_fraction"] = stats[_ZEROS] / cells
    metrics.update(aggregate.example_means(sums, ok))
    if layer_align_steps:  # reported with every round, so runs log what init's alignment did
      metrics["layer_align_loss_start"] = server.extra.layer_alignment[0]
      metrics["layer_align_loss_end"] = server.extra.layer_alignment[1]
    metrics["num_nonfinite_clients"] = cohort.num_clients - jnp.sum(ok)

    if align_every:
      def align(sub):
        select_key, distill_key = jax.random.split(align_rng)
        updated = {i: least_active_mask(activity[j], align_retained_ratio,
                                        jax.random.fold_in(select_key, i))
                   for j, i in enumerate(compressed)}
        new_sub, losses = neuron_distill(sub, new_params, neuron_update_mask(updated),
                                         distill_key)
        return new_sub, jnp.stack([losses["loss"][0], losses["loss"][-1]])

      due = (server.round + 1) % align_every == 0
      sub_ffn, align_losses = jax.lax.cond(
          due, align, lambda sub: (sub, jnp.zeros((2,), jnp.float32)), sub_ffn)
      metrics["neuron_align"] = due.astype(jnp.float32)
      metrics["neuron_align_loss_start"] = align_losses[0]
      metrics["neuron_align_loss_end"] = align_losses[1]

    server = server.replace(round=server.round + 1, params=new_params, opt_state=new_opt_state,
                            extra=server.extra.replace(sub_ffn=sub_ffn, activity=activity))
    return server, client_states, metrics

  return Algorithm(init=init, init_clients=init_clients, round=round_fn,
                   bytes_per_client=bytes_per_client)


# ----------------------------------------------------------------------------------------------
# Launch wiring
# ----------------------------------------------------------------------------------------------

# Baselines by name: the sub-FM without alignment (FedOT-like) and FedAvg-LoRA on the full FM.
VARIANTS = ("fedpft", "fedot", "full")
HPARAMS = ("variant", "client_lr", "keep_neurons", "retained_layers", "layer_align_steps",
           "align_every", "align_steps", "align_batch_size", "align_retained_ratio", "align_lr",
           "alpha", "product_grad", "active_threshold", "weighted", "public_examples")


def shakespeare_public_inputs(*, num_plays_held: int, count: int, max_length: int, seed: int,
                              unit: str = "speech", min_chars: int = 20,
                              input_keys: Sequence[str] = ("input_ids", "attention_mask",
                                                           "token_type_ids")
                              ) -> dict[str, np.ndarray]:
  """The server's public distillation data for the Shakespeare play-classification clients.

  The clients hold speeches of the `num_plays_held` plays with the most speeches
  (`fedjax_fm.data.suite.minilm_play_classification`, same `unit` and `min_chars`, so the same
  play ranking); the public split is `count` random speeches of the *other* plays, tokenised
  with the all-MiniLM-L6-v2 tokenizer: disjoint from every client's train and test data.
  """
  from fedjax_fm.data import shakespeare, text  # pylint: disable=import-outside-toplevel
  texts, labels, _, _ = shakespeare.classification_examples(
      shakespeare.load_records(), target="play", unit=unit, min_chars=min_chars)
  pool = texts[labels >= num_plays_held]
  if count > len(pool):
    raise ValueError(f"public_examples={count} but only {len(pool)} speeches of other plays; "
                     "lower config.algorithm.hparams.public_examples")
  rng = np.random.default_rng([seed, 0x9F7])
  chosen = pool[np.sort(rng.choice(len(pool), count, replace=False))]
  encoded = text.minilm_tokenizer(max_length).encode(chosen.tolist())
  return {k: np.asarray(encoded[k]) for k in input_keys}


def build_fedpft(config, graphdef, params, role_tree, input_keys, execution):
  """launch.py's builder: FedPFT or a baseline (``hparams.variant``) on the Shakespeare
  play-classification clients, with the public split of `shakespeare_public_inputs` (one
  fixed draw, the same for every seed, as a server's corpus would be).

  Returns:
    (algorithm, test data -> evaluate function); evaluation is of the full FM with the
    aggregated LoRA and head (personalized: each client's test split; global: pooled; FedPFT
    keeps no personal state, so the two are the same model).
  """
  from fedjax_fm import models  # pylint: disable=import-outside-toplevel
  from fedjax_fm.evaluate import make_evaluator  # pylint: disable=import-outside-toplevel
  hp = config.algorithm.hparams.to_dict()
  unknown = sorted(set(hp) - set(HPARAMS))
  if unknown:
    raise ValueError(f"algorithm 'fedpft' takes no hyperparameter {unknown}; it takes "
                     f"{sorted(HPARAMS)}")
  variant = hp.get("variant", "fedpft")
  if variant not in VARIANTS:
    raise ValueError(f"unknown fedpft variant {variant!r}; use one of {VARIANTS}")
  if config.data.name != "shakespeare_play":
    raise ValueError(f"fedpft's public split is built for data.name='shakespeare_play', got "
                     f"{config.data.name!r}")
  full = variant == "full"
  aligned = variant == "fedpft"
  public = None
  if aligned:
    public = shakespeare_public_inputs(
        num_plays_held=config.data.num_plays, count=hp.get("public_examples", 256),
        max_length=config.data.max_length, seed=0, unit=config.data.unit,
        input_keys=input_keys)
  alg = fedpft(model_forward(graphdef, input_keys), role_tree, params,
               keep_neurons=None if full else hp.get("keep_neurons", 384),
               retained_layers=() if full else tuple(hp.get("retained_layers", ())),
               public=public,
               layer_align_steps=hp.get("layer_align_steps", 100) if aligned else 0,
               align_every=hp.get("align_every", 2) if aligned else 0,
               align_steps=hp.get("align_steps", 10) if aligned else 0,
               align_batch_size=hp.get("align_batch_size", 16),
               align_retained_ratio=hp.get("align_retained_ratio", 0.5),
               alpha=hp.get("alpha", 0.01), product_grad=hp.get("product_grad", True),
               active_threshold=hp.get("active_threshold", 1e-2),
               align_optimizer=default_align_optimizer(hp.get("align_lr", 6e-4)),
               client_optimizer=optax.adam(hp.get("client_lr", 8e-4)),
               weighted=hp.get("weighted", True), execution=execution)
  eval_loss = models.classification_loss(graphdef, input_keys, train=False)
  return alg, lambda test_data: make_evaluator(eval_loss, test_data)
