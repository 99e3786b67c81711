"""The sub-FM: a transformer whose FFN blocks keep only their most salient neurons (FedPFT's proxy).

Peng et al. "FedPFT: Federated Proxy Fine-Tuning of Foundation Models." IJCAI 2024
(arXiv:2404.11536); docs/algorithms.md section 3.2. Layer-wise compression by neuron saliency:
every layer not retained keeps the `keep_neurons` FFN neurons with the largest
||[W_in[i, :], W_out[:, i]]||_2, in their original order (`compress_ffn`); attention,
embeddings and LayerNorms are the FM's. The sub-FM's parameters are the FM's tree with
narrower FFN arrays (`with_sub_ffn`), so they run through the FM's own graph definition
(`model_forward`, which also returns the intermediates that alignment and activity counting
read); `size_report` counts what the sub-FM saves. Pure functions over a `TransformerModel`'s
parameter tree; the federated algorithm is `fedjax_fm.algorithms.fedpft`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm.roles import FROZEN, SHARED

PyTree = Any
# forward(params, batch, rng) -> (logits [B, C], intermediates) with intermediates as
# `TransformerModel(..., return_intermediates=True)` returns them; rng None = no dropout.
Forward = Callable[[PyTree, Mapping[str, jax.Array], jax.Array | None],
                   tuple[jax.Array, Mapping[str, Sequence[jax.Array]]]]


def layer_indices(params: PyTree) -> tuple[int, ...]:
  """The encoder layer indices of a `TransformerModel`'s parameter tree."""
  return tuple(sorted(params["encoder"]["layers"]))


def neuron_saliency(fc_in_kernel: jax.Array, fc_out_kernel: jax.Array) -> jax.Array:
  """s_i = ||[W_in[i, :], W_out[:, i]]||_2 for every FFN neuron i (docs/algorithms.md 3.2).

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


def ffn_block(params: PyTree, i: int) -> dict:
  """Layer i's FFN block as the sub-FM stores it: {"mlp": {fc_in, fc_out}, "mlp_norm"}."""
  layer = params["encoder"]["layers"][i]
  return {"mlp": {"fc_in": dict(layer["mlp"]["fc_in"]), "fc_out": dict(layer["mlp"]["fc_out"])},
          "mlp_norm": dict(layer["mlp_norm"])}


def compress_ffn(params: PyTree, keep_neurons: int,
                 retained_layers: Sequence[int] = ()) -> dict[int, dict]:
  """The sub-FM's FFN blocks: layer-wise FFN compression by neuron saliency
  (docs/algorithms.md 3.2).

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
    block = ffn_block(params, i)
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
