"""Loading Hugging Face checkpoints (BERT, RoBERTa, MiniLM, ViT, ViLT) into `TransformerModel`.

A checkpoint is a local folder with ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), as `save_pretrained` writes it. Tensors are read with
safetensors' numpy API, so loading needs neither torch nor a network. The folder's
``model_type`` picks the name mapping (MiniLM checkpoints are ``bert``).

Example::

    model = from_pretrained(path, adapters={"names": ("shared",), "bottleneck": 16},
                            head={"kind": "classification", "num_classes": 2})
    hidden_or_logits = model(input_ids, attention_mask, token_type_ids)

Adapters, LoRA and heads are freshly initialised (with `seed`); every backbone parameter comes
from the checkpoint, and a checkpoint that does not cover the model exactly raises a ValueError
naming its missing keys, unexpected keys and shape mismatches.

A text checkpoint can also serve as a single-stream vision-language model, ViLT-style (Kim et
al. 2021): ``from_pretrained(path, image={"image_size": 8, "patch_size": 2, "num_channels": 1})``
keeps its text embeddings and encoder and adds new image tokens (`embedders.ImageTokenEmbeddings`,
roles component ``image_embeddings``, trained by default) that must be learnt in fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from fedjax_fm import roles as roles_lib
from fedjax_fm.models.decoder import DECODER_MODEL_TYPES
from fedjax_fm.models.tasks import functional
from fedjax_fm.models.transformer import TransformerConfig, TransformerModel, parameter_component

PyTree = Any

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "vit", "vilt")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# Checkpoint entries the encoder does not use: the pooler (a pretraining head), buffers, and
# ViT's masked-image-modelling token.
_IGNORED_PREFIXES = ("pooler.",)
_IGNORED_SUFFIXES = ("position_ids", "embeddings.token_type_ids", "embeddings.mask_token")
IMAGE_FIELDS = ("image_size", "patch_size", "num_channels")


def _require(hf: Mapping[str, Any], key: str, path: str) -> Any:
  if key not in hf:
    raise ValueError(f"{os.path.join(path, CONFIG_FILE)} has no {key!r}; it is not a complete "
                     "Hugging Face config")
  return hf[key]


def config_from_hf(hf: Mapping[str, Any], *, path: str = "config.json", dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> TransformerConfig:
  """A `TransformerConfig` from a Hugging Face config dict (the parsed config.json).

  Fields a config.json may omit take the defaults of transformers' config classes for its
  model_type (e.g. ViT's dropout 0.0, BERT's 0.1).

  Raises:
    ValueError: for an unsupported model_type, missing required fields or relative position
      embeddings.
  """
  model_type = _require(hf, "model_type", path)
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} in {path} is not supported; use one of "
                     f"{SUPPORTED_MODEL_TYPES}")
  position_type = hf.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise ValueError(f"position_embedding_type {position_type!r} is not supported; only "
                     "'absolute' position embeddings are")
  vision = model_type in ("vit", "vilt")
  default_dropout = 0.0 if vision else 0.1
  fields = dict(
      hidden_size=_require(hf, "hidden_size", path),
      num_layers=_require(hf, "num_hidden_layers", path),
      num_heads=_require(hf, "num_attention_heads", path),
      intermediate_size=_require(hf, "intermediate_size", path),
      activation=hf.get("hidden_act", "gelu"),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      hidden_dropout=hf.get("hidden_dropout_prob", default_dropout),
      attention_dropout=hf.get("attention_probs_dropout_prob", default_dropout),
      qkv_bias=hf.get("qkv_bias", True),
      pre_norm=vision,
      dtype=dtype,
      param_dtype=param_dtype,
  )
  if model_type in ("bert", "roberta", "vilt"):
    fields.update(
        vocab_size=_require(hf, "vocab_size", path),
        max_position_embeddings=hf.get("max_position_embeddings",
                                       40 if model_type == "vilt" else 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        # RoBERTa's positions count from its pad id; BERT and ViLT count from 0.
        padding_idx=hf.get("pad_token_id", 1) if model_type == "roberta" else None)
  if vision:
    fields.update(image_size=hf.get("image_size", 224 if model_type == "vit" else 384),
                  patch_size=hf.get("patch_size", 16 if model_type == "vit" else 32),
                  num_channels=hf.get("num_channels", 3))
    for key in ("image_size", "patch_size"):
      if not isinstance(fields[key], int):
        raise ValueError(f"{key}={fields[key]!r} in {path}: only square images and patches "
                         "(one int) are supported")
  if model_type == "vilt":
    fields.update(modality="vision_text",
                  modality_type_vocab_size=hf.get("modality_type_vocab_size", 2))
  elif model_type == "vit":
    fields.update(modality="image")
  return TransformerConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Name mapping: our parameter path -> (checkpoint key, conversion)
# ----------------------------------------------------------------------------------------------


def _linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> kernel [in, out]."""
  if w.ndim != 2:
    raise ValueError("not a matrix")
  return w.T


def _patch_kernel(w: np.ndarray) -> np.ndarray:
  """Conv2d weight [D, C, p, p] -> patch-matmul kernel [p * p * C, D] in (row, col, channel)."""
  if w.ndim != 4:
    raise ValueError("not a conv kernel")
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _drop_leading_ones(w: np.ndarray) -> np.ndarray:
  """[1, 1, D] cls token -> [D]; [1, N, D] positions -> [N, D]."""
  while w.ndim > 1 and w.shape[0] == 1:
    w = w[0]
  return w


_copy = lambda w: w
Mapping_ = dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]


def _linear(ours: str, theirs: str, bias: bool = True) -> Mapping_:
  out = {f"{ours}/kernel": (f"{theirs}.weight", _linear_kernel)}
  if bias:
    out[f"{ours}/bias"] = (f"{theirs}.bias", _copy)
  return out


def _norm(ours: str, theirs: str) -> Mapping_:
  return {f"{ours}/scale": (f"{theirs}.weight", _copy), f"{ours}/bias": (f"{theirs}.bias", _copy)}


def _text_embeddings(ours: str, theirs: str) -> Mapping_:
  out = {f"{ours}/word/embedding": (f"{theirs}word_embeddings.weight", _copy),
         f"{ours}/position/embedding": (f"{theirs}position_embeddings.weight", _copy),
         f"{ours}/token_type/embedding": (f"{theirs}token_type_embeddings.weight", _copy)}
  out.update(_norm(f"{ours}/norm", f"{theirs}LayerNorm"))
  return out


def _patch_embeddings(ours: str) -> Mapping_:
  return {f"{ours}/projection/kernel": ("embeddings.patch_embeddings.projection.weight",
                                        _patch_kernel),
          f"{ours}/projection/bias": ("embeddings.patch_embeddings.projection.bias", _copy),
          f"{ours}/cls": ("embeddings.cls_token", _drop_leading_ones),
          f"{ours}/position": ("embeddings.position_embeddings", _drop_leading_ones)}


def hf_parameter_map(model_type: str, config: TransformerConfig) -> Mapping_:
  """Our backbone parameter paths -> (Hugging Face checkpoint key, conversion to our layout)."""
  out: Mapping_ = {}
  if model_type in ("bert", "roberta"):
    out.update(_text_embeddings("embeddings", "embeddings."))
  elif model_type == "vit":
    out.update(_patch_embeddings("embeddings"))
  elif model_type == "vilt":
    out.update(_text_embeddings("embeddings/text", "embeddings.text_embeddings."))
    out.update(_patch_embeddings("embeddings/image"))
    out["embeddings/modality/embedding"] = ("embeddings.token_type_embeddings.weight", _copy)
  else:
    raise ValueError(f"model_type {model_type!r} is not supported; use one of "
                     f"{SUPPORTED_MODEL_TYPES}")
  bias = config.qkv_bias
  for i in range(config.num_layers):
    ours, theirs = f"encoder/layers/{i}", f"encoder.layer.{i}"
    qkv = f"{theirs}.attention.self" if model_type in ("bert", "roberta") else \
        f"{theirs}.attention.attention"
    for name in ("query", "key", "value"):
      out.update(_linear(f"{ours}/attention/{name}", f"{qkv}.{name}", bias))
    out.update(_linear(f"{ours}/attention/out", f"{theirs}.attention.output.dense"))
    out.update(_linear(f"{ours}/mlp/fc_in", f"{theirs}.intermediate.dense"))
    out.update(_linear(f"{ours}/mlp/fc_out", f"{theirs}.output.dense"))
    if model_type in ("bert", "roberta"):
      out.update(_norm(f"{ours}/attention_norm", f"{theirs}.attention.output.LayerNorm"))
      out.update(_norm(f"{ours}/mlp_norm", f"{theirs}.output.LayerNorm"))
    else:
      out.update(_norm(f"{ours}/attention_norm", f"{theirs}.layernorm_before"))
      out.update(_norm(f"{ours}/mlp_norm", f"{theirs}.layernorm_after"))
  if config.pre_norm:
    out.update(_norm("encoder/final_norm", "layernorm"))
  return out


# ----------------------------------------------------------------------------------------------
# Reading and checking
# ----------------------------------------------------------------------------------------------


def read_hf_config(path: str) -> dict[str, Any]:
  """The parsed config.json of checkpoint folder `path`.

  Raises:
    FileNotFoundError: if the folder or its config.json does not exist.
  """
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {path!r}; pass a folder written by "
                            "save_pretrained (config.json + model.safetensors)")
  with open(file) as f:
    return json.load(f)


# safetensors dtype names -> numpy dtypes, for the files numpy's own loader refuses (bfloat16).
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _load_safetensors_file(file: str) -> dict[str, np.ndarray]:
  """One .safetensors file as numpy arrays.

  safetensors' numpy API cannot build bfloat16 arrays (numpy has no such dtype), yet many
  checkpoints are stored in bf16; those files are parsed here directly (8-byte little-endian
  header size, JSON header of dtype/shape/byte offsets, raw little-endian data), with
  ml_dtypes' bfloat16.
  """
  try:
    return load_file(file)
  except TypeError:
    pass
  with open(file, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_size))
    data = f.read()
  tensors = {}
  for key, meta in header.items():
    if key == "__metadata__":
      continue
    if meta["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{file}: tensor {key} has dtype {meta['dtype']}, which this loader "
                       f"does not read; convert the checkpoint to one of "
                       f"{sorted(_SAFETENSORS_DTYPES)}")
    start, end = meta["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[meta["dtype"]]).newbyteorder("<")
    tensors[key] = np.frombuffer(data[start:end], dtype).reshape(meta["shape"])
  return tensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder (single or sharded safetensors) as numpy arrays.

  Raises:
    FileNotFoundError: if the folder holds neither model.safetensors nor its index.
  """
  single = os.path.join(path, WEIGHTS_FILE)
  if os.path.isfile(single):
    return _load_safetensors_file(single)
  index = os.path.join(path, WEIGHTS_INDEX_FILE)
  if not os.path.isfile(index):
    raise FileNotFoundError(f"no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE}) in {path!r}; save "
                            "the model with save_pretrained(path) (safetensors is the default)")
  with open(index) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  tensors: dict[str, np.ndarray] = {}
  for shard in shards:
    tensors.update(_load_safetensors_file(os.path.join(path, shard)))
  return tensors


def _strip_task_prefix(tensors: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
  """Task checkpoints (BertForSequenceClassification, ...) nest the encoder under
  '<model_type>.'; keep that part. Their task heads are not the encoder's and are dropped."""
  prefix = f"{model_type}."
  if any(k.startswith("embeddings.") for k in tensors) or \
      not any(k.startswith(prefix) for k in tensors):
    return tensors
  return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _ignored(key: str) -> bool:
  return key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES)


def _listing(items: list[str], limit: int = 12) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def checkpoint_values(params: PyTree, tensors: Mapping[str, np.ndarray], model_type: str,
                      config: TransformerConfig, *,
                      source: str = "the checkpoint") -> dict[str, np.ndarray]:
  """The checkpoint's value for every backbone leaf of `params`, by path, in our layout.

  Args:
    params: the model's parameter tree; its leaves only need `.shape` (arrays or
      `jax.ShapeDtypeStruct`s from `nnx.eval_shape`).
    tensors: checkpoint key -> array.
    model_type: the checkpoint's model_type (picks the name mapping).
    config: the model's config.
    source: how to name the checkpoint in errors.

  Raises:
    ValueError: naming every missing key, unexpected key and shape mismatch at once.
  """
  mapping = hf_parameter_map(model_type, config)
  tensors = _strip_task_prefix(dict(tensors), model_type)
  wanted = {theirs for theirs, _ in mapping.values()}
  ours = {roles_lib.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  backbone = {p for p in ours if parameter_component(p) == "backbone"}
  unmapped = sorted(backbone - set(mapping))
  if unmapped:  # a bug in the mapping, not in the checkpoint
    raise ValueError(f"no checkpoint mapping for model parameters {unmapped}")

  missing = sorted(wanted - set(tensors))
  unexpected = sorted(k for k in tensors if k not in wanted and not _ignored(k))
  mismatched, values = [], {}
  for path, (theirs, convert) in mapping.items():
    if theirs not in tensors:
      continue
    raw = tensors[theirs]
    try:
      value = convert(raw)
    except ValueError:
      value = None
    if value is None or tuple(value.shape) != tuple(ours[path].shape):
      mismatched.append(f"{theirs} {tuple(raw.shape)} vs model {path} "
                        f"{tuple(ours[path].shape)}")
      continue
    values[path] = value
  if missing or unexpected or mismatched:
    raise ValueError(
        f"{source} does not match the {model_type} model of its config.json: "
        f"missing keys [{_listing(missing)}]; unexpected keys [{_listing(unexpected)}]; "
        f"shape mismatches [{_listing(mismatched)}]; check that config.json and the weights "
        "belong together")
  return values


def load_backbone(model: TransformerModel, tensors: Mapping[str, np.ndarray], model_type: str,
                  *, source: str = "the checkpoint") -> TransformerModel:
  """`model` with its backbone replaced by checkpoint tensors (adapters, LoRA, head kept).

  Raises:
    ValueError: naming every missing key, unexpected key and shape mismatch at once.
  """
  graphdef, params = functional(model)
  values = checkpoint_values(params, tensors, model_type, model.config, source=source)
  return nnx.merge(graphdef, _fill(params, values))


def _fill(params: PyTree, values: Mapping[str, Any]) -> PyTree:
  """`params` with the leaves named in `values` (path -> array) replaced, cast to their dtype."""

  def fill(path, x):
    p = roles_lib.leaf_path(path)
    if p not in values:
      if isinstance(x, jax.ShapeDtypeStruct):
        raise ValueError(f"parameter {p} got no value")  # a bug: every leaf must be set
      return x
    return jnp.asarray(np.asarray(values[p], dtype=np.float32), dtype=x.dtype)

  return jax.tree_util.tree_map_with_path(fill, params)


def _fresh_parameters(build: Callable[[], TransformerModel]) -> dict[str, jax.Array]:
  """Initial values of the parts a checkpoint does not hold (adapters, LoRA, head, a text
  model's new image tokens), by path.

  The whole model is initialised inside one jit whose outputs are only those parts, so XLA
  drops the backbone's random initialisation: no time or memory is spent on values the
  checkpoint overwrites.
  """

  def init():
    _, params = functional(build())
    return {roles_lib.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)
            if parameter_component(roles_lib.leaf_path(p)) != "backbone"}

  return jax.jit(init)()
def _with_image(config: TransformerConfig, image: Mapping[str, Any], model_type: str,
                path: str) -> TransformerConfig:
  """`config` of a text checkpoint extended with new image tokens (`from_pretrained`'s
  `image` option)."""
  if config.modality != "text":
    raise ValueError(f"image= extends a text checkpoint (bert, roberta) to images; {path} is "
                     f"a {model_type!r} model, which takes its own images")
  unknown = sorted(set(image) - set(IMAGE_FIELDS))
  if unknown or not {"image_size", "patch_size"} <= set(image):
    raise ValueError(f"image={dict(image)!r}: give image_size and patch_size (and optionally "
                     f"num_channels, default 3); unknown fields {unknown}")
  return dataclasses.replace(config, modality="vision_text", separate_image_embeddings=True,
                             image_size=image["image_size"], patch_size=image["patch_size"],
                             num_channels=image.get("num_channels", 3))


def from_pretrained(path: str, *, adapters: Any = None, lora: Any = None, head: Any = None,
                    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, seed: int = 0,
                    config_overrides: Mapping[str, Any] | None = None,
                    image: Mapping[str, int] | None = None) -> TransformerModel:
  """A `TransformerModel` with the weights of a local Hugging Face checkpoint folder.

  A decoder checkpoint (model_type llama, mistral, qwen2, qwen3) gives a `decoder.DecoderLM`
  instead (`decoder_pretrained.from_pretrained_decoder`: `lora`, `dtype`, `param_dtype`, `seed`
  and `config_overrides` apply), whose call returns logits ``[B, T, vocab]``.

  The model's call on ``(input_ids, attention_mask, token_type_ids)`` (BERT, RoBERTa, MiniLM),
  ``pixel_values=`` NHWC images (ViT) or both (ViLT) returns the last hidden state, the same as
  transformers' ``AutoModel(...).last_hidden_state``; with a head it returns the head's output.

  With `image`, a text checkpoint (bert, roberta: MiniLM) becomes a ViLT-style vision-language
  model: the call on ``(input_ids, attention_mask, token_type_ids, pixel_values=NHWC images)``
  returns ``[B, T + 1 + num_patches, hidden]``, the text tokens then an image CLS token and the
  patches in row-major grid order (attention mask: the text's, then all ones). The text
  embeddings and the encoder are the checkpoint's, unchanged and at the text model's paths; the
  patch projection, image CLS and positions, modality-type embeddings and image LayerNorm are
  new (`embedders.ImageTokenEmbeddings`, seeded by `seed`) and must be trained: they form the
  roles component ``image_embeddings``, which `transformer_roles` trains by default while the
  pretrained backbone stays frozen.

  Args:
    path: folder with config.json and model.safetensors (model_type bert, roberta, vit, vilt).
    adapters: `AdapterConfig` (or a dict of its fields): bottleneck adapters, fresh, identity at
      initialisation.
    lora: `LoRAConfig` (or dict): LoRA branches, fresh, zero at initialisation.
    head: a head spec for `heads.build_head`, e.g. ``{"kind": "classification",
      "num_classes": 2, "pooling": "mean"}``; freshly initialised.
    dtype: compute dtype (jnp.bfloat16 for bf16 activations and matmuls).
    param_dtype: parameter storage dtype.
    seed: initialises the fresh adapters, LoRA and head.
    config_overrides: `TransformerConfig` fields to override after reading config.json, e.g.
      ``{"hidden_dropout": 0.0, "attention_dropout": 0.0}``.
    image: for a text checkpoint, ``{"image_size": 8, "patch_size": 2, "num_channels": 1}``:
      square NHWC images of that size cut into patch_size patches (num_channels defaults to 3).

  Raises:
    FileNotFoundError: if the folder, config.json or the weights are missing.
    ValueError: for an unsupported model_type, weights that do not match the config (missing
      keys, unexpected keys, shape mismatches), or `image` given for a non-text checkpoint.
  """
  hf = read_hf_config(path)
  if hf.get("model_type") in DECODER_MODEL_TYPES:
    if adapters is not None or head is not None or image is not None:
      raise ValueError(f"{path} is a {hf['model_type']} decoder; it takes lora= but not "
                       "adapters=, head= or image=")
    from fedjax_fm.models.decoder_pretrained import from_pretrained_decoder  # imports us
    return from_pretrained_decoder(path, dtype=dtype, param_dtype=param_dtype, lora=lora,
                                   seed=seed, config_overrides=config_overrides)
  config = config_from_hf(hf, path=path, dtype=dtype, param_dtype=param_dtype)
  if config_overrides:
    unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(config)})
    if unknown:
      raise ValueError(f"config_overrides {unknown} are not TransformerConfig fields")
    config = dataclasses.replace(config, **config_overrides)
  if image is not None:
    config = _with_image(config, image, hf["model_type"], path)
  tensors = read_safetensors(path)
  build = lambda: TransformerModel(config, rngs=nnx.Rngs(seed), adapters=adapters, lora=lora,
                                   head=head)
  # The structure without computing any values; the backbone comes from the checkpoint and
  # only the fresh parts are initialised.
  graphdef, shapes = functional(nnx.eval_shape(build))
  values = checkpoint_values(shapes, tensors, hf["model_type"], config, source=path)
  values.update(_fresh_parameters(build))
  return nnx.merge(graphdef, _fill(shapes, values))
