"""Loading Hugging Face decoder checkpoints (Llama, Mistral, Qwen2, Qwen3) into `DecoderLM`.

A checkpoint is a local folder as `save_pretrained` writes it or as a user downloads it:
``config.json`` plus ``model.safetensors`` or a sharded ``model.safetensors.index.json`` with
``model-0000k-of-0000n.safetensors`` files, in float32, float16 or bfloat16.

Memory: the model is built abstractly (`nnx.eval_shape`: shapes only, no values); each parameter
kind is then read from memory-mapped files, converted, stacked over layers (one kind at a time)
and put straight into its target sharding with `jax.device_put`. So the host holds at most one
stacked parameter kind beyond the mapped files, and on a mesh with an ``fsdp`` axis each device
receives only its shard of the frozen backbone (`fedjax_fm.models.partitioning.fsdp_spec`).
LoRA factors are fresh (seeded), initialised inside one jit that computes nothing else.

Example::

    mesh = fedjax_fm.sharding.make_mesh((("clients", 1), ("fsdp", 8)))
    model = from_pretrained_decoder("/models/Llama-3.2-1B", dtype=jnp.bfloat16, mesh=mesh,
                                    lora={"rank": 16, "alpha": 32.0, "targets": ("q", "v")})
    logits = model(input_ids, attention_mask)
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from fedjax_fm import roles as roles_lib
from fedjax_fm.models import decoder_lora
from fedjax_fm.models.decoder import DecoderConfig, DecoderLM
from fedjax_fm.models.partitioning import FSDP, param_shardings
from fedjax_fm.models.pretrained import (_SAFETENSORS_DTYPES, WEIGHTS_FILE, WEIGHTS_INDEX_FILE,
                                         read_hf_config)

PyTree = Any

_transpose = lambda w: w.T  # torch Linear weight [out, in] -> kernel [in, out]
_copy = lambda w: w

# THE name mapping: our path -> (checkpoint name, conversion). Names under ``layers/`` are
# per-layer (``model.layers.<i>.<name>``) and stacked on a leading layer axis; the others are
# under ``model.`` except lm_head. Only the entries the model has parameters for are read.
PARAMETER_MAP: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "embed/embedding": ("model.embed_tokens.weight", _copy),
    "final_norm/scale": ("model.norm.weight", _copy),
    "lm_head/kernel": ("lm_head.weight", _transpose),
    "layers/input_norm/scale": ("input_layernorm.weight", _copy),
    "layers/post_attention_norm/scale": ("post_attention_layernorm.weight", _copy),
    "layers/attention/q/kernel": ("self_attn.q_proj.weight", _transpose),
    "layers/attention/k/kernel": ("self_attn.k_proj.weight", _transpose),
    "layers/attention/v/kernel": ("self_attn.v_proj.weight", _transpose),
    "layers/attention/o/kernel": ("self_attn.o_proj.weight", _transpose),
    "layers/attention/q/bias": ("self_attn.q_proj.bias", _copy),
    "layers/attention/k/bias": ("self_attn.k_proj.bias", _copy),
    "layers/attention/v/bias": ("self_attn.v_proj.bias", _copy),
    "layers/attention/o/bias": ("self_attn.o_proj.bias", _copy),
    "layers/attention/q_norm/scale": ("self_attn.q_norm.weight", _copy),
    "layers/attention/k_norm/scale": ("self_attn.k_norm.weight", _copy),
    "layers/mlp/gate/kernel": ("mlp.gate_proj.weight", _transpose),
    "layers/mlp/up/kernel": ("mlp.up_proj.weight", _transpose),
    "layers/mlp/down/kernel": ("mlp.down_proj.weight", _transpose),
}
_LAYER_PREFIX = "model.layers.{}."
# Checkpoint entries the model does not use: RoPE buffers (recomputed from the config). A tied
# model also ignores a saved copy of the embedding as lm_head.weight (see the loader).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class SafetensorsFiles:
  """The tensors of a checkpoint folder, memory-mapped: `get(name)` is a zero-copy numpy view.

  Reads safetensors' layout directly (8-byte little-endian header size, a JSON header of
  dtype/shape/byte offsets, raw little-endian data), so bfloat16 files (ml_dtypes) need no
  torch, and only the pages of the tensors read are ever loaded.

  Raises:
    FileNotFoundError: if the folder holds neither model.safetensors nor its index.
  """

  def __init__(self, path: str):
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
      files = [single]
    elif os.path.isfile(index):
      with open(index) as f:
        files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    else:
      raise FileNotFoundError(f"no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE}) in {path!r}; save "
                              "the model with save_pretrained(path)")
    self._entries: dict[str, tuple[mmap.mmap, int, dict]] = {}
    self._maps = []
    for file in files:
      with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      self._maps.append(mapped)
      for name, meta in header.items():
        if name != "__metadata__":
          self._entries[name] = (mapped, 8 + size, meta)

  def keys(self) -> list[str]:
    return list(self._entries)

  def get(self, name: str) -> np.ndarray:
    mapped, base, meta = self._entries[name]
    if meta["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {name} has dtype {meta['dtype']}, which this loader does not "
                       f"read; use one of {sorted(_SAFETENSORS_DTYPES)}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[meta["dtype"]]).newbyteorder("<")
    start, end = meta["data_offsets"]
    count = (end - start) // dtype.itemsize
    return np.frombuffer(mapped, dtype, count, base + start).reshape(meta["shape"])


def _checkpoint_names(path: str, num_layers: int) -> list[str]:
  name, _ = PARAMETER_MAP[path]
  if path.startswith("layers/"):
    return [_LAYER_PREFIX.format(i) + name for i in range(num_layers)]
  return [name]


def _read(files: SafetensorsFiles, path: str, leaf: jax.ShapeDtypeStruct, num_layers: int,
          source: str) -> np.ndarray:
  """The value of one of our leaves: per-layer tensors converted and stacked in place."""
  names = _checkpoint_names(path, num_layers)
  convert = PARAMETER_MAP[path][1]
  out = np.empty(leaf.shape, np.dtype(leaf.dtype))
  target = out if path.startswith("layers/") else out[None]
  for i, name in enumerate(names):
    value = convert(files.get(name))
    if value.shape != target.shape[1:]:
      raise ValueError(f"{source}: tensor {name} has shape {value.shape} (after conversion), "
                       f"the model expects {target.shape[1:]} for {path}; config.json and the "
                       "weights do not belong together")
    target[i] = value  # casts to the model's dtype
  return out


def from_pretrained_decoder(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                            lora: Any = None, mesh: Mesh | None = None, axis: str = FSDP,
                            seed: int = 0, config_overrides: Mapping[str, Any] | None = None
                            ) -> DecoderLM:
  """A `DecoderLM` with the weights of a local Hugging Face decoder checkpoint folder.

  Args:
    path: folder with config.json (model_type llama, mistral, qwen2, qwen3) and the safetensors
      weights (single file or sharded with an index).
    dtype: compute dtype.
    param_dtype: backbone storage dtype; defaults to `dtype` (bf16 compute gives a bf16 frozen
      backbone). LoRA factors keep their own dtype (float32).
    lora: `decoder_lora.DecoderLoRAConfig` or a dict of its fields; fresh, zero at init.
    mesh: place the parameters on this mesh (automatic axes, as `fedjax_fm.sharding.make_mesh`
      builds): the frozen backbone sharded over `axis` along each matrix's largest divisible
      dimension, everything else replicated. None: the default device.
    axis: the FSDP mesh axis name.
    seed: initialises the LoRA factors.
    config_overrides: `DecoderConfig` fields replacing those read, e.g. ``{"remat": "full"}``.

  Returns:
    The model, its call on ``(input_ids, attention_mask)`` giving logits ``[B, T, vocab]``.

  Raises:
    FileNotFoundError: if the folder, config.json or the weights are missing.
    ValueError: for an unsupported model_type, or weights that do not match the config
      (missing tensors, unexpected tensors, shape mismatches).
  """
  hf = read_hf_config(path)
  fields = dict(dtype=dtype, param_dtype=param_dtype or dtype, **(config_overrides or {}))
  config = DecoderConfig.from_hf(hf, **fields)
  build = lambda: DecoderLM(config, lora=lora, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(nnx.eval_shape(build))
  shapes = nnx.to_pure_dict(state)
  # The checkpoint's part is frozen and FSDP-sharded; fresh LoRA factors are replicated.
  roles = jax.tree_util.tree_map_with_path(
      lambda p, _: roles_lib.FROZEN if decoder_lora.decoder_component(roles_lib.leaf_path(p))
      == "backbone" else roles_lib.SHARED, shapes)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: device, shapes)
  else:
    shardings = param_shardings(shapes, mesh, roles, axis)
  flat_shapes = {roles_lib.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
  flat_shardings = {roles_lib.leaf_path(p): s for p, s in
                    jax.tree_util.tree_leaves_with_path(shardings)}
  backbone = [p for p in flat_shapes if decoder_lora.decoder_component(p) == "backbone"]
  unmapped = sorted(set(backbone) - set(PARAMETER_MAP))
  if unmapped:  # a bug in the mapping, not in the checkpoint
    raise ValueError(f"no checkpoint mapping for model parameters {unmapped}")

  files = SafetensorsFiles(path)
  wanted = {n for p in backbone for n in _checkpoint_names(p, config.num_layers)}
  missing = sorted(wanted - set(files.keys()))
  unexpected = sorted(k for k in files.keys() if k not in wanted and not
                      k.endswith(_IGNORED_SUFFIXES) and not
                      (config.tie_word_embeddings and k == "lm_head.weight"))
  if missing or unexpected:
    raise ValueError(f"{path} does not match the {hf['model_type']} model of its config.json: "
                     f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                     f"unexpected tensors {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''}")

  values = {p: jax.device_put(_read(files, p, flat_shapes[p], config.num_layers, path),
                              flat_shardings[p]) for p in backbone}
  values.update(_fresh_lora(build, {p: s for p, s in flat_shardings.items()
                                    if p not in values}))

  def fill(p, _):
    return values[roles_lib.leaf_path(p)]

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, shapes))


def _fresh_lora(build: Callable[[], DecoderLM],
                shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
  """Initial values of the leaves a checkpoint does not hold (LoRA), by path, computed in one
  jit whose outputs are only those leaves, so XLA drops the backbone's random init."""
  if not shardings:
    return {}

  def init():
    _, state = nnx.split(build())
    flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    return {roles_lib.leaf_path(p): x for p, x in flat if roles_lib.leaf_path(p) in shardings}

  return jax.jit(init, out_shardings=dict(shardings))()



def save_pretrained_decoder(model: DecoderLM, path: str) -> None:
  """Writes `model`'s backbone as a Hugging Face llama / qwen3 folder (config.json and
  model.safetensors, float32) that `from_pretrained_decoder` and transformers'
  ``AutoModelForCausalLM.from_pretrained`` both load: the inverse of `PARAMETER_MAP`.

  LoRA factors are not written (merge them into the backbone first to export a fine-tuned
  model). The folder is written under a temporary name and renamed, so a crash never leaves a
  half-written checkpoint at `path`.

  Raises:
    ValueError: a model whose architecture transformers' llama / qwen3 classes cannot express
      (attention biases on q/k/v without o, a sliding window, a rope scaling other than
      llama3 / linear).
    FileExistsError: `path` exists.
  """
  c = model.config
  if c.attention_bias or c.sliding_window is not None:
    raise ValueError("save_pretrained_decoder writes llama / qwen3 folders; this model has "
                     "q/k/v biases or a sliding window (qwen2 / mistral), which it does not write")
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists; remove it or choose another folder")
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  hf = {"architectures": ["Qwen3ForCausalLM" if c.qk_norm else "LlamaForCausalLM"],
        "model_type": "qwen3" if c.qk_norm else "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": c.activation,
        "attention_bias": c.attention_out_bias, "mlp_bias": False,
        "max_position_embeddings": 4096, "torch_dtype": "float32"}
  if c.rope_scaling is not None:
    hf["rope_scaling"] = {k: v for k, v in dataclasses.asdict(c.rope_scaling).items()
                          if v is not None}
  flat = {roles_lib.leaf_path(p): np.asarray(jax.device_get(x), np.float32)
          for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
          if decoder_lora.decoder_component(roles_lib.leaf_path(p)) == "backbone"}
  tensors = {}
  for ours, value in flat.items():
    name, convert = PARAMETER_MAP[ours]
    if ours.startswith("layers/"):
      for i in range(c.num_layers):
        tensors[_LAYER_PREFIX.format(i) + name] = np.ascontiguousarray(convert(value[i]))
    else:
      tensors[name] = np.ascontiguousarray(convert(value))
  tmp = f"{path}.tmp-{os.getpid()}"
  os.makedirs(tmp)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
  os.replace(tmp, path)
