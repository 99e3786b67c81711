"""The sub-FM of a decoder LM: its SwiGLU FFNs keep only their most salient neurons (FedPFT's
proxy, Peng et al. IJCAI 2024, docs/algorithms.md 3.2, for `DecoderLM`).

A SwiGLU neuron i is column i of the gate and up kernels [D, F] and row i of the down kernel
[F, D]; its saliency is ``||[W_gate[:, i], W_up[:, i], W_down[i, :]]||_2`` (the encoder's
``||[W_in[i, :], W_out[:, i]]||`` of `sub_fm.neuron_saliency` with the gate's weights added).
The decoder's layers are one stacked array per kind (`decoder.DecoderLM`: ``[L, ...]``), so
every layer keeps the same number of neurons, each layer its own top ones: the sub-FM stays
stacked and its scan compiles like the FM's. Retaining whole layers (the encoder's
`retained_layers`) would break the stacking and is not offered. LoRA factors on gate/up/down
are cut to the same neurons (``lora_gate/b``, ``lora_up/b`` columns; ``lora_down/a`` rows).

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


def _take(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
  """Per-layer gather: x [L, ...] along `axis` (counted with L) by idx [L, k]."""
  shape = [1] * x.ndim
  shape[0], shape[axis] = idx.shape
  return jnp.take_along_axis(x, idx.reshape(shape), axis=axis)


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
  mlp = params["layers"]["mlp"]
  idx = top_neurons_per_layer(swiglu_saliency(mlp["gate"]["kernel"], mlp["up"]["kernel"],
                                              mlp["down"]["kernel"]), keep_neurons)
  new = dict(mlp)
  new["gate"] = {**mlp["gate"], "kernel": _take(mlp["gate"]["kernel"], idx, 2)}
  new["up"] = {**mlp["up"], "kernel": _take(mlp["up"]["kernel"], idx, 2)}
  new["down"] = {**mlp["down"], "kernel": _take(mlp["down"]["kernel"], idx, 1)}
  for name in ("lora_gate", "lora_up"):
    if name in mlp:
      new[name] = {**mlp[name], "b": _take(mlp[name]["b"], idx, 2)}
  if "lora_down" in mlp:
    new["lora_down"] = {**mlp["lora_down"], "a": _take(mlp["lora_down"]["a"], idx, 1)}
  return {**params, "layers": {**params["layers"], "mlp": new}}


def ffn_fraction(params: PyTree, sub: PyTree) -> float:
  """The sub-FM's parameter count over the FM's."""
  count = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))
  return count(sub) / count(params)
