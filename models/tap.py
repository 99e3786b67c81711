"""TAP's superset model: modality encoders, a shared fusion transformer with experts, task heads.

Lee, Fang, Han, Hosseinalipour, Brinton. "Two-Stage Adaptive Personalization of Multi-Task and
Multi-Modal Foundation Models in Federated Learning" (TAP), arXiv:2509.26524, 2025; restated in
docs/algorithms.md section 1.1.

The server holds one model over the union of all modalities and tasks (the paper's
"modality-task pair architecture"); a client of modality-task pair p holds and runs only the
static sub-tree `view_mask(params, config, p)` of it:

- one encoder per modality: ``encoders/text`` (the pretrained text embeddings; word, position and
  type tables frozen, their LayerNorm trained), ``encoders/image`` (new patch embeddings and a
  LayerNorm, trained), and ``encoders/image_text`` (a zero-initialised modality-type table that
  tags text and image tokens when a pair reads both, ViLT-style; Kim et al. 2021);
- ``fusion``: a shared transformer encoder (`transformer.Encoder`) initialised from a pretrained
  text checkpoint (all-MiniLM-L6-v2, first `fusion.num_layers` layers), frozen, with LoRA on
  its attention and a bottleneck expert adapter per layer for every name in
  `TAPConfig.expert_names`: ``shared``, ``modality_<m>`` per modality and ``task_<t>`` per task.
  A pair runs the shared expert, its modalities' experts and its task's expert, mixed as their
  mean (`adapters.mix_adapters`): the JAX reading of the paper's MoTE/MoME paths
  (shared->shared, shared->t, m->t, m->shared, averaged). The reference code's separate
  per-modality and per-task transformer blocks and per-domain experts are folded into these
  experts; its attention "LoRA" that applies W_q twice (docs/algorithms.md 1.6, item 2) is replaced
  by
  standard LoRA;
- ``heads/<task>``: one head per task (`heads.py`): classification (masked-mean pooled tokens),
  dense per-pixel classification or regression (a patch decoder over the image tokens), next
  token prediction (vocabulary logits at the last real position), answer scoring (VQA).

Inputs are a dict with canonical keys: ``image`` [B, H, W, C] floats and/or ``input_ids``,
``attention_mask`` (and optionally ``token_type_ids``) [B, T] ints. Tokens are laid out as
[text; image CLS; image patches], so the image patches are the last tokens (the dense heads read
them from there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm.models import adapters as adapters_lib
from fedjax_fm.models import embedders, heads as heads_lib
from fedjax_fm.models import pretrained as pretrained_lib
from fedjax_fm.models.tasks import functional
from fedjax_fm.models.transformer import Encoder, TransformerConfig

PyTree = Any
MODALITIES = ("image", "text")
HEAD_KINDS = ("classification", "dense_classification", "dense_regression", "next_token",
              "answer_scoring")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task of the federation and its head.

  Attributes:
    name: the task's name (also its expert's and head's path segment; no '/').
    head: one of `HEAD_KINDS`.
    output_size: classes, answers, vocabulary size, or output channels (dense regression).
  """
  name: str
  head: str
  output_size: int

  def __post_init__(self):
    if not self.name or "/" in self.name:
      raise ValueError(f"task name {self.name!r} must be non-empty without '/'")
    if self.head not in HEAD_KINDS:
      raise ValueError(f"task {self.name!r}: unknown head {self.head!r}; use one of "
                       f"{HEAD_KINDS}")
    if self.output_size < 1:
      raise ValueError(f"task {self.name!r}: output_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """A modality-task pair: what one group of clients reads and predicts.

  Attributes:
    name: the group's name.
    modalities: a non-empty subset of `MODALITIES`.
    task: the name of a `TaskSpec` of the config.
  """
  name: str
  modalities: tuple[str, ...]
  task: str

  def __post_init__(self):
    object.__setattr__(self, "modalities", tuple(self.modalities))
    bad = [m for m in self.modalities if m not in MODALITIES]
    if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
      raise ValueError(f"pair {self.name!r}: modalities {self.modalities} must be distinct "
                       f"names from {MODALITIES}")


@dataclasses.dataclass(frozen=True)
class TAPConfig:
  """The superset model.

  Attributes:
    fusion: the fusion transformer and text embeddings (`TransformerConfig`, modality "text").
    tasks: every task of the federation.
    pairs: every modality-task pair (one per client group).
    image_size, patch_size, num_channels: square NHWC images of the image encoder.
    lora: LoRA on the fusion layers (None: none).
    expert_bottleneck: width of every expert adapter.
  """
  fusion: TransformerConfig
  tasks: tuple[TaskSpec, ...]
  pairs: tuple[PairSpec, ...]
  image_size: int = 8
  patch_size: int = 2
  num_channels: int = 1
  lora: adapters_lib.LoRAConfig | None = adapters_lib.LoRAConfig(rank=4, alpha=8.0,
                                                                 targets=("q", "v"))
  expert_bottleneck: int = 16

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(self.tasks))
    object.__setattr__(self, "pairs", tuple(self.pairs))
    names = [t.name for t in self.tasks]
    if len(set(names)) != len(names):
      raise ValueError(f"task names {names} must be distinct")
    pair_names = [p.name for p in self.pairs]
    if not pair_names or len(set(pair_names)) != len(pair_names):
      raise ValueError(f"pair names {pair_names} must be non-empty and distinct")
    for p in self.pairs:
      if p.task not in names:
        raise ValueError(f"pair {p.name!r} names task {p.task!r}, which is not among the "
                         f"tasks {names}")
      head = self.task(p.task).head
      if head.startswith("dense") and p.modalities != ("image",):
        raise ValueError(f"pair {p.name!r}: a {head!r} head predicts pixels of an image-only "
                         f"input; its modalities are {p.modalities}")
      if head == "next_token" and "text" not in p.modalities:
        raise ValueError(f"pair {p.name!r}: a next_token head needs the text modality")
    if self.fusion.modality != "text":
      raise ValueError("the fusion config is a text encoder config (modality 'text'); images "
                       "enter through TAPConfig.image_size / patch_size")
    if self.modalities_used.count("image") and (self.image_size < 1 or
                                                self.image_size % max(self.patch_size, 1)):
      raise ValueError(f"image_size {self.image_size} must be a positive multiple of "
                       f"patch_size {self.patch_size}")

  def task(self, name: str) -> TaskSpec:
    for t in self.tasks:
      if t.name == name:
        return t
    raise ValueError(f"no task {name!r}; tasks: {[t.name for t in self.tasks]}")

  def pair(self, name: str) -> PairSpec:
    for p in self.pairs:
      if p.name == name:
        return p
    raise ValueError(f"no modality-task pair {name!r}; pairs: {[p.name for p in self.pairs]}")

  @property
  def modalities_used(self) -> list[str]:
    return [m for m in MODALITIES if any(m in p.modalities for p in self.pairs)]

  @property
  def expert_names(self) -> tuple[str, ...]:
    """``shared``, ``modality_<m>`` per modality used, ``task_<t>`` per task."""
    return (("shared",) + tuple(f"modality_{m}" for m in self.modalities_used)
            + tuple(f"task_{t.name}" for t in self.tasks))

  def experts_of(self, pair_name: str) -> tuple[str, ...]:
    """The experts pair `pair_name` runs: shared, its modalities', its task's."""
    p = self.pair(pair_name)
    return ("shared",) + tuple(f"modality_{m}" for m in p.modalities) + (f"task_{p.task}",)


class ImageEncoder(nnx.Module):
  """Patch embeddings (`embedders.PatchEmbeddings`: projection, CLS, positions) and a LayerNorm
  that gives the image tokens the scale of the text checkpoint's normalised embeddings."""

  def __init__(self, image_size: int, patch_size: int, num_channels: int, hidden_size: int, *,
               layer_norm_eps: float, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    self.patches = embedders.PatchEmbeddings(image_size, patch_size, num_channels, hidden_size,
                                             rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, use_fast_variance=False,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    del rng
    return self.norm(self.patches(images))


def _head(task: TaskSpec, config: TAPConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  f = config.fusion
  d = f.hidden_size
  kw = dict(rngs=rngs, dtype=f.dtype, param_dtype=f.param_dtype)
  if task.head == "classification":
    return heads_lib.ClassificationHead(d, task.output_size, pooling="mean", **kw)
  if task.head == "answer_scoring":
    return heads_lib.AnswerScoringHead(d, task.output_size, pooling="mean", **kw)
  if task.head in ("dense_classification", "dense_regression"):
    return heads_lib.DensePredictionHead(d, config.image_size, config.patch_size,
                                         task.output_size, **kw)
  return heads_lib.TokenPredictionHead(d, task.output_size, layer_norm_eps=f.layer_norm_eps,
                                       **kw)


def _split(rng, n):
  return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


class TAPModel(nnx.Module):
  """The superset model; ``model(pair_name, inputs, rng=None)`` runs one pair's sub-model.

  Example::

      config = TAPConfig(fusion=TransformerConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                  intermediate_size=32, vocab_size=50),
                         tasks=(TaskSpec("digits", "classification", 10),),
                         pairs=(PairSpec("digits", ("image",), "digits"),))
      model = TAPModel(config, rngs=nnx.Rngs(0))
      logits = model("digits", {"image": images})              # [B, 10]
  """

  def __init__(self, config: TAPConfig, *, rngs: nnx.Rngs):
    self.config = config
    f = config.fusion
    kw = dict(dtype=f.dtype, param_dtype=f.param_dtype, rngs=rngs)
    modalities = config.modalities_used
    encoders = {}
    if "text" in modalities:
      encoders["text"] = embedders.TextEmbeddings(
          f.vocab_size, f.hidden_size, f.max_position_embeddings, f.type_vocab_size,
          layer_norm_eps=f.layer_norm_eps, padding_idx=f.padding_idx,
          dropout_rate=f.hidden_dropout, **kw)
    if "image" in modalities:
      encoders["image"] = ImageEncoder(config.image_size, config.patch_size,
                                       config.num_channels, f.hidden_size,
                                       layer_norm_eps=f.layer_norm_eps, **kw)
    if any(len(p.modalities) > 1 for p in config.pairs):
      encoders["image_text"] = nnx.Embed(2, f.hidden_size,
                                         embedding_init=nnx.initializers.zeros_init(), **kw)
    self.encoders = nnx.Dict(encoders)
    self.fusion = Encoder(f, adapters=adapters_lib.AdapterConfig(
        names=config.expert_names, bottleneck=config.expert_bottleneck, activation="gelu"),
        lora=config.lora, rngs=rngs)
    self.heads = nnx.Dict({t.name: _head(t, config, rngs=rngs) for t in config.tasks})

  def tokens(self, pair_name: str, inputs: Mapping[str, jax.Array],
             rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The pair's input tokens [B, T, D] and token mask [B, T] (text first, then image)."""
    pair = self.config.pair(pair_name)
    r_text, r_image = _split(rng, 2)
    parts, masks = [], []
    if "text" in pair.modalities:
      ids = inputs["input_ids"]
      mask = inputs.get("attention_mask")
      mask = jnp.ones(ids.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
      parts.append(self.encoders["text"](ids, inputs.get("token_type_ids"), None, r_text))
      masks.append(mask)
    if "image" in pair.modalities:
      x = self.encoders["image"](inputs["image"], r_image)
      parts.append(x)
      masks.append(jnp.ones(x.shape[:2], jnp.int32))
    if len(parts) > 1:
      table = self.encoders["image_text"]
      parts = [x + table(jnp.full(x.shape[:2], i, jnp.int32)).astype(x.dtype)
               for i, x in enumerate(parts)]
    return jnp.concatenate(parts, axis=1), jnp.concatenate(masks, axis=1)

  def __call__(self, pair_name: str, inputs: Mapping[str, jax.Array],
               rng: jax.Array | None = None) -> jax.Array:
    """The pair's head output: [B, C] logits (classification, answer scoring, next token) or
    [B, H, W, C] per-pixel outputs (dense). Dropout is on when `rng` is given."""
    pair = self.config.pair(pair_name)
    task = self.config.task(pair.task)
    r_tokens, r_fusion, r_head = _split(rng, 3)
    x, mask = self.tokens(pair_name, inputs, r_tokens)
    experts = self.config.experts_of(pair_name)
    weights = {name: 1.0 / len(experts) for name in experts}
    hidden = self.fusion(x, mask, r_fusion, weights)
    out = self.heads[task.name](hidden, mask, rng=r_head)
    if task.head == "next_token":  # the prediction after the last real token
      last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
      out = jnp.take_along_axis(out, last[:, None, None], axis=1)[:, 0]
    return out


# ----------------------------------------------------------------------------------------------
# Roles and views
# ----------------------------------------------------------------------------------------------

_FROZEN_TEXT = ("word", "position", "token_type")


def _paths(params: PyTree) -> list[str]:
  return [roles_lib.leaf_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def is_frozen(path: str) -> bool:
  """Pretrained and frozen: the text embedding tables and the fusion backbone (everything in
  ``fusion/`` that is neither LoRA nor an expert adapter)."""
  parts = path.split("/")
  if parts[:2] == ["encoders", "text"]:
    return parts[2] in _FROZEN_TEXT
  if parts[0] == "fusion":
    return "adapters" not in parts and not any(p.startswith("lora_") for p in parts)
  return False


def tap_roles(params: PyTree) -> PyTree:
  """`frozen` for the pretrained backbone (`is_frozen`), `shared` (trained) for the rest."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: roles_lib.FROZEN if is_frozen(roles_lib.leaf_path(p)) else roles_lib.SHARED,
      params)


def in_view(path: str, config: TAPConfig, pair_name: str) -> bool:
  """Whether the leaf at `path` belongs to pair `pair_name`'s sub-model."""
  pair = config.pair(pair_name)
  parts = path.split("/")
  if parts[0] == "encoders":
    if parts[1] == "image_text":
      return len(pair.modalities) > 1
    return parts[1] in pair.modalities
  if parts[0] == "heads":
    return parts[1] == pair.task
  if parts[0] == "fusion":
    if "adapters" in parts:
      return parts[parts.index("adapters") + 1] in config.experts_of(pair_name)
    return True
  raise ValueError(f"parameter {path!r} is not part of a TAP model")


def view_mask(params: PyTree, config: TAPConfig, pair_name: str) -> PyTree:
  """A pytree of Python bools (static): True on the leaves of pair `pair_name`'s sub-model."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: in_view(roles_lib.leaf_path(p), config, pair_name), params)


# ----------------------------------------------------------------------------------------------
# Pretrained initialisation
# ----------------------------------------------------------------------------------------------


def fusion_config_from_pretrained(path: str, num_layers: int, **overrides) -> TransformerConfig:
  """A text checkpoint's `TransformerConfig` with `num_layers` layers and overrides (e.g.
  ``hidden_dropout=0.0``)."""
  hf = pretrained_lib.read_hf_config(path)
  config = pretrained_lib.config_from_hf(hf, path=path)
  if not 1 <= num_layers <= config.num_layers:
    raise ValueError(f"fusion num_layers {num_layers} must be in [1, {config.num_layers}] "
                     f"(the layers of {path})")
  return dataclasses.replace(config, num_layers=num_layers, **overrides)


def load_pretrained(params: PyTree, config: TAPConfig, path: str,
                    shapes: PyTree | None = None) -> PyTree:
  """`params` of a TAP model with its text embeddings and fusion layers replaced by the
  checkpoint at `path` (a BERT-family folder, e.g. all-MiniLM-L6-v2; its first
  `config.fusion.num_layers` layers). LoRA, experts, image encoder, modality types and heads
  keep their values.

  `shapes` (default: `params` itself) gives the shapes the checkpoint's tensors must have;
  `init_params(..., placeholder_tables=True)` leaves the text tables as placeholders of another
  shape, which the checkpoint then replaces.

  Raises:
    ValueError: if the checkpoint is not a bert/roberta model, or a tensor is missing or has
      the wrong shape.
  """
  hf = pretrained_lib.read_hf_config(path)
  model_type = hf.get("model_type")
  if model_type not in ("bert", "roberta"):
    raise ValueError(f"TAP's fusion is initialised from a text checkpoint (bert, roberta); "
                     f"{path} is {model_type!r}")
  tensors = pretrained_lib.read_safetensors(path)
  prefix = f"{model_type}."
  if not any(k.startswith("embeddings.") for k in tensors):
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  renames = {"embeddings/": "encoders/text/", "encoder/": "fusion/"}
  mapping = {}
  for our_path, entry in pretrained_lib.hf_parameter_map(model_type, config.fusion).items():
    for old, new in renames.items():
      if our_path.startswith(old):
        mapping[new + our_path[len(old):]] = entry
  missing = sorted(set(mapping) - set(_paths(params)))
  if missing:  # a mapping bug, not a checkpoint problem
    raise ValueError(f"mapped paths {missing[:4]} are not in the TAP model")

  def fill(p, x, shape):
    path_str = roles_lib.leaf_path(p)
    if path_str not in mapping:
      return x
    theirs, convert = mapping[path_str]
    if theirs not in tensors:
      raise ValueError(f"{path} has no tensor {theirs!r} for {path_str}; is it a complete "
                       f"{model_type} checkpoint?")
    value = convert(np.asarray(tensors[theirs], np.float32))
    if tuple(value.shape) != tuple(shape.shape):
      raise ValueError(f"{path}: {theirs} has shape {value.shape}, the model's {path_str} "
                       f"{shape.shape}; check the fusion config against the checkpoint")
    return jnp.asarray(value, x.dtype)

  return jax.tree_util.tree_map_with_path(fill, params, params if shapes is None else shapes)


def init_params(config: TAPConfig, seed: int = 0, *, placeholder_tables: bool = False
                ) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """(graphdef, params, shapes) of `TAPModel(config)`.

  With `placeholder_tables`, the text word and position tables are built with one row each (to
  be replaced by a checkpoint's, `load_pretrained`): drawing a 30k x 384 random table that is
  then overwritten costs half a minute on a CPU. `shapes` are the real shapes of every leaf.
  """
  build = lambda c: TAPModel(c, rngs=nnx.Rngs(seed))
  graphdef, shapes = functional(nnx.eval_shape(lambda: build(config)))
  if placeholder_tables:
    config = dataclasses.replace(config, fusion=dataclasses.replace(
        config.fusion, vocab_size=1, max_position_embeddings=1))
  # One jitted program (XLA optimisations off: nothing here is worth them) instead of one
  # compiled random-number program per leaf in eager mode.
  params = jax.jit(lambda: functional(build(config))[1],
                   compiler_options={"xla_backend_optimization_level": "0"})()
  return graphdef, params, shapes


def tap_from_pretrained(path: str, *, tasks: Sequence[TaskSpec], pairs: Sequence[PairSpec],
                        num_layers: int = 1, image_size: int = 8, patch_size: int = 2,
                        num_channels: int = 1, lora: Any = None, expert_bottleneck: int = 16,
                        dropout: float = 0.0, seed: int = 0
                        ) -> tuple[TAPConfig, nnx.GraphDef, PyTree]:
  """A TAP superset model whose text embeddings and fusion come from the checkpoint at `path`.

  Args:
    path: a local Hugging Face folder of a BERT-family text model (all-MiniLM-L6-v2).
    tasks, pairs: the federation's tasks and modality-task pairs.
    num_layers: fusion depth: the checkpoint's first `num_layers` layers (the paper's FLAVA
      fusion has 1 layer, ViLT's 4).
    image_size, patch_size, num_channels: the image encoder's input.
    lora: `LoRAConfig` or a dict of its fields (default rank 4, alpha 8 on q and v).
    expert_bottleneck: expert adapter width.
    dropout: hidden and attention dropout of the fusion (the checkpoint's 0.1 is overridden).
    seed: initialises everything the checkpoint does not hold.

  Returns:
    (config, graphdef, params); ``nnx.merge(graphdef, params)`` is the `TAPModel`.
  """
  fusion = fusion_config_from_pretrained(path, num_layers, hidden_dropout=dropout,
                                         attention_dropout=dropout)
  lora = adapters_lib.lora_config(lora) if lora is not None else TAPConfig.lora
  config = TAPConfig(fusion=fusion, tasks=tuple(tasks), pairs=tuple(pairs),
                     image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                     lora=lora, expert_bottleneck=expert_bottleneck)
  graphdef, params, shapes = init_params(config, seed, placeholder_tables=True)
  return config, graphdef, load_pretrained(params, config, path, shapes)
