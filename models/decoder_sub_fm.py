"""The sub-FM of a decoder LM: its SwiGLU FFNs keep only their most salient neurons (FedPFT's
proxy, Peng et al. IJCAI 2024, docs/algorithms.md 3.2, for `DecoderLM`).

A SwiGLU neuron i is column i of the gate and up kernels [D, F] and row i of the down kernel
[F, D]; its saliency is ``||[W_gate[:, i], W_up[:, i], W_down[i, :]]||_2`` (the encoder's
``||[W_in[i, :], W_out[:, i]]||`` of `sub_fm.neuron_saliency` with the gate's weights added).
The decoder's layers are one stacked array per kind (`decoder.DecoderLM`: ``[L, ...]``), so
every layer keeps the same number of neurons, each layer its own top ones: the sub-FM stays
stacked and its scan compiles like the FM's. Retaining whole layers (the encoder's
`retained_layers`) would break the stacking and is not offered. LoRA factors on gate/up/down
are cut to the same neurons (``lora_gate/b``, ``lora_up/b`` columns; ``lora_down/a`` rows);
`plug_decoder_ffn` writes LoRA trained on the sub-FM back into the FM's at the kept neurons.

The result is the FM's parameter tree with narrower MLP arrays; it merges with the FM's own
graph definition (the MLP reads its widths from its kernels), so `decoder_loss.lm_loss_fn`
trains it unchanged.

Example::

    sub = compress_decoder_ffn(params, keep_neurons=2048)
    loss_fn = lm_loss_fn(graphdef)             # same graphdef, narrower arrays
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def swiglu_saliency(gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """Per-layer neuron saliency [L, F] from stacked kernels gate, up [L, D, F] and down [L, F, D]."""
  sq = lambda x: jnp.square(x.astype(jnp.float32))
  return jnp.sqrt(sq(gate).sum(-2) + sq(up).sum(-2) + sq(down).sum(-1))


def top_neurons_per_layer(saliency: jax.Array, k: int) -> jax.Array:
  """[L, k] indices of each layer's k most salient neurons, in ascending order."""
  if not 1 <= k <= saliency.shape[-1]:
    raise ValueError(f"keep {k} neurons of {saliency.shape[-1]}: choose 1 <= keep_neurons <= "
                     "the FFN width (intermediate_size)")
  return jnp.sort(jax.lax.top_k(saliency, k)[1], axis=-1)


# The MLP leaves a neuron cut narrows: (component, parameter) -> the neuron axis (counted with L).
NEURON_AXES = {("gate", "kernel"): 2, ("up", "kernel"): 2, ("down", "kernel"): 1,
               ("lora_gate", "b"): 2, ("lora_up", "b"): 2, ("lora_down", "a"): 1}


def _take(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
  """Per-layer gather: x [L, ...] along `axis` (counted with L) by idx [L, k]."""
  shape = [1] * x.ndim
  shape[0], shape[axis] = idx.shape
  return jnp.take_along_axis(x, idx.reshape(shape), axis=axis)


def _put(x: jax.Array, idx: jax.Array, values: jax.Array, axis: int) -> jax.Array:
  """Per-layer scatter, `_take`'s inverse: x with ``_take(x, idx, axis)`` replaced by values."""
  x, values = jnp.moveaxis(x, axis, 1), jnp.moveaxis(values, axis, 1)
  out = jax.vmap(lambda xl, il, vl: xl.at[il].set(vl.astype(xl.dtype)))(x, idx, values)
  return jnp.moveaxis(out, 1, axis)


def salient_neurons(params: PyTree, keep_neurons: int) -> jax.Array:
  """[L, k] int32: each layer's `keep_neurons` most salient SwiGLU neurons, ascending."""
  mlp = params["layers"]["mlp"]
  return top_neurons_per_layer(swiglu_saliency(mlp["gate"]["kernel"], mlp["up"]["kernel"],
                                               mlp["down"]["kernel"]),
                               keep_neurons).astype(jnp.int32)


def cut_decoder_ffn(params: PyTree, neurons: jax.Array) -> PyTree:
  """`params` with every MLP leaf of `NEURON_AXES` cut to `neurons` ([L, k], per layer).

  Leaves that are None (trees from `roles.select`) or absent pass through, so the same call cuts
  a whole model, its frozen part or its LoRA alone.
  """
  mlp = dict(params["layers"]["mlp"])
  for (name, leaf), axis in NEURON_AXES.items():
    if name in mlp and mlp[name] is not None and mlp[name].get(leaf) is not None:
      mlp[name] = {**mlp[name], leaf: _take(mlp[name][leaf], neurons, axis)}
  return {**params, "layers": {**params["layers"], "mlp": mlp}}


def plug_decoder_ffn(params: PyTree, sub: PyTree, neurons: jax.Array) -> PyTree:
  """`cut_decoder_ffn`'s inverse on the kept neurons: `params` (the FM's tree, e.g. its LoRA)
  with the kept neurons' slices of every `NEURON_AXES` leaf replaced by the sub-FM's (`sub`,
  cut to `neurons`), the other neurons' slices kept from `params`; every other leaf is
  `sub`'s. So the LoRA a client trained on the sub-FM plugs back into the FM."""
  mlp, sub_mlp = dict(params["layers"]["mlp"]), sub["layers"]["mlp"]
  plugged = {}
  for (name, leaf), axis in NEURON_AXES.items():
    if name in mlp and mlp[name] is not None and mlp[name].get(leaf) is not None:
      plugged.setdefault(name, {})[leaf] = _put(mlp[name][leaf], neurons, sub_mlp[name][leaf],
                                                axis)
  new_mlp = {name: ({**sub_mlp[name], **plugged[name]} if name in plugged else sub_mlp[name])
             for name in sub_mlp}
  return {**sub, "layers": {**sub["layers"], "mlp": new_mlp}}


def compress_decoder_ffn(params: PyTree, keep_neurons: int) -> PyTree:
  """The sub-FM's parameters: every layer's MLP cut to its `keep_neurons` most salient neurons.

  Args:
    params: a `DecoderLM`'s parameter tree (``nnx.to_pure_dict``), LoRA or not.
    keep_neurons: k, neurons kept in every layer (static).

  Returns:
    The same tree with ``layers/mlp/{gate,up}/kernel`` [L, D, k], ``down/kernel`` [L, k, D] and
    any ``lora_gate/b``, ``lora_up/b`` [L, r, k], ``lora_down/a`` [L, k, r]; all else shared
    with `params`. Pure and jit-able.
  """
  return cut_decoder_ffn(params, salient_neurons(params, keep_neurons))


def ffn_fraction(params: PyTree, sub: PyTree) -> float:
  """The sub-FM's parameter count over the FM's."""
  count = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))
  return count(sub) / count(params)
