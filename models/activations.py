"""Activation functions by their Hugging Face config names (`hidden_act`).

BERT, RoBERTa, MiniLM, ViT and ViLT use ``gelu``, the exact erf form; other checkpoints of the
same families use the tanh approximations (``gelu_new`` and friends), ``quick_gelu`` (CLIP) or
``relu``/``silu``. Each entry matches transformers' `ACT2FN` entry of the same name.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


def gelu_exact(x: jax.Array) -> jax.Array:
  """x * Phi(x) with the erf (Hendrycks & Gimpel 2016); what BERT and ViT were trained with."""
  return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
  """The tanh approximation of GELU (GPT-2's ``gelu_new``)."""
  return jax.nn.gelu(x, approximate=True)


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x) (CLIP's approximation)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Activation] = {
    "gelu": gelu_exact,
    "gelu_python": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def activation(name: str) -> Activation:
  """The activation called `name` in Hugging Face configs.

  Raises:
    ValueError: for a name not in `ACTIVATIONS`.
  """
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]
