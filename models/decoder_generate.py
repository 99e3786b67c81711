"""Greedy and sampled generation from a `DecoderLM` with a preallocated KV cache.

One jitted program per (prompt shape, max_new_tokens, sampling settings): a prefill call writes
the prompt's keys and values into a cache of length T + max_new_tokens and gives the first new
token; a `lax.scan` then feeds each new token back one at a time, attending over the cache
(Pope et al. 2023, "Efficiently Scaling Transformer Inference", for the cache layout). Prompts
are LEFT-padded, as for transformers' generate: every row's next token goes to the same cache
slot, while each row's RoPE position counts its own real tokens.

Example::

    new_tokens = generate(model, input_ids, attention_mask, max_new_tokens=32)      # greedy
    sampled = generate(model, input_ids, attention_mask, 32, temperature=0.8, top_k=50,
                       rng=jax.random.key(0), eos_token_id=2, pad_token_id=0)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models.decoder import DecoderLM, init_cache, positions_from_mask


def _next_token(logits: jax.Array, rng: jax.Array, temperature: float,
                top_k: int | None) -> jax.Array:
  """argmax (temperature 0) or a sample from softmax(logits / temperature), top-k truncated."""
  if temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=(
    "max_new_tokens", "temperature", "top_k", "eos_token_id", "pad_token_id"))
def _generate(graphdef, state, input_ids, attention_mask, rng, *, max_new_tokens, temperature,
              top_k, eos_token_id, pad_token_id):
  model = nnx.merge(graphdef, state)
  b, t = input_ids.shape
  length = t + max_new_tokens
  cache = init_cache(model.config, b, length)
  key_valid = jnp.zeros((b, length), jnp.int32).at[:, :t].set(attention_mask.astype(jnp.int32))
  positions = positions_from_mask(attention_mask)
  hidden, cache = model.decode(input_ids, positions, key_valid, cache, 0)
  rngs = jax.random.split(rng, max_new_tokens)
  token = _next_token(model.logits(hidden[:, -1]), rngs[0], temperature, top_k)
  done = jnp.zeros((b,), bool)

  def emit(token, done):
    out = token if eos_token_id is None else jnp.where(done, pad_token_id, token)
    return out, done if eos_token_id is None else done | (token == eos_token_id)

  first, done = emit(token, done)

  def step(carry, xs):
    token, position, key_valid, cache, done = carry
    slot, step_rng = xs
    key_valid = key_valid.at[:, slot].set(1)
    hidden, cache = model.decode(token[:, None], position[:, None], key_valid, cache, slot)
    token = _next_token(model.logits(hidden[:, -1]), step_rng, temperature, top_k)
    out, done = emit(token, done)
    return (token, position + 1, key_valid, cache, done), out

  carry = (token, positions[:, -1] + 1, key_valid, cache, done)
  slots = t + jnp.arange(max_new_tokens - 1)
  _, rest = jax.lax.scan(step, carry, (slots, rngs[1:]))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: DecoderLM, input_ids: jax.Array, attention_mask: jax.Array | None,
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             rng: jax.Array | None = None, eos_token_id: int | None = None,
             pad_token_id: int = 0) -> jax.Array:
  """The next `max_new_tokens` tokens after each left-padded prompt.

  Args:
    model: a `DecoderLM`.
    input_ids: [B, T] prompts, LEFT-padded (every row's last token is real).
    attention_mask: [B, T], 1 for real tokens; all ones if None.
    max_new_tokens: number of tokens generated per row.
    temperature: 0 for greedy decoding; otherwise the softmax temperature of sampling.
    top_k: sample only among the k most likely tokens (None: all).
    rng: sampling key (needed when temperature > 0).
    eos_token_id: after a row emits it, the row's further tokens are `pad_token_id`.
    pad_token_id: see `eos_token_id`.

  Returns:
    [B, max_new_tokens] int32 new tokens (the prompt not included).

  Raises:
    ValueError: for temperature > 0 without `rng`, or max_new_tokens < 1.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(input_ids), jnp.asarray(attention_mask), rng,
                   max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)
