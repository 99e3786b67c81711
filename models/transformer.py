"""The transformer encoder of BERT, RoBERTa, MiniLM, ViT and ViLT, with adapters, LoRA and heads.

One encoder core (Vaswani et al. 2017) in two layer orders:

- post-LN (BERT, Devlin et al. 2019; RoBERTa; MiniLM): x = LN(x + Attn(x)); x = LN(x + FFN(x));
- pre-LN (ViT, Dosovitskiy et al. 2021; ViLT, Kim et al. 2021): x = x + Attn(LN(x));
  x = x + FFN(LN(x)); one final LN.

`TransformerModel` = embeddings (text, image patches or both; `fedjax_fm.models.embedders`) +
`Encoder` + an optional head (`fedjax_fm.models.heads`). Adapters and LoRA (`adapters.py`) are
built into the layers when asked for; fresh ones leave the function unchanged.

Parameter paths (as `fedjax_fm.roles.leaf_path` renders them) are regular, so roles can be
assigned from them (`transformer_roles`, or regexes with `fedjax_fm.roles.assign_roles`):

    embeddings/...                                   backbone (text: word, position, token_type,
                                                     norm; image: projection, cls, position;
                                                     ViLT: text/..., image/..., modality)
    image_embeddings/{patches,modality,norm}/...     image_embeddings (a text checkpoint given
                                                     images: new, trained by default)
    encoder/layers/<i>/attention/{query,key,value,out}/{kernel,bias}    backbone
    encoder/layers/<i>/{attention_norm,mlp_norm}/{scale,bias}           backbone
    encoder/layers/<i>/mlp/{fc_in,fc_out}/{kernel,bias}                 backbone
    encoder/final_norm/{scale,bias}                                     backbone (pre-LN only)
    encoder/layers/<i>/attention/lora_{q,k,v,o}/{a,b}                   LoRA
    encoder/layers/<i>/mlp/lora_{ffn_in,ffn_out}/{a,b}                  LoRA
    encoder/layers/<i>/adapters/<name>/{down,up}/{kernel,bias}          adapter <name>
    head/...                                                            head

Dropout is on when the call gets an `rng` (training) and off without one (evaluation).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm.models import activations
from fedjax_fm.models import adapters as adapters_lib
from fedjax_fm.models import embedders
from fedjax_fm.models import heads as heads_lib
from fedjax_fm.models.cnn import dropout

PyTree = Any
MODALITIES = ("text", "image", "vision_text")
_KERNEL_INIT = nnx.initializers.normal(0.02)  # BERT/ViT initializer_range


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of a transformer encoder and its embeddings (HF names in brackets).

  Attributes:
    hidden_size, num_layers, num_heads, intermediate_size: [hidden_size, num_hidden_layers,
      num_attention_heads, intermediate_size].
    modality: ``"text"`` (BERT, RoBERTa), ``"image"`` (ViT) or ``"vision_text"`` (ViLT).
    activation: FFN nonlinearity by HF name [hidden_act]; ``"gelu"`` is the exact erf GELU.
    layer_norm_eps: [layer_norm_eps].
    pre_norm: True for pre-LN layers with a final LayerNorm (ViT, ViLT); False for post-LN (BERT).
    hidden_dropout, attention_dropout: [hidden_dropout_prob, attention_probs_dropout_prob].
    qkv_bias: whether query/key/value have biases [qkv_bias].
    vocab_size, max_position_embeddings, type_vocab_size: text embedding tables.
    padding_idx: RoBERTa's pad id: positions start at padding_idx + 1 and skip padding. None for
      BERT and ViLT (positions 0..T-1).
    image_size, patch_size, num_channels: square images, square patches.
    modality_type_vocab_size: ViLT's modality embeddings (0 = text, 1 = image).
    separate_image_embeddings: ``"vision_text"`` only. False: ViLT's layout, all embeddings
      under ``embeddings/`` (text/, image/, modality), part of the backbone. True: a text model
      extended to images (`pretrained.from_pretrained(..., image=...)`): the text embeddings
      keep a text checkpoint's paths (``embeddings/word``, ...) and the image tokens come from
      `embedders.ImageTokenEmbeddings` at ``image_embeddings/``, their own roles component
      (new parameters that must be trained). Same token layout either way.
    dtype: compute dtype of activations and matmuls (e.g. jnp.bfloat16); softmax and LayerNorm
      statistics stay in float32.
    param_dtype: storage dtype of the parameters.
  """
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  modality: str = "text"
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  pre_norm: bool = False
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  qkv_bias: bool = True
  vocab_size: int = 0
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  padding_idx: int | None = None
  image_size: int = 0
  patch_size: int = 0
  num_channels: int = 3
  modality_type_vocab_size: int = 2
  separate_image_embeddings: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.modality not in MODALITIES:
      raise ValueError(f"unknown modality {self.modality!r}; use one of {MODALITIES}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}")
    if self.modality != "image" and self.vocab_size < 1:
      raise ValueError(f"a {self.modality!r} model needs vocab_size >= 1")
    if self.modality != "text":
      if self.image_size < 1 or self.patch_size < 1 or self.image_size % self.patch_size:
        raise ValueError(f"a {self.modality!r} model needs image_size ({self.image_size}) "
                         f"divisible by patch_size ({self.patch_size})")
    if self.separate_image_embeddings and self.modality != "vision_text":
      raise ValueError("separate_image_embeddings needs modality='vision_text', got "
                       f"{self.modality!r}")
    activations.activation(self.activation)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2 if self.patch_size else 0


def padding_bias(mask: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """A padding mask [B, T] (1 = real token) -> additive attention bias [B, 1, 1, T].

  Masked keys get the most negative finite value, so even a row with no real key stays finite
  (uniform attention) instead of turning into NaN.
  """
  return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


def _split(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
  return [None] * n if rng is None else list(jax.random.split(rng, n))


class SelfAttention(nnx.Module):
  """Multi-head self-attention with `query`, `key`, `value`, `out` projections and optional
  LoRA branches `lora_q`, `lora_k`, `lora_v`, `lora_o`."""

  def __init__(self, config: TransformerConfig, lora: adapters_lib.LoRAConfig | None, *,
               rngs: nnx.Rngs):
    d = config.hidden_size
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    proj = lambda bias: nnx.Linear(d, d, use_bias=bias, kernel_init=_KERNEL_INIT, **kw)
    self.query, self.key, self.value = (proj(config.qkv_bias) for _ in range(3))
    self.out = proj(True)
    self.lora_q, self.lora_k, self.lora_v, self.lora_o = (
        adapters_lib.maybe_lora(lora, t, d, d, **kw) for t in ("q", "k", "v", "o"))
    self.num_heads = config.num_heads
    self.dropout_rate = config.attention_dropout

  def __call__(self, x: jax.Array, bias: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q = heads(adapters_lib.with_lora(self.query(x), self.lora_q, x))
    k = heads(adapters_lib.with_lora(self.key(x), self.lora_k, x))
    v = heads(adapters_lib.with_lora(self.value(x), self.lora_v, x))
    q = q / jnp.asarray(math.sqrt(d // self.num_heads), q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    # Softmax in float32 whatever the compute dtype: bf16 logits lose too much in the exp-sum.
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias.astype(jnp.float32), axis=-1)
    probs = dropout(probs.astype(v.dtype), self.dropout_rate, rng)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return adapters_lib.with_lora(self.out(context), self.lora_o, context)


class FeedForward(nnx.Module):
  """fc_out(act(fc_in(x))), with optional LoRA branches `lora_ffn_in`, `lora_ffn_out`."""

  def __init__(self, config: TransformerConfig, lora: adapters_lib.LoRAConfig | None, *,
               rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.fc_in = nnx.Linear(d, f, kernel_init=_KERNEL_INIT, **kw)
    self.fc_out = nnx.Linear(f, d, kernel_init=_KERNEL_INIT, **kw)
    self.lora_ffn_in = adapters_lib.maybe_lora(lora, "ffn_in", d, f, **kw)
    self.lora_ffn_out = adapters_lib.maybe_lora(lora, "ffn_out", f, d, **kw)
    self.activation = activations.activation(config.activation)

  def __call__(self, x: jax.Array, return_activations: bool = False):
    """fc_out(act(fc_in(x))); with `return_activations`, also the activations act(fc_in(x))
    [..., intermediate] (FedPFT's per-neuron activity statistics)."""
    h = self.activation(adapters_lib.with_lora(self.fc_in(x), self.lora_ffn_in, x))
    out = adapters_lib.with_lora(self.fc_out(h), self.lora_ffn_out, h)
    return (out, h) if return_activations else out


class EncoderLayer(nnx.Module):
  """One encoder layer: attention and FFN blocks with residuals, post-LN or pre-LN.

  Adapters (if any) act on the FFN block's output before it joins the residual stream (Houlsby
  et al. 2019), mixed by the call's `adapter_weights` (`adapters.mix_adapters`).
  """

  def __init__(self, config: TransformerConfig, *,
               adapters: adapters_lib.AdapterConfig | None = None,
               lora: adapters_lib.LoRAConfig | None = None, rngs: nnx.Rngs):
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.attention = SelfAttention(config, lora, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                        use_fast_variance=False, **kw)
    self.mlp = FeedForward(config, lora, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                  use_fast_variance=False, **kw)
    if adapters is None:
      self.adapters = None
    else:
      act = activations.activation(adapters.activation)
      self.adapters = nnx.Dict({
          name: adapters_lib.BottleneckAdapter(config.hidden_size, adapters.bottleneck, act, **kw)
          for name in adapters.names})
    self.pre_norm = config.pre_norm
    self.dropout_rate = config.hidden_dropout

  def __call__(self, x: jax.Array, bias: jax.Array, rng: jax.Array | None = None,
               adapter_weights: Mapping[str, Any] | None = None,
               return_activations: bool = False):
    """The layer's output [B, T, D]; with `return_activations`, (output, FFN activations)."""
    r_probs, r_attn, r_mlp = _split(rng, 3)
    acts = []

    def ffn_block(h):
      h, a = self.mlp(h, return_activations=True)
      acts.append(a)
      h = dropout(h, self.dropout_rate, r_mlp)
      if self.adapters is not None:
        h = adapters_lib.mix_adapters(self.adapters, h, adapter_weights)
      return h

    if self.pre_norm:
      x = x + dropout(self.attention(self.attention_norm(x), bias, r_probs), self.dropout_rate,
                      r_attn)
      x = x + ffn_block(self.mlp_norm(x))
    else:
      x = self.attention_norm(x + dropout(self.attention(x, bias, r_probs), self.dropout_rate,
                                          r_attn))
      x = self.mlp_norm(x + ffn_block(x))
    return (x, acts[0]) if return_activations else x


class Encoder(nnx.Module):
  """A stack of `EncoderLayer`s (`layers`), plus a final LayerNorm (`final_norm`) if pre-LN."""

  def __init__(self, config: TransformerConfig, *,
               adapters: adapters_lib.AdapterConfig | None = None,
               lora: adapters_lib.LoRAConfig | None = None, rngs: nnx.Rngs):
    self.layers = nnx.List([EncoderLayer(config, adapters=adapters, lora=lora, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = (nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                     use_fast_variance=False, dtype=config.dtype,
                                     param_dtype=config.param_dtype, rngs=rngs)
                       if config.pre_norm else None)
    self.adapter_names = tuple(adapters.names) if adapters else ()

  def __call__(self, x: jax.Array, mask: jax.Array, rng: jax.Array | None = None,
               adapter_weights: Mapping[str, Any] | None = None,
               return_intermediates: bool = False):
    """x [B, T, D], mask [B, T] (1 = real token) -> hidden states [B, T, D].

    With `return_intermediates`: (hidden states, {"hidden_states": every layer's output,
    "ffn_activations": every layer's FFN activations [B, T, intermediate]}), tuples over layers
    (layer-wise distillation and neuron statistics, `fedjax_fm.algorithms.fedpft`).
    """
    if adapter_weights is not None:
      if not self.adapter_names:
        raise ValueError("adapter_weights were given but the model has no adapters; build it "
                         "with adapters=AdapterConfig(...)")
      adapters_lib.resolve_adapter_weights(self.adapter_names, adapter_weights)
    bias = padding_bias(mask)
    hidden, acts = [], []
    for i, layer in enumerate(self.layers):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x, a = layer(x, bias, layer_rng, adapter_weights, return_activations=True)
      hidden.append(x)
      acts.append(a)
    x = x if self.final_norm is None else self.final_norm(x)
    if return_intermediates:
      return x, {"hidden_states": tuple(hidden), "ffn_activations": tuple(acts)}
    return x


class TransformerModel(nnx.Module):
  """Embeddings + encoder (+ head): BERT / RoBERTa / MiniLM / ViT / ViLT and variants.

  Example::

      config = TransformerConfig(hidden_size=32, num_layers=2, num_heads=4,
                                 intermediate_size=64, vocab_size=100)
      model = TransformerModel(config, rngs=nnx.Rngs(0),
                               adapters=AdapterConfig(names=("personal", "shared", "frozen")),
                               head={"kind": "classification", "num_classes": 3})
      logits = model(ids, mask, adapter_weights={"personal": 0.5, "shared": 0.5})

  Args:
    config: the architecture.
    rngs: initialisation keys.
    adapters: adapters after every FFN block (`AdapterConfig` or a dict of its fields).
    lora: LoRA branches (`LoRAConfig` or a dict of its fields).
    head: a head spec for `heads.build_head` (dict or factory); None returns hidden states.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs,
               adapters: adapters_lib.AdapterConfig | Mapping[str, Any] | None = None,
               lora: adapters_lib.LoRAConfig | Mapping[str, Any] | None = None,
               head: Any = None):
    self.config = config
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    text = image = None
    if config.modality != "image":
      text = embedders.TextEmbeddings(
          config.vocab_size, config.hidden_size, config.max_position_embeddings,
          config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
          padding_idx=config.padding_idx, dropout_rate=config.hidden_dropout, **kw)
    if config.separate_image_embeddings:
      # A text checkpoint's layout plus new image tokens at image_embeddings/.
      self.embeddings = text
      self.image_embeddings = embedders.ImageTokenEmbeddings(
          config.image_size, config.patch_size, config.num_channels, config.hidden_size,
          layer_norm_eps=config.layer_norm_eps, dropout_rate=config.hidden_dropout, **kw)
    else:
      if config.modality != "text":
        image = embedders.PatchEmbeddings(config.image_size, config.patch_size,
                                          config.num_channels, config.hidden_size,
                                          dropout_rate=config.hidden_dropout, **kw)
      if config.modality == "vision_text":
        self.embeddings = embedders.VisionTextEmbeddings(text, image, config.hidden_size,
                                                         config.modality_type_vocab_size, **kw)
      else:
        self.embeddings = text if text is not None else image
    self.encoder = Encoder(config, adapters=adapters_lib.adapter_config(adapters),
                           lora=adapters_lib.lora_config(lora), rngs=rngs)
    self.head = None if head is None else heads_lib.build_head(head, config, rngs=rngs)

  def features(self, input_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None,
               pixel_values: jax.Array | None = None, *,
               position_ids: jax.Array | None = None, rng: jax.Array | None = None,
               adapter_weights: Mapping[str, Any] | None = None,
               return_intermediates: bool = False) -> tuple[jax.Array, ...]:
    """The last hidden state [B, T, D] and the token mask [B, T] it was computed with (and the
    encoder's intermediates with `return_intermediates`, see `Encoder.__call__`)."""
    modality = self.config.modality
    if modality != "image" and input_ids is None:
      raise ValueError(f"a {modality!r} model needs input_ids")
    if modality != "text" and pixel_values is None:
      raise ValueError(f"a {modality!r} model needs pixel_values (NHWC images)")
    if modality == "image" and input_ids is not None:
      raise ValueError("an 'image' model takes pixel_values only; input_ids were given")
    if modality == "text" and pixel_values is not None:
      raise ValueError("a 'text' model takes no pixel_values")
    r_embed, r_encoder = _split(rng, 2)
    if modality == "image":
      x = self.embeddings(pixel_values, r_embed)
      mask = jnp.ones(x.shape[:2], jnp.int32)
    else:
      if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
      if modality == "text":
        x = self.embeddings(input_ids, token_type_ids, position_ids, r_embed)
        mask = attention_mask
      elif self.config.separate_image_embeddings:
        r_text, r_image = _split(r_embed, 2)
        text = self.embeddings(input_ids, token_type_ids, position_ids, r_text)
        x, mask = self.image_embeddings.join(text, pixel_values, attention_mask, r_image)
      else:
        x, mask = self.embeddings(input_ids, pixel_values, attention_mask, token_type_ids,
                                  position_ids, rng=r_embed)
    if return_intermediates:
      hidden, intermediates = self.encoder(x, mask, r_encoder, adapter_weights,
                                           return_intermediates=True)
      return hidden, mask, intermediates
    return self.encoder(x, mask, r_encoder, adapter_weights), mask

  def __call__(self, input_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None,
               pixel_values: jax.Array | None = None, *,
               position_ids: jax.Array | None = None, rng: jax.Array | None = None,
               adapter_weights: Mapping[str, Any] | None = None,
               return_intermediates: bool = False):
    """The head's output, or the last hidden state [B, T, D] if the model has no head.

    Args:
      input_ids: [B, T] token ids (text and vision-text models).
      attention_mask: [B, T], 1 for real tokens, 0 for padding; all ones if None.
      token_type_ids: [B, T] segment ids; zeros if None.
      pixel_values: [B, H, W, C] NHWC images (image and vision-text models).
      position_ids: [B, T] to override the default positions.
      rng: dropout key; None (evaluation) turns dropout off.
      adapter_weights: adapter name -> mixing weight for this call (`adapters.mix_adapters`);
        None mixes uniformly.
      return_intermediates: also return the encoder's per-layer hidden states and FFN
        activations: (output, intermediates), see `Encoder.__call__`.
    """
    r_features, r_head = _split(rng, 2)
    hidden, mask, *intermediates = self.features(
        input_ids, attention_mask, token_type_ids, pixel_values, position_ids=position_ids,
        rng=r_features, adapter_weights=adapter_weights,
        return_intermediates=return_intermediates)
    out = hidden if self.head is None else self.head(hidden, mask, rng=r_head)
    return (out, intermediates[0]) if return_intermediates else out


# ----------------------------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------------------------

# Matches every backbone leaf path, for `fedjax_fm.roles.assign_roles(params, frozen=...)`.
BACKBONE_PATTERN = r"^(embeddings|encoder)/(?!.*(/adapters/|/lora_))"
_COMPONENT_NAME = re.compile(r"^(backbone|head|lora|image_embeddings|adapters(/[^/]+)?)$")


def parameter_component(path: str) -> str:
  """What a parameter path belongs to: ``backbone``, ``head``, ``lora``, ``adapters/<name>`` or
  ``image_embeddings`` (the new image tokens of a text model given images; ViLT's own image
  embeddings are pretrained and stay ``backbone``)."""
  parts = path.split("/")
  if parts[0] == "head":
    return "head"
  if parts[0] == "image_embeddings":
    return "image_embeddings"
  if "adapters" in parts[:-1]:
    return "adapters/" + parts[parts.index("adapters") + 1]
  if any(p.startswith("lora_") for p in parts):
    return "lora"
  return "backbone"


def _selects(name: str, component: str) -> bool:
  return name == component or (name == "adapters" and component.startswith("adapters/"))


def transformer_roles(params: PyTree, *, trainable: Sequence[str] | None = None,
                      personal: Sequence[str] = ()) -> PyTree:
  """The role pytree (`fedjax_fm.roles`) of a `TransformerModel`'s parameters.

  The pretrained backbone is frozen; the trainable components are shared (trained, averaged)
  unless listed in `personal` (trained, never leave the client). Components are named
  ``backbone``, ``head``, ``lora``, ``adapters`` (all adapters), ``adapters/<name>`` and
  ``image_embeddings`` (a text checkpoint's new image tokens, `ImageTokenEmbeddings`).

  Example (FedDAT: personal and shared adapters trained, the frozen copy a fixed teacher)::

      roles = transformer_roles(params, trainable=("adapters/personal", "adapters/shared",
                                                   "head"),
                                personal=("adapters/personal",))

  Args:
    params: the pure parameter dict (`fedjax_fm.models.functional(model)[1]`).
    trainable: components that are trained; None means ("adapters", "lora", "head",
      "image_embeddings"), whichever the model has. ``backbone`` trains the whole backbone (full
      fine-tuning). An explicit list must name ``image_embeddings`` to train a text model's new
      image tokens; otherwise they stay frozen at their random initialisation.
    personal: components that are trained and stay personal (implicitly trainable).

  Returns:
    A pytree of role strings with the structure of `params`.

  Raises:
    ValueError: for a malformed component name, or one (given explicitly) that matches no
      parameter.
  """
  explicit = list(personal) + (list(trainable) if trainable is not None else [])
  for name in explicit:
    if not _COMPONENT_NAME.match(name):
      raise ValueError(f"component {name!r} is not one of backbone, head, lora, "
                       "image_embeddings, adapters, adapters/<name>")
  if trainable is None:
    trainable = ("adapters", "lora", "head", "image_embeddings")
  return roles_lib.component_roles(params, parameter_component, _selects, trainable=trainable,
                                   personal=personal, check=explicit)
