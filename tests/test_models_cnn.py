"""The CPU-friendly layers compute the same function and gradient as the stock ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_fm.models import SimpleCNN, classification_loss, functional
from fedjax_fm.models.layers import canonical_conv, max_pool_2x2


@pytest.mark.parametrize("padding", ["VALID", "SAME", ((2, 0), (1, 1))])
def test_canonical_conv_value_and_gradient(padding):
  x = jax.random.normal(jax.random.key(0), (3, 9, 7, 2))
  w = jax.random.normal(jax.random.key(1), (3, 2, 2, 4))
  dn = ("NHWC", "HWIO", "NHWC")
  ref = lambda x, w: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                                                  dimension_numbers=dn)))
  got = lambda x, w: jnp.sum(jnp.sin(canonical_conv(x, w, (1, 1), padding)))
  np.testing.assert_allclose(got(x, w), ref(x, w), rtol=1e-5)
  for a, b in zip(jax.grad(got, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_max_pool_2x2_matches_nnx_max_pool_on_odd_sizes():
  y = jax.random.normal(jax.random.key(2), (2, 7, 6, 3))
  np.testing.assert_array_equal(max_pool_2x2(y), nnx.max_pool(y, (2, 2), strides=(2, 2)))


def test_simple_cnn_same_loss_and_gradient_either_way():
  batch = {"x": jax.random.normal(jax.random.key(3), (4, 12, 12, 3)),
           "y": jnp.array([0, 1, 2, 1])}
  grads = []
  for canonical in (False, True):
    graphdef, params = functional(SimpleCNN((12, 12, 3), 3, rngs=nnx.Rngs(0),
                                            canonical_conv=canonical))
    loss = lambda p: jnp.mean(classification_loss(graphdef)(p, batch, jax.random.key(4))[0])
    grads.append(jax.grad(loss)(params))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         *grads)
