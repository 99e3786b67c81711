"""FedPFT: federated proxy fine-tuning of a foundation model through a compressed sub-FM.

Peng, Fan, Chen, Wang, Pan, Wen, Zhang, Wang. "FedPFT: Federated Proxy Fine-Tuning of Foundation
Models." IJCAI 2024 (arXiv:2404.11536). Restated in docs/algorithms.md section 3 from the paper and
its
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
   logged loss (docs/algorithms.md 3.8, item 2); the paper means it as a regulariser, so here it
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
optimizer steps on the sub-FM (`fedjax_fm.client_update.train_steps`); non-finite clients are
dropped;
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

Decoder LLMs (issue 15): what is model-specific (building the sub-FM, the clients' view of the
shared parameters and plugging them back, the task loss) is a `ProxyModel`; `encoder_proxy` is
the above and the default, `decoder_proxy` a `DecoderLM`'s: every stacked layer keeps its
`keep_neurons` most salient SwiGLU neurons (`fedjax_fm.models.decoder_sub_fm`), LoRA on
gate/up/down is cut to them on the clients and written back into the FM's LoRA at those
neurons, and the loss is the decoder's next-token loss. Not supported on the decoder yet:
``retained_layers`` (the layers are stacked) and both alignments (they need per-layer hidden
states and FFN activations the scanned decoder does not return), so ``layer_align_steps=0,
align_every=0`` (FedOT-like) or ``keep_neurons=None``; asking for more raises ValueError.

This file holds the algorithm (`fedpft`, its server state `ProxyState`, `ProxyModel` with
`encoder_proxy` and `decoder_proxy`). The sub-FM itself
(`compress_ffn`, `with_sub_ffn`, `size_report`, `model_forward`) is `fedjax_fm.models.sub_fm`;
the alignment losses, masks and distiller are `fedjax_fm.algorithms.fedpft_alignment`;
`fedjax_fm.algorithms.fedpft_launch` wires a config to this algorithm for launch.py.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from fedjax_fm import aggregate, chain as chain_lib, client_update, roles as roles_lib
from fedjax_fm.protocol import (Algorithm, ClientExecution, ServerState, default_execution,
                                  stacked_personal)
from fedjax_fm.algorithms.fedpft_alignment import (default_align_optimizer, least_active_mask,
                                                   make_distiller, neuron_update_mask)
from fedjax_fm.cohort import Cohort
from fedjax_fm.models import decoder_sub_fm
from fedjax_fm.models.sub_fm import Forward, compress_ffn, with_sub_ffn
from fedjax_fm.roles import FROZEN, PERSONAL, SHARED

PyTree = Any

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


def _check_roles(params: PyTree, roles: PyTree, retained_layers: Sequence[int] = ()):
  """Only LoRA on attention and the head may be trained: the sub-FM's FFN is not the FM's."""
  del retained_layers  # `compress_ffn` checks them
  if "encoder" not in params or "layers" not in params["encoder"]:
    raise ValueError("FedPFT needs a TransformerModel's parameters (encoder/layers/...); for "
                     "a DecoderLM pass fedpft(decoder_proxy(loss_fn), ...)")
  for path, role in jax.tree_util.tree_leaves_with_path(roles):
    p = roles_lib.leaf_path(path)
    if role == PERSONAL:
      raise ValueError(f"FedPFT keeps no personal parameters, but {p} is personal; make it "
                       "shared (transformer_roles(params, trainable=('lora', 'head')))")
    if role == SHARED and ("/mlp/" in p or "/mlp_norm/" in p):
      raise ValueError(f"{p} is trained, but the sub-FM's FFN differs from the FM's; train "
                       "LoRA on attention only (LoRAConfig(targets=('q', 'k', 'v', 'o')))")


class ProxyModel(NamedTuple):
  """How FedPFT builds, trains and plugs back the sub-FM of one model family.

  `encoder_proxy` (a `TransformerModel`, the default and the paper's setting) and
  `decoder_proxy` (a `DecoderLM`) implement it; `fedpft` itself is the same for both.

  Attributes:
    name: for messages.
    check: (params, roles, retained_layers) -> None; raises ValueError for what the family
      cannot train on a sub-FM.
    compress: (FM params, keep_neurons, retained_layers) -> the sub-FM's state
      (``ProxyState.sub_ffn``); jit-able, `keep_neurons` and `retained_layers` static.
    with_sub: (an FM tree, e.g. its frozen part from `roles.select`, sub state) -> the sub-FM's
      tree (what clients run on).
    cut_shared: (the FM's shared parameters, sub state) -> the sub-FM's shared parameters
      (what clients train and send back).
    plug_shared: (the FM's shared parameters, the sub-FM's shared parameters, sub state) -> the
      FM's shared parameters with the sub-FM's plugged in.
    task: (params, batch, rng) -> (per-example loss [B], per-example accuracy [B], per-layer
      FFN activations [B, T, F] or None).
    compressed_layers: (sub state, or its shapes) -> the layers whose activity is counted and
      neuron-aligned (`task`'s activation indices); () counts nothing.
    forward: the `Forward` the alignment distils through; None: alignment is not supported.
  """
  name: str
  check: Callable[[PyTree, PyTree, Sequence[int]], None]
  compress: Callable[[PyTree, int, tuple[int, ...]], PyTree]
  with_sub: Callable[[PyTree, PyTree], PyTree]
  cut_shared: Callable[[PyTree, PyTree], PyTree]
  plug_shared: Callable[[PyTree, PyTree, PyTree], PyTree]
  task: Callable[[PyTree, Mapping[str, jax.Array], jax.Array | None],
                 tuple[jax.Array, jax.Array, Sequence[jax.Array] | None]]
  compressed_layers: Callable[[PyTree], tuple[int, ...]]
  forward: Forward | None


def encoder_proxy(forward: Forward, label_key: str = "y") -> ProxyModel:
  """FedPFT on a `TransformerModel` (the paper's setting): per-layer `compress_ffn`, LoRA on
  attention and the head (the same shapes on the sub-FM and the FM, so plugging back is the
  identity), classification cross-entropy on `forward`'s logits, alignment supported."""
  def task(params, batch, rng):
    logits, inter = forward(params, batch, rng)
    labels = batch[label_key]
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return per_example, jnp.argmax(logits, -1) == labels, inter["ffn_activations"]

  return ProxyModel(name="encoder", check=_check_roles, compress=compress_ffn,
                    with_sub=with_sub_ffn, cut_shared=lambda shared, sub: shared,
                    plug_shared=lambda full, shared, sub: shared, task=task,
                    compressed_layers=lambda sub: tuple(sorted(sub)), forward=forward)


_SWIGLU = ("gate", "up", "down")


def _check_decoder_roles(params: PyTree, roles: PyTree, retained_layers: Sequence[int] = ()):
  """A `DecoderLM`'s tree, nothing personal, the cut MLP kernels frozen, no retained layers."""
  mlp = params.get("layers", {}).get("mlp", {}) if isinstance(params, Mapping) else {}
  if not all(n in mlp for n in _SWIGLU):
    raise ValueError("decoder_proxy needs a DecoderLM's parameters (layers/mlp/{gate,up,down})")
  if tuple(retained_layers):
    raise ValueError(f"retained_layers={tuple(retained_layers)}, but a DecoderLM's layers are "
                     "stacked [L, ...] and every layer keeps keep_neurons neurons; use "
                     "retained_layers=()")
  for path, role in jax.tree_util.tree_leaves_with_path(roles):
    p = roles_lib.leaf_path(path)
    if role == PERSONAL:
      raise ValueError(f"FedPFT keeps no personal parameters, but {p} is personal; make it "
                       "shared (decoder_roles(params, trainable=('lora',), personal=()))")
    if role == SHARED and any(p.startswith(f"layers/mlp/{n}/") for n in _SWIGLU):
      raise ValueError(f"{p} is trained, but the sub-FM's MLP kernels are cut from the FM's; "
                       "train LoRA only (decoder_roles(params, trainable=('lora',)))")


def decoder_proxy(loss_fn) -> ProxyModel:
  """FedPFT on a `DecoderLM`: its sub-FM keeps, in every (stacked) layer, the `keep_neurons`
  most salient SwiGLU neurons (`decoder_sub_fm.salient_neurons`); clients train LoRA on any
  target, LoRA on gate/up/down cut to the kept neurons (`decoder_sub_fm.cut_decoder_ffn`), with
  `loss_fn` (`decoder_loss.lm_loss_fn(graphdef)`: the FM's graph runs the narrower arrays); the
  aggregated LoRA is written back into the FM's at the kept neurons, the other neurons' LoRA
  slices staying as they were (`decoder_sub_fm.plug_decoder_ffn`).

  The sub state (``ProxyState.sub_ffn``) is ``{"neurons": [L, k] int32, "ffn": {gate, up,
  down: {"kernel"}}}``, the kept neurons and the cut frozen kernels. Not supported yet: the
  layer- and neuron-level alignment (they distil per-layer hidden states and count per-neuron
  activity, which the scanned decoder does not return), so FedPFT runs on a decoder with
  ``layer_align_steps=0, align_every=0`` (the FedOT-like sub-FM) or ``keep_neurons=None`` (the
  full FM); ``retained_layers`` must be () (the layers are stacked).
  """
  def compress(params, keep_neurons, retained_layers=()):
    del retained_layers  # () by `check`
    neurons = decoder_sub_fm.salient_neurons(params, keep_neurons)
    cut = decoder_sub_fm.cut_decoder_ffn(params, neurons)["layers"]["mlp"]
    return {"neurons": neurons, "ffn": {n: {"kernel": cut[n]["kernel"]} for n in _SWIGLU}}

  def with_sub(tree, sub):
    if not sub:
      return tree
    mlp = {k: ({**v, "kernel": None} if k in _SWIGLU else v)
           for k, v in tree["layers"]["mlp"].items()}
    cut = decoder_sub_fm.cut_decoder_ffn({**tree, "layers": {**tree["layers"], "mlp": mlp}},
                                         sub["neurons"])  # LoRA on gate/up/down, if frozen
    mlp = {k: ({**v, "kernel": sub["ffn"][k]["kernel"]} if k in _SWIGLU else v)
           for k, v in cut["layers"]["mlp"].items()}
    return {**cut, "layers": {**cut["layers"], "mlp": mlp}}

  def cut_shared(shared, sub):
    return decoder_sub_fm.cut_decoder_ffn(shared, sub["neurons"]) if sub else shared

  def plug_shared(full, shared, sub):
    return decoder_sub_fm.plug_decoder_ffn(full, shared, sub["neurons"]) if sub else shared

  def task(params, batch, rng):
    loss, aux = loss_fn(params, batch, rng)
    return loss, aux["accuracy"], None

  return ProxyModel(name="decoder", check=_check_decoder_roles, compress=compress,
                    with_sub=with_sub, cut_shared=cut_shared, plug_shared=plug_shared,
                    task=task, compressed_layers=lambda sub: (), forward=None)


def fedpft(forward: Forward | ProxyModel, roles: PyTree, params: PyTree, *,
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
           aggregation: chain_lib.ChainConfig | None = None,
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

  On a `DecoderLM` (issue 15) the same algorithm runs through `decoder_proxy`::

      loss_fn = lm_loss_fn(graphdef)            # or ModelBundle.loss(True)
      alg = fedpft(decoder_proxy(loss_fn), decoder_roles(params, trainable=("lora",)), params,
                   keep_neurons=2048)           # no alignment, retained_layers=() (see there)

  Args:
    forward: (params, batch, rng) -> (logits, intermediates) (`model_forward`) of a
      `TransformerModel`, i.e. ``encoder_proxy(forward, label_key)``; or a `ProxyModel`
      (`decoder_proxy`) for another model family.
    roles: LoRA (attention only) and head shared, everything else frozen (a decoder: LoRA
      shared on any target, everything else frozen).
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
    label_key, mask_key: batch keys of the labels (the encoder's) and the token mask.
    weighted: weight clients by their example counts (the paper) or equally (the code).
    aggregation: the server chain on the sub-FM's LoRA + head deltas
      (`fedjax_fm.chain.ChainConfig`); None: the finite filter and the weighted mean.
    execution: how clients run inside the program; `default_execution()` if None.

  Returns:
    An `Algorithm` whose server state holds the FM (with the aggregated LoRA and head) in
    ``params`` and a `ProxyState` in ``extra``. Round metrics: ``loss``, ``accuracy`` (on the
    sub-FM during local training), ``ffn_inactive_fraction`` / ``ffn_exact_zero_fraction``
    (compressed layers' activations), ``neuron_align`` (1 on alignment rounds),
    ``neuron_align_loss_start`` / ``_end``, ``layer_align_loss_start`` / ``_end`` (of init's
    layer-level alignment), ``num_nonfinite_clients``, ``examples``.

  Raises:
    ValueError: for inconsistent roles or hyperparameters, and for alignment on a model whose
      `ProxyModel` has no ``forward`` (the decoder).
  """
  execution = execution or default_execution()
  aggregation = aggregation or chain_lib.ChainConfig()
  server_chain = chain_lib.build_chain(aggregation, server_optimizer)
  if server_chain.has_client_state:
    raise ValueError("FedPFT keeps no chain state on its clients; use compression without "
                     "error feedback (int8, int4, or top_k with error_feedback=False)")
  if aggregation.clip_norm is not None and align_every:
    raise ValueError("user-level DP covers the LoRA and head updates only; neuron alignment "
                     "(align_every > 0) also uploads activity counts: set align_every=0")
  client_optimizer = client_optimizer or optax.adam(8e-4)
  align_optimizer = align_optimizer or default_align_optimizer()
  model = forward if isinstance(forward, ProxyModel) else encoder_proxy(forward, label_key)
  forward = model.forward
  model.check(params, roles, tuple(retained_layers))
  if keep_neurons is None and (layer_align_steps or align_every):
    raise ValueError("alignment needs a compressed sub-FM; set keep_neurons, or "
                     "layer_align_steps=0 and align_every=0 for the full-FM baseline")
  if forward is None and (layer_align_steps or align_every):
    raise ValueError(f"FedPFT's alignment is not supported on the {model.name} yet (it needs "
                     "per-layer hidden states); use layer_align_steps=0 and align_every=0")
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
                jax.eval_shape(lambda p: model.compress(p, keep_neurons, tuple(retained_layers)),
                               shapes))
  compressed = model.compressed_layers(sub_shapes)
  compress = jax.jit(lambda p: model.compress(p, keep_neurons, tuple(retained_layers)))
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
    per_example, correct, ffn_activations = model.task(params_k, batch, key)
    weight = jnp.where(live, mask, 0.0)
    count = jnp.sum(weight)
    loss_sum = jnp.sum(jnp.where(live, per_example * mask, 0.0))
    sums = {"loss_sum": loss_sum, "count": count,
            "accuracy_sum": jnp.sum(weight * correct)}
    if compressed:
      tokens = batch[mask_key].astype(jnp.float32) * live[:, None]
      acts = [ffn_activations[i].astype(jnp.float32) for i in compressed]
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
    state = server_chain.init(model.cut_shared(shared, sub))
    return ServerState(round=jnp.zeros((), jnp.int32), params=full, opt_state=state.optimizer,
                       extra=extra, chain=state.links)

  def init_clients(params: PyTree, num_clients: int) -> PyTree:
    return stacked_personal(params, roles, num_clients)

  def bytes_per_client(params: PyTree) -> tuple[int, int]:
    """LoRA + head both ways; alignment's sub-FFN refresh (down) and activity counts (up)
    amortised over `align_every` rounds."""
    shared = roles_lib.tree_bytes(jax.eval_shape(  # the sub-FM's LoRA + head
        lambda p, sub: model.cut_shared(roles_lib.select(p, roles, SHARED), sub), params,
        sub_shapes))
    up = server_chain.upload_bytes(jax.eval_shape(
        lambda p, sub: model.cut_shared(roles_lib.select(p, roles, SHARED), sub), params,
        sub_shapes), shared)
    if not align_every:
      return shared, up
    # Down: per compressed layer the updated neurons' fc_in column, fc_in bias and fc_out row
    # with their int32 indices, plus fc_out's bias and the LayerNorm (float32).
    hidden = sub_shapes[compressed[0]]["mlp"]["fc_out"]["bias"].shape[0]
    updated = num_neurons - int(round(align_retained_ratio * num_neurons))
    refresh = len(compressed) * 4 * (updated * (2 * hidden + 2) + 3 * hidden)
    counts = len(compressed) * num_neurons * 4 + 4  # float32 counts per neuron + token count
    return shared + refresh // align_every, up + counts // align_every

  def round_fn(server: ServerState, client_states: PyTree, cohort: Cohort, rng: jax.Array):
    full_shared = roles_lib.select(server.params, roles, SHARED)
    frozen = roles_lib.select(server.params, roles, FROZEN)
    sub_ffn = server.extra.sub_ffn
    frozen_sub = model.with_sub(frozen, sub_ffn)  # the proxy the clients train on
    shared = model.cut_shared(full_shared, sub_ffn)  # what they train (the FM's, encoder)
    local_rng, align_rng = jax.random.split(rng)
    keys = jax.random.split(local_rng, cohort.num_clients)

    def one_client(data_k, mask_k, key_k):
      trained, sums = client_update.train_steps(
          lambda t, b, m, k: objective(t, frozen_sub, b, m, k), client_optimizer, shared,
          data_k, mask_k, key_k, execution.scan_unroll)
      delta = jax.tree_util.tree_map(jnp.subtract, trained, shared)
      return delta, sums

    deltas, sums = execution.map(one_client)(cohort.data, cohort.mask, keys)
    deltas = execution.constrain(deltas)

    ok = aggregate.finite_clients((deltas, sums["loss_sum"]))
    weights = cohort.weights if weighted else (cohort.weights > 0).astype(cohort.weights.dtype)
    out = server_chain.apply(shared, deltas, weights, ok, (server.chain, server.opt_state),
                             jax.random.fold_in(align_rng, 1), round_num=server.round)
    # The LoRA plugs into the full FM.
    new_params = roles_lib.merge(model.plug_shared(full_shared, out.params, sub_ffn), frozen)

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
    metrics.update(out.metrics)

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

    server = server.replace(round=server.round + 1, params=new_params,
                            opt_state=out.state.optimizer, chain=out.state.links, extra=server.extra.replace(sub_ffn=sub_ffn, activity=activity))
    return server, client_states, metrics

  return Algorithm(init=init, init_clients=init_clients, round=round_fn,
                   bytes_per_client=bytes_per_client)
