"""A decoder-only causal language model: Llama 2/3/3.x, Mistral, Qwen2/2.5 and Qwen3.

One pre-norm decoder (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language
Models") configured per family:

- RMSNorm (Zhang & Sennrich 2019) before attention and MLP, and once at the end;
- grouped-query attention (Ainslie et al. 2023, "GQA") with rotary position embeddings (Su et
  al. 2021, "RoFormer"), optionally with Llama 3.1's frequency scaling (``rope_type: llama3``);
  Qwen2 adds q/k/v biases, Qwen3 an RMSNorm over each head of q and k (`DecoderConfig.qk_norm`),
  Mistral a sliding attention window;
- a SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"): down(silu(gate x) * up x);
- an untied ``lm_head`` or the embedding matrix reused (tied).

The layers are one module whose parameters carry a leading layer axis, run with `jax.lax.scan`,
so a 32-layer model compiles like a 1-layer one; each layer may be rematerialised (`REMAT_POLICIES`).

Parameter paths (`fedjax_fm.roles.leaf_path`), ``[L, ...]`` = stacked over layers:

    embed/embedding                                  [vocab, hidden]
    layers/input_norm/scale                          [L, hidden]
    layers/attention/{q,k,v,o}/kernel                [L, in, out]  ({q,k,v}/bias with biases)
    layers/attention/{q_norm,k_norm}/scale           [L, head_dim] (Qwen3)
    layers/post_attention_norm/scale                 [L, hidden]
    layers/mlp/{gate,up,down}/kernel                 [L, in, out]
    layers/{attention,mlp}/lora_<target>/{a,b}       LoRA (`decoder_lora`), float32
    final_norm/scale                                 [hidden]
    lm_head/kernel                                   [hidden, vocab] (untied only)

Example::

    model = DecoderLM(DecoderConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8),
                      rngs=nnx.Rngs(0))
    logits = model(input_ids, attention_mask)          # [B, T, vocab] float32
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm.models import activations
from fedjax_fm.models import adapters as adapters_lib
from fedjax_fm.models import decoder_lora

DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_INIT = nnx.initializers.normal(0.02)  # transformers' initializer_range


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling [rope_scaling / rope_parameters].

  Attributes:
    rope_type: ``"llama3"`` (Llama 3.1's band-wise scaling) or ``"linear"`` (positions / factor).
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: Llama 3.1's
      parameters (the last three unused by ``linear``).
  """
  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("llama3", "linear"):
      raise ValueError(f"rope_type {self.rope_type!r} is not supported; use 'default', "
                       "'linear' or 'llama3'")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a decoder LM (transformers' config.json names in brackets).

  Attributes:
    vocab_size, hidden_size, intermediate_size: [same names].
    num_layers, num_heads, num_kv_heads: [num_hidden_layers, num_attention_heads,
      num_key_value_heads]; num_heads must be a multiple of num_kv_heads (GQA).
    head_dim: [head_dim]; hidden_size // num_heads when a config omits it.
    rope_theta: RoPE base [rope_theta].
    rope_scaling: None (plain RoPE) or a `RopeScaling` (a dict of its fields is accepted).
    rms_norm_eps: [rms_norm_eps].
    tie_word_embeddings: the output projection is the embedding matrix [tie_word_embeddings].
    attention_bias: q/k/v projections have biases (Qwen2; Llama's [attention_bias]).
    attention_out_bias: the o projection has a bias (Llama's [attention_bias]).
    qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3).
    activation: the MLP gate's nonlinearity [hidden_act].
    sliding_window: attend only to the last `sliding_window` slots (Mistral); None for all.
    dtype: compute dtype of activations and matmuls; softmax, norms and logits stay float32.
    param_dtype: storage dtype of the backbone (jnp.bfloat16 for a bf16 frozen backbone; LoRA
      keeps its own float32).
    remat: rematerialisation of each layer in the backward pass, a key of `REMAT_POLICIES`.
    scan_layers: run the stacked layers in a rolled `lax.scan` (compile time flat in depth);
      False unrolls the same scan (same parameters, a program per layer).
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  attention_out_bias: bool = False
  qk_norm: bool = False
  activation: str = "silu"
  sliding_window: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"
  scan_layers: bool = True

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    activations.activation(self.activation)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "DecoderConfig":
    """The config of a transformers config.json (parsed) of a llama, mistral, qwen2 or qwen3
    checkpoint. Fields the file omits take the defaults of transformers' config class for its
    model_type; `overrides` (e.g. ``dtype=jnp.bfloat16, remat="full"``) replace fields.

    Reads the rope parameters both from transformers 5's ``rope_parameters`` and from the
    ``rope_theta`` / ``rope_scaling`` of older files (the real Llama 3.x and Qwen2.5 folders).

    Raises:
      ValueError: for an unsupported model_type or an unsupported feature (MLP biases, per-layer
        sliding windows, rope types other than default/linear/llama3).
    """
    model_type = hf.get("model_type")
    if model_type not in DECODER_MODEL_TYPES:
      raise ValueError(f"model_type {model_type!r} is not a supported decoder; use one of "
                       f"{DECODER_MODEL_TYPES}")
    d = {**_HF_DEFAULTS["common"], **_HF_DEFAULTS[model_type], **hf}
    if d.get("mlp_bias"):
      raise ValueError("mlp_bias=true is not supported (no Llama/Qwen release uses it)")
    if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
      raise ValueError("use_sliding_window=true (per-layer windows) is not supported")
    rope = dict(d.get("rope_parameters") or {})
    legacy = dict(d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope.update(legacy)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None
    if rope_type != "default":
      known = {f.name for f in dataclasses.fields(RopeScaling)}
      scaling = RopeScaling(rope_type=rope_type, **{k: v for k, v in rope.items() if k in known})
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    bias = bool(d.get("attention_bias", False))
    fields = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=kv_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=d["rms_norm_eps"],
        tie_word_embeddings=bool(d["tie_word_embeddings"]),
        attention_bias=model_type == "qwen2" or bias,
        attention_out_bias=model_type != "qwen2" and bias,
        qk_norm=model_type == "qwen3", activation=d["hidden_act"],
        sliding_window=d.get("sliding_window") if model_type == "mistral" else None)
    fields.update(overrides)
    return cls(**fields)


# transformers' config-class defaults, for fields a config.json may omit.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "common": dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
                   num_hidden_layers=32, num_attention_heads=32, hidden_size=4096),
    "llama": dict(vocab_size=32000, intermediate_size=11008),
    "mistral": dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016),
    "qwen3": dict(vocab_size=151936, intermediate_size=22016, head_dim=128),
}


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings and masks
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
  """The RoPE inverse frequencies [head_dim // 2] (float32), scaled as the config says.

  llama3 (Llama 3.1 report, Dubey et al. 2024): wavelengths longer than
  original_max / low_freq_factor are divided by `factor`, shorter than original_max /
  high_freq_factor kept, and the band between interpolated smoothly.
  """
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  inv = inv.astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv
  if s.rope_type == "linear":
    return (inv / s.factor).astype(np.float32)
  old = s.original_max_position_embeddings
  low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x [B, T, heads, head_dim] by its positions [B, T] (transformers' half-split
  layout: dimension i pairs with i + head_dim / 2). Angles in float32."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, hd/2]
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Positions [B, T] counting real tokens only (0 at each row's first real token), as
  transformers' generate derives them for left-padded prompts; padding gets 0."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_bias(query_slots: jax.Array, key_valid: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
  """Additive attention bias [B, T, S]: query at slot q sees key slot s iff s <= q, key s is a
  real token (`key_valid` [B, S]) and, with a window, q - s < window.

  Masked entries get float32's most negative finite value, so a query with no visible key
  (a padding position) stays finite instead of NaN.
  """
  key_slots = jnp.arange(key_valid.shape[-1])
  visible = key_slots[None, :] <= query_slots[:, None]
  if sliding_window is not None:
    visible &= query_slots[:, None] - key_slots[None, :] < sliding_window
  visible = visible[None] & (key_valid[:, None, :] > 0)
  return jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, statistics in float32, result in x's dtype (transformers' order:
  normalise in float32, cast back, then scale)."""

  def __init__(self, features: int, eps: float, *, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def _lora(lora: decoder_lora.DecoderLoRAConfig | None, target: str, n_in: int, n_out: int,
          config: DecoderConfig, rngs: nnx.Rngs) -> adapters_lib.LoRA | None:
  if lora is None or target not in lora.targets:
    return None
  return adapters_lib.LoRA(n_in, n_out, lora.rank, lora.alpha, rngs=rngs, dtype=config.dtype,
                           param_dtype=lora.param_dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, an optional KV cache and LoRA on q/k/v/o."""

  def __init__(self, config: DecoderConfig, lora: decoder_lora.DecoderLoRAConfig | None, *,
               rngs: nnx.Rngs):
    d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, kernel_init=_INIT, rngs=rngs)
    self.q = nnx.Linear(d, h * hd, use_bias=config.attention_bias, **kw)
    self.k = nnx.Linear(d, kv * hd, use_bias=config.attention_bias, **kw)
    self.v = nnx.Linear(d, kv * hd, use_bias=config.attention_bias, **kw)
    self.o = nnx.Linear(h * hd, d, use_bias=config.attention_out_bias, **kw)
    if config.qk_norm:
      self.q_norm = RMSNorm(hd, config.rms_norm_eps, param_dtype=config.param_dtype)
      self.k_norm = RMSNorm(hd, config.rms_norm_eps, param_dtype=config.param_dtype)
    else:
      self.q_norm = self.k_norm = None
    dims = {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d)}
    self.lora_q, self.lora_k, self.lora_v, self.lora_o = (
        _lora(lora, t, *dims[t], config, rngs) for t in decoder_lora.ATTENTION_TARGETS)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd

  def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: np.ndarray,
               bias: jax.Array, cache: tuple[jax.Array, jax.Array] | None = None,
               cache_index: jax.Array | int = 0):
    """x [B, T, D] -> ([B, T, D], updated cache or None).

    Args:
      positions: RoPE positions [B, T].
      bias: additive mask [B, T, S] (`attention_bias`); S = T without a cache, else the
        cache length.
      cache: (keys, values) [B, S, kv_heads, head_dim]; this call's keys and values are written
        at slots cache_index .. cache_index + T - 1 and attention reads the whole cache.
    """
    b, t, _ = x.shape
    lin = adapters_lib.with_lora
    q = lin(self.q(x), self.lora_q, x).reshape(b, t, self.num_heads, self.head_dim)
    k = lin(self.k(x), self.lora_k, x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = lin(self.v(x), self.lora_v, x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      cache = (jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start),
               jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start))
      k, v = cache[0].astype(q.dtype), cache[1].astype(q.dtype)
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim) + bias[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, -1)
    return lin(self.o(out), self.lora_o, out), cache


class MLP(nnx.Module):
  """SwiGLU: down(act(gate x) * up x), with LoRA on gate/up/down."""

  def __init__(self, config: DecoderConfig, lora: decoder_lora.DecoderLoRAConfig | None, *,
               rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype,
              kernel_init=_INIT, rngs=rngs)
    self.gate, self.up, self.down = nnx.Linear(d, f, **kw), nnx.Linear(d, f, **kw), \
        nnx.Linear(f, d, **kw)
    self.lora_gate = _lora(lora, "gate", d, f, config, rngs)
    self.lora_up = _lora(lora, "up", d, f, config, rngs)
    self.lora_down = _lora(lora, "down", f, d, config, rngs)
    self.activation = activations.activation(config.activation)

  def __call__(self, x: jax.Array) -> jax.Array:
    lin = adapters_lib.with_lora
    h = self.activation(lin(self.gate(x), self.lora_gate, x)) * lin(self.up(x), self.lora_up, x)
    return lin(self.down(h), self.lora_down, h)


class DecoderLayer(nnx.Module):
  """x + attention(norm(x)), then + mlp(norm(.)) (pre-norm residual blocks)."""

  def __init__(self, config: DecoderConfig, lora: decoder_lora.DecoderLoRAConfig | None, *,
               rngs: nnx.Rngs):
    norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps,
                           param_dtype=config.param_dtype)
    self.input_norm = norm()
    self.attention = Attention(config, lora, rngs=rngs)
    self.post_attention_norm = norm()
    self.mlp = MLP(config, lora, rngs=rngs)

  def __call__(self, x, positions, inv_freq, bias, cache=None, cache_index=0):
    h, cache = self.attention(self.input_norm(x), positions, inv_freq, bias, cache, cache_index)
    x = x + h
    return x + self.mlp(self.post_attention_norm(x)), cache


class DecoderLM(nnx.Module):
  """A decoder-only causal LM (`DecoderConfig` says which family).

  Args:
    config: the architecture.
    rngs: initialisation keys.
    lora: LoRA branches (`decoder_lora.DecoderLoRAConfig` or a dict of its fields, e.g.
      ``{"rank": 8, "alpha": 16.0, "targets": ("q", "v")}``); zero at initialisation.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs,
               lora: decoder_lora.DecoderLoRAConfig | Mapping[str, Any] | None = None):
    self.config = config
    lora = decoder_lora.decoder_lora_config(lora)
    self.lora = lora
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                           param_dtype=config.param_dtype, embedding_init=_INIT, rngs=rngs)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
      return DecoderLayer(config, lora, rngs=rngs)

    self.layers = stacked(rngs)
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                              param_dtype=config.param_dtype)
    self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, dtype=config.dtype,
        param_dtype=config.param_dtype, kernel_init=_INIT, rngs=rngs)

  def decode(self, input_ids: jax.Array, positions: jax.Array, key_valid: jax.Array,
             cache: tuple[jax.Array, jax.Array] | None = None,
             cache_index: jax.Array | int = 0):
    """The final (normed) hidden states [B, T, D] and the updated KV cache.

    Args:
      input_ids: [B, T] tokens at cache slots cache_index .. cache_index + T - 1 (slots are
        0 .. T - 1 without a cache).
      positions: their RoPE positions [B, T].
      key_valid: [B, S], 1 for slots holding a real token (S = T without a cache).
      cache: (keys, values), each [L, B, S, kv_heads, head_dim] (`init_cache`), or None.
      cache_index: the first slot written.

    Returns:
      (hidden [B, T, D], cache or None).
    """
    config = self.config
    x = self.embed(input_ids)
    query_slots = cache_index + jnp.arange(input_ids.shape[1])
    bias = attention_bias(query_slots, key_valid, config.sliding_window)
    inv_freq = rope_inv_freq(config)
    graphdef, state = nnx.split(self.layers)

    def layer(x, xs):
      layer_state, layer_cache = xs
      return nnx.merge(graphdef, layer_state)(x, positions, inv_freq, bias, layer_cache,
                                              cache_index)

    policy = REMAT_POLICIES[config.remat]
    if config.remat != "none":
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    x, cache = jax.lax.scan(layer, x, (state, cache),
                            unroll=1 if config.scan_layers else config.num_layers)
    return self.final_norm(x), cache

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                    positions: jax.Array | None = None) -> jax.Array:
    """The final normed hidden states [B, T, hidden] (what `logits` projects), e.g. for a
    chunked cross-entropy (`decoder_loss.causal_lm_loss`). Arguments as in `__call__`."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    return self.decode(input_ids, positions, attention_mask)[0]

  def head(self) -> tuple[jax.Array, str]:
    """The output projection as stored, with its einsum axes: (lm_head's kernel, "dv") or,
    tied, (the embedding [vocab, hidden], "vd"). A matmul against it in this form needs no
    transposed copy of a vocabulary-sized matrix, which XLA:CPU otherwise writes every step."""
    if self.lm_head is None:
      return self.embed.embedding[...], "vd"
    return self.lm_head.kernel[...], "dv"

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., vocab] (matmul in the compute dtype)."""
    w, axes = self.head()
    return jnp.einsum(f"...d,{axes}->...v", hidden.astype(self.config.dtype),
                      w.astype(self.config.dtype), preferred_element_type=jnp.float32)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, vocab] (float32).

    Args:
      input_ids: [B, T] token ids.
      attention_mask: [B, T], 1 for real tokens and 0 for padding (left or right); all ones if
        None. Attention is causal and never reads padding.
      positions: [B, T] RoPE positions; by default real tokens count 0, 1, ... from each row's
        first real token (`positions_from_mask`), which for left padding is what transformers'
        generate uses (its plain forward uses 0 .. T - 1 unless given position_ids).
    """
    return self.logits(self.hidden_states(input_ids, attention_mask, positions=positions))


def init_cache(config: DecoderConfig, batch: int, length: int,
               dtype: Any = None) -> tuple[jax.Array, jax.Array]:
  """An empty KV cache: (keys, values), each [layers, batch, length, kv_heads, head_dim]."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  dtype = dtype or config.dtype
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
