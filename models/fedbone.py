"""FedBone's client models for the federation suite: embedder, task adaptation module, head.

Chen et al. "FedBone: Towards Large-Scale Federated Multi-Task Learning." arXiv:2306.17465
(2023); docs/algorithms.md section 4. A client k holds its task-specific client model: an embedder
E_k (image patches with `ImageTokens`, or a text model's token embeddings with `TextTokens`)
that feeds the server's general model, and on the general model's features a task adaptation
module A_k and a task head H_k with the task loss (`ClientModel`). The algorithm sees these
modules only through `fedjax_fm.algorithms.fedbone.client_task_group`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_fm.models import adapters as adapters_lib
from fedjax_fm.models import embedders as embedders_lib
from fedjax_fm.models import heads as heads_lib

CLIENT_TASKS = ("classification", "segmentation", "regression")


class ImageTokens(nnx.Module):
  """Images -> CLS + patch tokens (`embedders.PatchEmbeddings`) and a LayerNorm, which gives
  them the scale of a BERT encoder's LayerNorm-ed input (as `embedders.ImageTokenEmbeddings`
  does); every token is real."""

  def __init__(self, image_size: int, patch_size: int, num_channels: int, hidden_size: int, *,
               rngs: nnx.Rngs, input_key: str = "x", layer_norm_eps: float = 1e-12):
    self.patches = embedders_lib.PatchEmbeddings(image_size, patch_size, num_channels,
                                                 hidden_size, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, use_fast_variance=False,
                              rngs=rngs)
    self.input_key = input_key

  def __call__(self, batch, rng=None):
    del rng
    x = self.norm(self.patches(batch[self.input_key]))
    return x, jnp.ones(x.shape[:2], jnp.int32)


class TextTokens(nnx.Module):
  """Token ids -> a text model's embeddings (`embedders.TextEmbeddings`, e.g. MiniLM's)."""

  def __init__(self, text: embedders_lib.TextEmbeddings):
    self.text = text

  def __call__(self, batch, rng=None):
    x = self.text(batch["input_ids"], batch.get("token_type_ids"), rng=rng)
    return x, batch["attention_mask"].astype(jnp.int32)


class ClientModel(nnx.Module):
  """A FedBone client model: `embedder` (E), `adapter` (A, a residual bottleneck MLP on every
  token, the identity at initialisation) and `head` (H) with its task loss.

  Tasks: ``"classification"`` (mean-pooled tokens -> logits; cross-entropy, ``accuracy``),
  ``"segmentation"`` (patch tokens -> per-pixel logits, `heads.DensePredictionHead`; per-pixel
  cross-entropy, ``pixel_accuracy`` and ``iou``, the per-image IoU of class 1 (1 when neither
  prediction nor target has it)), ``"regression"`` (patch tokens -> per-pixel values; ``mse``).
  """

  def __init__(self, embedder: nnx.Module, hidden_size: int, task: str, output_size: int, *,
               rngs: nnx.Rngs, target_key: str = "y", bottleneck: int = 64,
               image_size: int = 8, patch_size: int = 2):
    if task not in CLIENT_TASKS:
      raise ValueError(f"unknown client task {task!r}; use one of {CLIENT_TASKS}")
    self.embedder = embedder
    self.adapter = adapters_lib.BottleneckAdapter(hidden_size, bottleneck, jax.nn.gelu,
                                                  rngs=rngs)
    if task == "classification":
      self.head = heads_lib.ClassificationHead(hidden_size, output_size, pooling="mean",
                                               rngs=rngs)
    else:
      self.head = heads_lib.DensePredictionHead(hidden_size, image_size, patch_size, output_size,
                                                rngs=rngs)
    self.task_name, self.target_key = task, target_key

  def embed(self, batch, rng=None):
    return self.embedder(batch, rng)

  def task(self, features, mask, batch, rng=None):
    del rng
    out = self.head(self.adapter(features), mask).astype(jnp.float32)
    y = batch[self.target_key]
    if self.task_name == "classification":
      loss = optax.softmax_cross_entropy_with_integer_labels(out, y)
      return loss, {"accuracy": (jnp.argmax(out, -1) == y).astype(jnp.float32)}
    if self.task_name == "segmentation":
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y), axis=(1, 2))
      pred = jnp.argmax(out, -1)
      inter = jnp.sum((pred == 1) & (y == 1), axis=(1, 2))
      union = jnp.sum((pred == 1) | (y == 1), axis=(1, 2))
      iou = jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)
      return loss, {"pixel_accuracy": jnp.mean((pred == y).astype(jnp.float32), axis=(1, 2)),
                    "iou": iou.astype(jnp.float32)}
    mse = heads_lib.pixel_mse(out, y)
    return mse, {"mse": mse}
