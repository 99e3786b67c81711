"""Layers whose gradients XLA:CPU compiles well, with the same math as the stock ones.

Measured on W1 (BENCHMARKS.md): inside a loop body (`lax.scan`, `lax.map`) XLA:CPU runs the
convolutions that JAX's transpose rules emit (non-NHWC/HWIO layouts) as a naive loop nest,
about 25x slower, because its layout canonicalisation only rewrites the entry computation; and
`max_pool`'s gradient lowers to a slow select-and-scatter. `canonical_conv` gives a VJP built
from NHWC x HWIO -> NHWC convolutions only, and `max_pool_2x2` is a reshape-max whose gradient
is an elementwise mask. Both compute the same function and gradient as the stock layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, pads):
  return jax.lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _canonical_conv(x, w, pads):
  return _conv(x, w, pads)


def _canonical_conv_fwd(x, w, pads):
  return _conv(x, w, pads), (x, w)


def _canonical_conv_bwd(pads, res, dy):
  x, w = res
  kh, kw = w.shape[:2]
  (pt, pb), (pl, pr) = pads
  # dx: full correlation of dy with the spatially flipped kernel, in/out channels swapped.
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = _conv(dy, w_t, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
  # dw: x's channels play the batch and its batch the contracted feature:
  # [Ci, H, W, N] * [Ho, Wo, N, Co] -> [Ci, kh, kw, Co].
  x_t = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))).transpose(3, 1, 2, 0)
  dw = _conv(x_t, dy.transpose(1, 2, 0, 3), ((0, 0), (0, 0))).transpose(1, 2, 0, 3)
  return dx, dw


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def canonical_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                   precision=None, preferred_element_type=None, **kwargs):
  """Drop-in `lax.conv_general_dilated` whose VJP uses only NHWC x HWIO -> NHWC convolutions.

  Handles stride 1, no dilation, no groups, 2-D NHWC; anything else goes to
  `lax.conv_general_dilated` unchanged.
  """
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or _NHWC)
  simple = (lhs.ndim == 4 and tuple(window_strides) == (1, 1)
            and all(d == 1 for d in (lhs_dilation or ())) and feature_group_count == 1
            and all(d == 1 for d in (rhs_dilation or ())) and batch_group_count == 1
            and dn == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
            and not kwargs.get("out_sharding"))
  if not simple:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type, **kwargs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  return _canonical_conv(lhs, rhs, tuple((int(a), int(b)) for a, b in padding))


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2, stride-2, VALID max-pool of NHWC (any leading axes) as a reshape-max."""
  h, w, c = x.shape[-3:]
  x = x[..., : h // 2 * 2, : w // 2 * 2, :]
  return x.reshape(x.shape[:-3] + (h // 2, 2, w // 2, 2, c)).max(axis=(-4, -2))
