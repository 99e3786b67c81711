"""Model builders of the launcher's table (`fedjax_fm.experiment.MODELS`): config and the
training data -> a `fedjax_fm.builders.ModelBundle` (parameters, roles, graphdef, input keys and
the task loss). FedBone's split model and TAP's superset model are built next to their
algorithms' builders.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from fedjax_fm import assets, roles
from fedjax_fm.builders import Federation, ModelBundle
from fedjax_fm.models.cnn import MLP, SimpleCNN
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
