"""Small vision models in Flax NNX: the pfl-research CIFAR-10 CNN and an MLP.

`SimpleCNN` is the model of pfl-research's CIFAR-10 cross-device benchmark (Granqvist et al.
2024, "pfl-research: simulation framework for accelerating research in private federated
learning"): conv3x3(32) - relu - conv3x3(64) - relu - maxpool2 - dropout(0.25) - dense(128) -
relu - dropout(0.5) - dense(classes), valid padding. On 32x32x3 inputs it costs about 33.7
MFLOP forward per image.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models import layers


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `rng` is None (evaluation) or rate is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class SimpleCNN(nnx.Module):
  """Two 3x3 convolutions, max-pool, one hidden dense layer; NHWC inputs.

  `canonical_conv` (default: on when JAX runs on the CPU) swaps in `layers.canonical_conv`,
  whose gradient XLA:CPU compiles well; the parameters and the function are the same.
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *, rngs: nnx.Rngs,
               channels: Sequence[int] = (32, 64), hidden: int = 128,
               dropout_rates: Sequence[float] = (0.25, 0.5),
               canonical_conv: bool | None = None):
    h, w, c = input_shape
    self.conv1 = nnx.Conv(c, channels[0], (3, 3), padding="VALID", rngs=rngs)
    self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), padding="VALID", rngs=rngs)
    flat = ((h - 4) // 2) * ((w - 4) // 2) * channels[1]
    self.dense1 = nnx.Linear(flat, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)
    self.dropout_rates = tuple(dropout_rates)
    if canonical_conv is None:
      canonical_conv = jax.default_backend() == "cpu"
    if canonical_conv:  # same function and gradient; a VJP XLA:CPU runs fast inside loops
      self.conv1.conv_general_dilated = layers.canonical_conv
      self.conv2.conv_general_dilated = layers.canonical_conv

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = layers.max_pool_2x2(x)
    x = dropout(x, self.dropout_rates[0], r1)
    x = x.reshape(x.shape[:-3] + (-1,))
    x = jax.nn.relu(self.dense1(x))
    x = dropout(x, self.dropout_rates[1], r2)
    return self.head(x)


class MLP(nnx.Module):
  """Flatten, then dense-relu layers, then a linear head."""

  def __init__(self, input_dim: int, num_classes: int, *, rngs: nnx.Rngs,
               hidden: Sequence[int] = (64,)):
    dims = [input_dim, *hidden]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    del rng
    x = x.reshape(x.shape[:1] + (-1,))
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.head(x)
