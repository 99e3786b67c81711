"""Losses that turn an NNX model into the engine's pure `loss_fn(params, batch, rng)`.

The engine only sees pure pytrees: `functional(model)` splits the module once into a graph
definition and a dict of parameters, and the loss merges them back inside the traced function.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import optax
from flax import nnx

PyTree = Any


def functional(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree]:
  """(graphdef, params as a plain nested dict of arrays)."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def classification_loss(graphdef: nnx.GraphDef, input_keys: str | Sequence[str] = "x",
                        label_key: str = "y", train: bool = True):
  """Softmax cross-entropy with an `accuracy` metric; dropout on when `train` is True.

  Args:
    graphdef: the model's graph definition (`functional`).
    input_keys: the batch keys passed positionally to the model, e.g. "x" for an image model or
      ("input_ids", "attention_mask", "token_type_ids") for a text transformer.
    label_key: the batch key of the integer labels.
    train: dropout on (the round's key is passed as `rng=`) or off.

  Returns:
    loss_fn(params, batch, rng) -> (per-example loss [B], {"accuracy": [B]}).
  """
  keys = (input_keys,) if isinstance(input_keys, str) else tuple(input_keys)

  def loss_fn(params: PyTree, batch, rng):
    model = nnx.merge(graphdef, params)
    logits = model(*(batch[k] for k in keys), rng=rng if train else None)
    labels = batch[label_key]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return loss, {"accuracy": accuracy}

  return loss_fn
