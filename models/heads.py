"""Task heads on top of the encoder's last hidden state, and the losses that go with them.

Every head is called as ``head(hidden [B, T, D], mask [B, T] | None, rng=None)``; `mask` marks
real tokens (1) and padding (0). Its parameters live under ``head/`` in the model.

- `ClassificationHead`: pooled CLS token or masked mean of tokens -> class logits.
- `AnswerScoringHead`: ViLT's VQA classifier (Kim et al. 2021), multi-label logits over an answer
  set, trained with `soft_target_bce` on soft VQA scores (Antol et al. 2015).
- `DensePredictionHead`: per-patch tokens -> per-pixel outputs [B, H, W, C] (segmentation logits,
  depth, ...): each token predicts its p x p patch (SETR-naive style linear decoder).
- `ImageReconstructionHead`: the same decoder predicting the image itself (SimMIM / MAE's linear
  pixel decoder, Xie et al. 2022; He et al. 2022), with `pixel_mse`.
- `TokenPredictionHead`: BERT's masked-language-model head, per-position vocabulary logits.

`build_head` turns a config dict (``{"kind": "classification", "num_classes": 3}``) or a factory
into a head for a given encoder config.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_fm.models import activations
from fedjax_fm.models.cnn import dropout

POOLINGS = ("cls", "mean")


def pool(hidden: jax.Array, mask: jax.Array | None, pooling: str) -> jax.Array:
  """[B, T, D] -> [B, D]: the first (CLS) token, or the mean over real tokens.

  The mean is the attention-mask-weighted mean of sentence-transformers (Reimers & Gurevych
  2019); with no mask every token counts.
  """
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "mean":
    if mask is None:
      return jnp.mean(hidden, axis=1)
    w = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * w, axis=1)
    return (total / jnp.maximum(jnp.sum(w, axis=1), 1e-9)).astype(hidden.dtype)
  raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")


class ClassificationHead(nnx.Module):
  """Pooling (`cls` or masked `mean`), dropout, one linear layer (`classifier`) -> [B, classes]."""

  def __init__(self, hidden_size: int, num_classes: int, *, rngs: nnx.Rngs, pooling: str = "cls",
               dropout_rate: float = 0.0, dtype: Any = None, param_dtype: Any = jnp.float32):
    if pooling not in POOLINGS:
      raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
    self.classifier = nnx.Linear(hidden_size, num_classes, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.pooling = pooling
    self.dropout_rate = dropout_rate

  def __call__(self, hidden: jax.Array, mask: jax.Array | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    pooled = dropout(pool(hidden, mask, self.pooling), self.dropout_rate, rng)
    return self.classifier(pooled)


class AnswerScoringHead(nnx.Module):
  """ViLT's VQA head: pooled token -> Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, answers).

  Parameters `hidden`, `norm`, `scores`. Returns one logit per answer, [B, num_answers], each an
  independent sigmoid probability (VQA answers are soft multi-label targets).
  """

  def __init__(self, hidden_size: int, num_answers: int, *, rngs: nnx.Rngs,
               pooling: str = "cls", layer_norm_eps: float = 1e-5, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    if pooling not in POOLINGS:
      raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden = nnx.Linear(hidden_size, 2 * hidden_size,
                             kernel_init=nnx.initializers.normal(0.02), **kw)
    self.norm = nnx.LayerNorm(2 * hidden_size, epsilon=layer_norm_eps, use_fast_variance=False,
                              **kw)
    self.scores = nnx.Linear(2 * hidden_size, num_answers,
                             kernel_init=nnx.initializers.normal(0.02), **kw)
    self.pooling = pooling

  def __call__(self, hidden: jax.Array, mask: jax.Array | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    del rng
    x = self.hidden(pool(hidden, mask, self.pooling))
    return self.scores(activations.gelu_exact(self.norm(x)))


def soft_target_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example sigmoid BCE summed over answers, for soft VQA targets in [0, 1].

  Summing over answers equals ViLT's mean BCE times the number of answers.

  Returns:
    [B] losses.
  """
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets), -1)


def vqa_score(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """VQA accuracy: the soft target score of the top-scoring answer, per example ([B])."""
  top = jnp.argmax(logits, axis=-1)
  return jnp.take_along_axis(targets, top[:, None], axis=-1)[:, 0]


class DensePredictionHead(nnx.Module):
  """Patch tokens -> a p x p x C block of outputs each -> an image-shaped map [B, H, W, C].

  The patch tokens are the last (image_size / patch_size)^2 tokens of the sequence, which holds
  for ViT (CLS first) and ViLT (text, then CLS and patches). Parameter: `projection`.
  """

  def __init__(self, hidden_size: int, image_size: int, patch_size: int, out_channels: int, *,
               rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    self.grid = image_size // patch_size
    self.patch_size, self.out_channels = patch_size, out_channels
    self.projection = nnx.Linear(hidden_size, patch_size * patch_size * out_channels, dtype=dtype,
                                 param_dtype=param_dtype,
                                 kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  def __call__(self, hidden: jax.Array, mask: jax.Array | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    del mask, rng
    g, p, c = self.grid, self.patch_size, self.out_channels
    if hidden.shape[1] < g * g:
      raise ValueError(f"the sequence has {hidden.shape[1]} tokens but the head needs {g * g} "
                       "patch tokens; check image_size and patch_size")
    x = self.projection(hidden[:, -g * g:])  # [B, g*g, p*p*c]
    x = x.reshape(x.shape[0], g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(x.shape[0], g * p, g * p, c)


class ImageReconstructionHead(DensePredictionHead):
  """A `DensePredictionHead` whose output channels are the image's: predicts the pixels."""

  def __init__(self, hidden_size: int, image_size: int, patch_size: int, num_channels: int, *,
               rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
    super().__init__(hidden_size, image_size, patch_size, num_channels, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)


def pixel_mse(pred: jax.Array, target: jax.Array,
              pixel_weight: jax.Array | None = None) -> jax.Array:
  """Per-example mean squared error over pixels and channels, [B].

  Args:
    pred, target: [B, H, W, C].
    pixel_weight: optional [B, H, W] weights, e.g. 1 on masked patches only (SimMIM's loss).
  """
  sq = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  if pixel_weight is None:
    return jnp.mean(sq, axis=(1, 2))
  w = pixel_weight.astype(jnp.float32)
  return jnp.sum(sq * w, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1e-9)


class TokenPredictionHead(nnx.Module):
  """BERT's MLM head: Linear(D, D) -> activation -> LayerNorm -> Linear(D, vocab), per position.

  Parameters `transform`, `norm`, `decoder`; returns [B, T, vocab_size] logits.
  """

  def __init__(self, hidden_size: int, vocab_size: int, *, rngs: nnx.Rngs,
               activation: Callable[[jax.Array], jax.Array] = activations.gelu_exact,
               layer_norm_eps: float = 1e-12, dtype: Any = None, param_dtype: Any = jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=nnx.initializers.normal(0.02))
    self.transform = nnx.Linear(hidden_size, hidden_size, **kw)
    self.norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, use_fast_variance=False,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.decoder = nnx.Linear(hidden_size, vocab_size, **kw)
    self.activation = activation

  def __call__(self, hidden: jax.Array, mask: jax.Array | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    del mask, rng
    return self.decoder(self.norm(self.activation(self.transform(hidden))))


HEAD_KINDS = ("classification", "answer_scoring", "dense", "reconstruction", "token")


def build_head(spec: Mapping[str, Any] | Callable[..., nnx.Module], config: Any, *,
               rngs: nnx.Rngs) -> nnx.Module:
  """A head for an encoder with `config` (a `TransformerConfig`).

  Args:
    spec: either a factory ``spec(config, rngs=rngs) -> nnx.Module``, or a dict with ``kind`` (one
      of `HEAD_KINDS`) and that head's own arguments; sizes the encoder fixes (hidden size, image
      and patch size, channels, vocabulary) come from `config`:
      ``{"kind": "classification", "num_classes": 3, "pooling": "mean"}``,
      ``{"kind": "answer_scoring", "num_answers": 10}``,
      ``{"kind": "dense", "out_channels": 4}``, ``{"kind": "reconstruction"}``,
      ``{"kind": "token"}``.
    config: the encoder's `TransformerConfig`.
    rngs: initialisation keys.
  """
  if callable(spec) and not isinstance(spec, Mapping):
    return spec(config, rngs=rngs)
  if not isinstance(spec, Mapping) or "kind" not in spec:
    raise ValueError(f"head spec {spec!r} must be a factory or a dict with a 'kind' in "
                     f"{HEAD_KINDS}")
  args = dict(spec)
  kind = args.pop("kind")
  kw = dict(rngs=rngs, dtype=config.dtype, param_dtype=config.param_dtype)
  d = config.hidden_size
  if kind in ("dense", "reconstruction") and not config.image_size:
    raise ValueError(f"a {kind!r} head needs an image model; this encoder's modality is "
                     f"{config.modality!r}")
  if kind == "classification":
    return ClassificationHead(d, **args, **kw)
  if kind == "answer_scoring":
    return AnswerScoringHead(d, **args, **kw)
  if kind == "dense":
    return DensePredictionHead(d, config.image_size, config.patch_size, **args, **kw)
  if kind == "reconstruction":
    return ImageReconstructionHead(d, config.image_size, config.patch_size,
                                   config.num_channels, **args, **kw)
  if kind == "token":
    if not config.vocab_size:
      raise ValueError("a 'token' head needs a text model with a vocabulary")
    args.setdefault("activation", activations.activation(config.activation))
    return TokenPredictionHead(d, config.vocab_size, layer_norm_eps=config.layer_norm_eps,
                               **args, **kw)
  raise ValueError(f"unknown head kind {kind!r}; use one of {HEAD_KINDS}")
