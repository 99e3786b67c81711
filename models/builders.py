"""Model builders of the launcher's table (`fedjax_fm.experiment.MODELS`): config and the
training data -> a `fedjax_fm.builders.ModelBundle` (parameters, roles, graphdef, input keys and
the task loss). FedBone's split model and TAP's superset model are built next to their
algorithms' builders.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm import assets, pretrain, roles
from fedjax_fm.builders import Federation, ModelBundle
from fedjax_fm.cohort import FederatedData
from fedjax_fm.models.cnn import MLP, SimpleCNN
from fedjax_fm.models.decoder import DecoderConfig, DecoderLM
from fedjax_fm.models.decoder_lora import decoder_component, decoder_lora_config, decoder_roles
from fedjax_fm.models.decoder_generate import generate
from fedjax_fm.models.decoder_loss import lm_loss_fn
from fedjax_fm.models.decoder_pretrained import from_pretrained_decoder
from fedjax_fm.models.pretrained import from_pretrained
from fedjax_fm.models.tasks import classification_loss, functional
from fedjax_fm.models.transformer import transformer_roles

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
VISION_TEXT_INPUTS = TEXT_INPUTS + ("image",)  # the model's 4th positional input: pixel_values
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _classifier(graphdef, params, role_tree, input_keys) -> ModelBundle:
  return ModelBundle(params=params, roles=role_tree, graphdef=graphdef, input_keys=input_keys,
                     loss=lambda train: classification_loss(graphdef, input_keys, train=train))


def _num_classes(data: Federation) -> int:
  return int(data.train.arrays["y"].max()) + 1


def small_model(config, data: Federation) -> ModelBundle:
  """``model.name`` ``"mlp"`` (hidden sizes ``model.hidden``) or ``"cnn"`` on images ``x``; all
  parameters shared."""
  example = data.train.arrays["x"]
  rngs = nnx.Rngs(config.seed)
  if config.model.name == "mlp":
    model = MLP(int(example[0].size), _num_classes(data), hidden=tuple(config.model.hidden),
                rngs=rngs)
  else:
    model = SimpleCNN(example.shape[1:], _num_classes(data), rngs=rngs)
  graphdef, params = functional(model)
  return _classifier(graphdef, params, roles.assign_roles(params), "x")


def pretrained_encoder(config, data: Federation) -> ModelBundle:
  """A Hugging Face encoder checkpoint (``model.name`` ``"minilm"``: the cached
  all-MiniLM-L6-v2; ``"pretrained"``: the folder ``model.path``) with the adapters, LoRA and
  head of ``config.model``; ``model.trainable`` / ``model.personal`` give the roles.
  ``model.image`` makes a text checkpoint read images too (fresh patch embeddings,
  ViLT-style); ``model.num_layers`` keeps the first layers only (0: all; the tiny variants use
  one so that CI compiles little)."""
  m = config.model
  path = assets.path("all-minilm-l6-v2", download=True) if m.name == "minilm" else m.path
  if not path:
    raise ValueError("config.model.path must name a local Hugging Face folder for "
                     "model.name='pretrained'")
  if m.dtype not in DTYPES:
    raise ValueError(f"unknown config.model.dtype {m.dtype!r}; use one of {sorted(DTYPES)}")
  head = dict(m.head.to_dict(), num_classes=_num_classes(data))
  overrides = ({} if m.dropout is None else
               {"hidden_dropout": m.dropout, "attention_dropout": m.dropout})
  image = m.image.to_dict() if m.image is not None else None
  adapters = m.adapters.to_dict() if m.adapters is not None else None
  lora = m.lora.to_dict() if m.lora is not None else None
  model = from_pretrained(path, adapters=adapters, lora=lora, head=head, dtype=DTYPES[m.dtype],
                          seed=config.seed, config_overrides=overrides, image=image)
  if m.num_layers:
    if not 0 < m.num_layers <= model.config.num_layers:
      raise ValueError(f"config.model.num_layers={m.num_layers} but the checkpoint has "
                       f"{model.config.num_layers} layers; use 1..{model.config.num_layers} "
                       "(0: all)")
    model.encoder.layers = nnx.List(list(model.encoder.layers)[:m.num_layers])
    model.config = dataclasses.replace(model.config, num_layers=m.num_layers)
  graphdef, params = functional(model)
  role_tree = transformer_roles(params, trainable=tuple(m.trainable),
                                personal=tuple(m.personal))
  return _classifier(graphdef, params, role_tree, VISION_TEXT_INPUTS if image else TEXT_INPUTS)


# ---- decoder LLMs (Llama, Mistral, Qwen2/3) with LoRA ----

DECODER_KEYS = ("path", "shape", "pretrain", "lora", "trainable", "personal", "dtype", "param_dtype",
                "remat", "loss_chunk")
DECODER_INPUTS = ("input_ids", "attention_mask")


def _decoder_knobs(config) -> dict:
  """``config.model``'s decoder knobs, every one required (no defaults in code)."""
  m = config.model
  missing = [k for k in DECODER_KEYS if k not in m]
  if missing:
    raise ValueError(f"model 'decoder' reads config.model.{missing[0]}"
                     f"{f' (and {missing[1:]})' if missing[1:] else ''}, which the config does "
                     f"not set; a decoder config sets all of {list(DECODER_KEYS)} (see "
                     "configs/llm_shakespeare.py)")
  knobs = {k: m[k] for k in DECODER_KEYS}
  if sum(knobs[k] is not None for k in ("path", "shape", "pretrain")) != 1:
    raise ValueError("set exactly one of config.model.path (a local Hugging Face decoder "
                     "folder), config.model.shape (DecoderConfig fields of a random model) and "
                     "config.model.pretrain (a decoder pretrained centrally and cached, "
                     "fedjax_fm.pretrain); the others None")
  for key in ("dtype", "param_dtype"):
    if knobs[key] not in DTYPES:
      raise ValueError(f"unknown config.model.{key} {knobs[key]!r}; use one of "
                       f"{sorted(DTYPES)}")
  if knobs["lora"] is None:
    raise ValueError("config.model.lora must set rank, alpha and targets (federated "
                     "fine-tuning of a decoder trains LoRA)")
  if isinstance(knobs["loss_chunk"], bool) or not isinstance(knobs["loss_chunk"], int) or \
      knobs["loss_chunk"] < 1:
    raise ValueError(f"config.model.loss_chunk must be a positive integer (sequence positions "
                     f"per vocabulary cross-entropy chunk), got {knobs['loss_chunk']!r}")
  return knobs


def random_decoder(config: DecoderConfig, lora, seed: int) -> DecoderLM:
  """A `DecoderLM` of `config` with numpy-random values drawn from the module's own init
  distributions: N(0, 0.02) matrices (transformers' initializer_range), unit norm scales, zero
  biases, LoRA ``a`` ~ N(0, 1/in) and ``b`` = 0 (`adapters.LoRA`: the fresh model computes the
  backbone's function).

  No jit at all: XLA:CPU compiles every threefry draw of a module's init separately (~0.3 s
  each), so even a tiny model's jitted init costs seconds; tests and CI build this one free."""
  build = lambda: DecoderLM(config, lora=lora, rngs=nnx.Rngs(seed))
  graphdef, shapes = nnx.split(nnx.eval_shape(build))
  rng = np.random.RandomState(seed)

  def fill(path, x):
    p = roles.leaf_path(path)
    if p.endswith("/scale"):
      value = np.ones(x.shape)
    elif p.endswith("/bias") or (decoder_component(p) != "backbone" and p.endswith("/b")):
      value = np.zeros(x.shape)
    elif decoder_component(p) != "backbone":  # LoRA a [L, in, r]
      value = rng.standard_normal(x.shape) / np.sqrt(x.shape[-2])
    else:
      value = 0.02 * rng.standard_normal(x.shape)
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(shapes)))


def decoder_model(config, data: Federation) -> ModelBundle:
  """A decoder LM with LoRA (``model.name`` ``"decoder"``), trained on next-token loss.

  Reads, all required: ``model.path`` (a local Hugging Face llama/mistral/qwen2/qwen3 folder),
  ``model.shape`` (`DecoderConfig` fields of a numpy-random model, for tests and CI) or
  ``model.pretrain`` (a decoder pretrained centrally on held-out text and cached,
  `fedjax_fm.pretrain`), the others None; ``model.lora`` (rank, alpha, targets); ``model.trainable`` / ``model.personal``
  (`decoder_roles` components, e.g. ``("lora",)`` and ``("lora_down",)``); ``model.dtype``
  (compute) and ``model.param_dtype`` (the frozen backbone's storage; LoRA stays float32);
  ``model.remat`` (a key of `decoder.REMAT_POLICIES`); ``model.loss_chunk`` (positions per
  vocabulary cross-entropy chunk). The batch keys are ``input_ids`` and ``attention_mask``.
  """
  k = _decoder_knobs(config)
  lora = decoder_lora_config(dict(k["lora"].to_dict() if hasattr(k["lora"], "to_dict")
                                  else k["lora"]))
  dtype, param_dtype = DTYPES[k["dtype"]], DTYPES[k["param_dtype"]]
  if k["pretrain"] is not None:
    k["path"] = pretrain.pretrained_decoder(k["pretrain"])
  if k["path"] is not None:
    model = from_pretrained_decoder(k["path"], dtype=dtype, param_dtype=param_dtype, lora=lora,
                                    seed=config.seed, config_overrides={"remat": k["remat"]})
  else:
    shape = k["shape"].to_dict() if hasattr(k["shape"], "to_dict") else dict(k["shape"])
    clash = sorted(set(shape) & {"dtype", "param_dtype", "remat"})
    if clash:
      raise ValueError(f"config.model.shape sets {clash}; set them as config.model.{clash[0]}")
    model = random_decoder(DecoderConfig(**shape, dtype=dtype, param_dtype=param_dtype,
                                         remat=k["remat"]), lora, config.seed)
  _check_vocabulary(data, model.config.vocab_size)
  graphdef, params = functional(model)
  role_tree = decoder_roles(params, trainable=tuple(k["trainable"]),
                            personal=tuple(k["personal"]))
  chunk = int(k["loss_chunk"])

  def generate_tokens(params, input_ids, attention_mask, max_new_tokens):
    return generate(nnx.merge(graphdef, params), input_ids, attention_mask, max_new_tokens)

  return ModelBundle(params=params, roles=role_tree, graphdef=graphdef,
                     input_keys=DECODER_INPUTS,
                     loss=lambda train: lm_loss_fn(graphdef, chunk_size=chunk),
                     derived_metrics=with_perplexity, generate=generate_tokens,
                     extras={"decoder_config": model.config})


def _check_vocabulary(data: Federation, vocab_size: int) -> None:
  """Every token id of the data must be a row of the model's embedding (XLA would clamp an
  out-of-range id silently)."""
  parts = [p for p in (data.train, data.test) if isinstance(p, FederatedData)]
  top = max((int(p.arrays["input_ids"].max(initial=0)) for p in parts
             if "input_ids" in p.arrays), default=0)
  if top >= vocab_size:
    raise ValueError(f"the data has token id {top}, beyond the model's vocabulary of "
                     f"{vocab_size}; tokenize with the model's tokenizer (config.data.tokenizer="
                     "'model') or pick the model the data was tokenized for")


def with_perplexity(metrics: dict) -> dict:
  """Adds ``<mode>/perplexity = exp(<mode>/loss)`` (and per client) to a language model's
  evaluation: the exponentiated mean next-token negative log-likelihood. The loss is a mean
  over examples of each example's per-token mean, so this is the per-token perplexity exactly
  when the examples have equal lengths (full windows), as the Shakespeare LM's all but each
  client's last."""
  out = dict(metrics)
  for key, value in metrics.items():
    mode, _, metric = key.partition("/")
    if metric in ("loss", "per_client_loss"):
      out[f"{mode}/{metric.replace('loss', 'perplexity')}"] = jnp.exp(value)
  return out
