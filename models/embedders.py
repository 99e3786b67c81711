"""Input embedders for the transformer encoder: text, image patches, and both in one sequence.

- `TextEmbeddings`: word + position + token-type embeddings, then LayerNorm (BERT, Devlin et al.
  2019); RoBERTa's position ids start after the padding index and skip padding (Liu et al. 2019).
- `PatchEmbeddings`: non-overlapping p x p patches projected by one matrix (a stride-p convolution
  written as a matmul), a learned CLS token and learned positions (ViT, Dosovitskiy et al. 2021).
- `VisionTextEmbeddings`: the single-stream vision-language input of ViLT (Kim et al. 2021):
  text embeddings followed by image patch embeddings, each plus a modality-type embedding, one
  sequence for one encoder.
- `ImageTokenEmbeddings`: the image half of that input kept apart from a text model's own
  embeddings, so a pretrained text BERT (MiniLM) can take images ViLT-style with its text
  embeddings untouched: CLS + patches, a modality embedding on both halves, one sequence.

Images are NHWC floats (the layout of our data). Hugging Face `pixel_values` are NCHW: transpose
them with ``x.transpose(0, 2, 3, 1)`` first.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models.cnn import dropout

_EMBED_INIT = nnx.initializers.normal(0.02)  # BERT's initializer_range


def roberta_position_ids(input_ids: jax.Array, padding_idx: int) -> jax.Array:
  """Position ids that count only non-padding tokens and start at padding_idx + 1.

  Padding tokens get `padding_idx` itself (fairseq's `make_positions`, used by RoBERTa), so the
  same sentence gets the same positions wherever the padding is.
  """
  real = (input_ids != padding_idx).astype(jnp.int32)
  return jnp.cumsum(real, axis=-1) * real + padding_idx


class TextEmbeddings(nnx.Module):
  """word + position + token type, LayerNorm, dropout; parameters `word`, `position`,
  `token_type`, `norm`.

  Args:
    vocab_size, hidden_size, max_positions, type_vocab_size: table sizes.
    layer_norm_eps: epsilon of the LayerNorm.
    padding_idx: if set, RoBERTa-style position ids (`roberta_position_ids`); else 0..T-1.
    dropout_rate: dropout on the output when an rng is given.
  """

  def __init__(self, vocab_size: int, hidden_size: int, max_positions: int,
               type_vocab_size: int, *, layer_norm_eps: float, rngs: nnx.Rngs,
               padding_idx: int | None = None, dropout_rate: float = 0.0, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, embedding_init=_EMBED_INIT, rngs=rngs)
    self.word = nnx.Embed(vocab_size, hidden_size, **kw)
    self.position = nnx.Embed(max_positions, hidden_size, **kw)
    self.token_type = nnx.Embed(type_vocab_size, hidden_size, **kw)
    self.norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, use_fast_variance=False,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.padding_idx = padding_idx
    self.max_positions = max_positions
    self.dropout_rate = dropout_rate

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
               position_ids: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length] int ids, got shape {input_ids.shape}")
    length = input_ids.shape[1]
    if position_ids is None:
      if self.padding_idx is not None:
        position_ids = roberta_position_ids(input_ids, self.padding_idx)
      else:
        position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
    # RoBERTa's ids run up to padding_idx + length, so it needs padding_idx + 1 extra rows.
    needed = length if self.padding_idx is None else length + self.padding_idx + 1
    if needed > self.max_positions:
      raise ValueError(f"sequence length {length} needs {needed} position embeddings but the "
                       f"model has {self.max_positions}; truncate the inputs")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
    return dropout(self.norm(x), self.dropout_rate, rng)


class PatchEmbeddings(nnx.Module):
  """p x p patches -> one matmul (`projection`), CLS token (`cls`) prepended, learned positions
  (`position`, [num_patches + 1, hidden]) added; the output is [B, 1 + num_patches, hidden].

  The projection kernel is [p * p * channels, hidden] with the patch flattened in (row, column,
  channel) order, which is a stride-p convolution's HWIO kernel reshaped.
  """

  def __init__(self, image_size: int, patch_size: int, num_channels: int, hidden_size: int, *,
               rngs: nnx.Rngs, dropout_rate: float = 0.0, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
    self.grid = image_size // patch_size
    self.num_patches = self.grid * self.grid
    self.projection = nnx.Linear(patch_size * patch_size * num_channels, hidden_size, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    init = nnx.initializers.truncated_normal(0.02)
    self.cls = nnx.Param(init(rngs.params(), (hidden_size,), param_dtype))
    self.position = nnx.Param(init(rngs.params(), (self.num_patches + 1, hidden_size),
                                   param_dtype))
    self.dropout_rate = dropout_rate
    self.dtype = dtype

  def patches(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, num_patches, p * p * C], patches in row-major grid order."""
    b, h, w, c = images.shape
    if (h, w, c) != (self.image_size, self.image_size, self.num_channels):
      raise ValueError(f"images must be NHWC [B, {self.image_size}, {self.image_size}, "
                       f"{self.num_channels}], got {images.shape}; transpose NCHW pixel_values "
                       "with x.transpose(0, 2, 3, 1) or resize to the model's image_size")
    p, g = self.patch_size, self.grid
    x = images.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, p * p * c)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    x = self.projection(self.patches(images))
    cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position[...].astype(x.dtype)
    return dropout(x, self.dropout_rate, rng)


class VisionTextEmbeddings(nnx.Module):
  """ViLT's single-stream input: [text tokens; CLS + image patches], plus modality embeddings.

  Parameters: `text` (TextEmbeddings), `image` (PatchEmbeddings), `modality` (type 0 = text,
  1 = image). Images must have the model's `image_size` (every patch is real; ViLT's pixel masks
  and resolution-dependent position interpolation are not needed at a fixed size).
  """

  def __init__(self, text: TextEmbeddings, image: PatchEmbeddings, hidden_size: int,
               modality_vocab_size: int, *, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    self.text = text
    self.image = image
    self.modality = nnx.Embed(modality_vocab_size, hidden_size, dtype=dtype,
                              param_dtype=param_dtype, embedding_init=_EMBED_INIT, rngs=rngs)

  def __call__(self, input_ids: jax.Array, images: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
               image_token_type: int = 1,
               rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns (embeddings [B, T + 1 + P, hidden], mask [B, T + 1 + P]); image tokens are real."""
    r_text, r_image = (None, None) if rng is None else jax.random.split(rng)
    text = self.text(input_ids, token_type_ids, position_ids, r_text)
    image = self.image(images, r_image)
    text = text + self.modality(jnp.zeros(text.shape[:2], jnp.int32))
    image = image + self.modality(jnp.full(image.shape[:2], image_token_type, jnp.int32))
    mask = jnp.concatenate([attention_mask.astype(jnp.int32),
                            jnp.ones(image.shape[:2], jnp.int32)], axis=1)
    return jnp.concatenate([text, image], axis=1), mask


class ImageTokenEmbeddings(nnx.Module):
  """Image tokens for a text encoder: [text tokens; CLS + image patches] in ViLT's layout.

  A text checkpoint (BERT, RoBERTa, MiniLM) has no image parameters, so these are all new and
  must be trained: `patches` (a `PatchEmbeddings`: `projection`, `cls`, `position`), `modality`
  (type 0 = text, 1 = image, as ViLT) and `norm`, a LayerNorm on the image tokens. The norm
  gives them the scale of BERT's LayerNorm-ed text embeddings, which is what the post-LN encoder
  was trained on; a bare 0.02-scale projection would enter it as near-zero vectors. The
  modality table starts at zero so the text tokens enter exactly as in the text checkpoint.

  The text embeddings stay the model's own (`TextEmbeddings`, checkpoint paths unchanged); this
  module only joins them with the image tokens (`join`).
  """

  def __init__(self, image_size: int, patch_size: int, num_channels: int, hidden_size: int, *,
               layer_norm_eps: float, rngs: nnx.Rngs, dropout_rate: float = 0.0,
               dtype: Any = None, param_dtype: Any = jnp.float32):
    self.patches = PatchEmbeddings(image_size, patch_size, num_channels, hidden_size, rngs=rngs,
                                   dtype=dtype, param_dtype=param_dtype)
    self.modality = nnx.Embed(2, hidden_size, dtype=dtype, param_dtype=param_dtype,
                              embedding_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, use_fast_variance=False,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout_rate = dropout_rate

  def join(self, text: jax.Array, images: jax.Array, attention_mask: jax.Array,
           rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """text [B, T, D] (embedded), images [B, H, W, C] -> (embeddings [B, T + 1 + P, D],
    mask [B, T + 1 + P]); image tokens are all real."""
    image = self.patches(images)
    image = image + self.modality(jnp.ones(image.shape[:2], jnp.int32))
    image = dropout(self.norm(image), self.dropout_rate, rng)
    text = text + self.modality(jnp.zeros(text.shape[:2], jnp.int32)).astype(text.dtype)
    mask = jnp.concatenate([attention_mask.astype(jnp.int32),
                            jnp.ones(image.shape[:2], jnp.int32)], axis=1)
    return jnp.concatenate([text, image.astype(text.dtype)], axis=1), mask
