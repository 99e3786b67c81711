"""LoRA for decoder LMs and the roles of a `DecoderLM`'s parameters.

LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") on any of a decoder
layer's seven projections: attention ``q``, ``k``, ``v``, ``o`` and the SwiGLU MLP's ``gate``,
``up``, ``down``. Each adapted projection ``W x`` becomes ``W x + (alpha / r) x A B`` with A
Gaussian and B zero (`fedjax_fm.models.adapters.LoRA`), so a fresh model computes exactly what
the pretrained one does. The factors are stored in float32 even when the backbone is bf16
(DESIGN.md "Decoder LLMs": one bf16 backbone copy, fp32 LoRA and optimizer state per client).

Parameter paths (scanned layers: every ``layers/...`` leaf has a leading layer axis):

    layers/attention/lora_{q,k,v,o}/{a,b}        [L, in, r], [L, r, out]
    layers/mlp/lora_{gate,up,down}/{a,b}

Roles (`decoder_roles`): the backbone is frozen; LoRA is shared. Because the layers are one
stacked array per kind, a role is per kind, not per layer: personal LoRA is chosen by target
(``personal=("lora_down",)`` keeps the MLP down-projection's factors on the client, FedPer-style),
not by "the last n layers".

Example::

    model = DecoderLM(config, lora={"rank": 8, "alpha": 16.0, "targets": ("q", "v")},
                      rngs=nnx.Rngs(0))
    roles = decoder_roles(nnx.to_pure_dict(nnx.state(model)), personal=("lora_v",))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from fedjax_fm import roles as roles_lib

PyTree = Any

DECODER_LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class DecoderLoRAConfig:
  """Low-rank updates on chosen projections of every decoder layer.

  Attributes:
    rank: r, the rank of A B.
    alpha: the update is scaled by alpha / r.
    targets: a non-empty subset of `DECODER_LORA_TARGETS`.
    param_dtype: storage dtype of the factors (float32 by default, whatever the backbone's).
  """
  rank: int = 8
  alpha: float = 16.0
  targets: Sequence[str] = ("q", "v")
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    unknown = [t for t in self.targets if t not in DECODER_LORA_TARGETS]
    if unknown or not self.targets:
      raise ValueError(f"LoRA targets {self.targets} must be a non-empty subset of "
                       f"{DECODER_LORA_TARGETS}")
    if self.rank < 1:
      raise ValueError(f"LoRA rank {self.rank} must be >= 1")


def decoder_lora_config(spec: DecoderLoRAConfig | Mapping[str, Any] | None
                        ) -> DecoderLoRAConfig | None:
  """Accepts a `DecoderLoRAConfig`, a dict of its fields (e.g. from a config file) or None."""
  if spec is None or isinstance(spec, DecoderLoRAConfig):
    return spec
  if isinstance(spec, Mapping):
    return DecoderLoRAConfig(**spec)
  raise ValueError(f"lora must be a DecoderLoRAConfig or a dict of its fields, got {spec!r}")


def decoder_component(path: str) -> str:
  """What a `DecoderLM` parameter path belongs to: ``backbone`` or ``lora_<target>``."""
  for part in path.split("/"):
    if part.startswith("lora_"):
      return part
  return "backbone"


def _selects(name: str, component: str) -> bool:
  return name == component or (name == "lora" and component.startswith("lora_"))


def decoder_roles(params: PyTree, *, trainable: Sequence[str] = ("lora",),
                  personal: Sequence[str] = ()) -> PyTree:
  """The role pytree (`fedjax_fm.roles`) of a `DecoderLM`'s parameters.

  Args:
    params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s), e.g.
      ``nnx.to_pure_dict(nnx.state(model))``.
    trainable: components trained and shared: ``lora`` (all LoRA factors), ``lora_<target>``
      (one target's), or ``backbone`` (full fine-tuning).
    personal: components trained but kept on the client, e.g. ``("lora_down",)``; checked
      before `trainable`.

  Returns:
    A pytree of role strings with the structure of `params`: frozen, shared or personal.

  Raises:
    ValueError: for a component name that matches no parameter (a typo or a missing target).
  """
  return roles_lib.component_roles(params, decoder_component, _selects, trainable=trainable,
                                   personal=personal, check=list(trainable) + list(personal))
