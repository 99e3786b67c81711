"""Parameter-efficient fine-tuning modules: bottleneck adapters (several per layer) and LoRA.

Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"):
down-projection, nonlinearity, up-projection and a residual connection, placed on the output of
each layer's feed-forward block before it joins the layer's residual stream. The up-projection
starts at zero, so a fresh adapter is the identity and a freshly adapted model computes exactly
what the pretrained backbone computes.

A layer may hold several named adapters mixed by weights given at call time, which FedDAT needs
(Chen et al. 2024, "FedDAT: An Approach for Foundation Model Finetuning in Multi-Modal
Heterogeneous Federated Learning"): a personal, a shared and a frozen copy combined as
``h + sum_i w_i * delta_i(h)``, i.e. the weighted sum of the adapters' outputs when the weights sum
to one, and the identity when every weight is zero.

LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen projection
``W x`` becomes ``W x + (alpha / r) * B A x`` with A random and B zero at initialisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models import activations

# Projections LoRA can attach to: attention query/key/value/output and the two FFN matrices.
LORA_TARGETS = ("q", "k", "v", "o", "ffn_in", "ffn_out")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Named bottleneck adapters added after the feed-forward block of every encoder layer.

  Attributes:
    names: one adapter per name in each layer; the names appear in parameter paths
      (``encoder/layers/<i>/adapters/<name>/...``) and as keys of `adapter_weights` at call time.
    bottleneck: width of the down-projection.
    activation: nonlinearity between the projections (a key of
      `fedjax_fm.models.activations.ACTIVATIONS`).
  """
  names: Sequence[str] = ("shared",)
  bottleneck: int = 16
  activation: str = "relu"

  def __post_init__(self):
    object.__setattr__(self, "names", tuple(self.names))
    if not self.names or len(set(self.names)) != len(self.names):
      raise ValueError(f"adapter names {self.names} must be non-empty and distinct; "
                       "e.g. ('personal', 'shared', 'frozen')")
    for name in self.names:
      if not name or "/" in name:
        raise ValueError(f"adapter name {name!r} must be non-empty without '/'; it becomes a "
                         "path segment")
    if self.bottleneck < 1:
      raise ValueError(f"adapter bottleneck {self.bottleneck} must be >= 1")
    activations.activation(self.activation)  # an unknown name fails here, not at first call


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank updates on chosen projections of every encoder layer.

  Attributes:
    rank: r, the rank of B A.
    alpha: the update is scaled by alpha / r (the paper's convention, so changing r does not
      change the initial learning dynamics much).
    targets: a subset of `LORA_TARGETS`; parameters live at ``.../lora_<target>/{a,b}``.
  """
  rank: int = 4
  alpha: float = 8.0
  targets: Sequence[str] = ("q", "v")

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    unknown = [t for t in self.targets if t not in LORA_TARGETS]
    if unknown or not self.targets:
      raise ValueError(f"LoRA targets {self.targets} must be a non-empty subset of {LORA_TARGETS}")
    if self.rank < 1:
      raise ValueError(f"LoRA rank {self.rank} must be >= 1")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def adapter_config(spec: AdapterConfig | Mapping[str, Any] | None) -> AdapterConfig | None:
  """Accepts an `AdapterConfig`, a dict of its fields (from an ml_collections config) or None."""
  if spec is None or isinstance(spec, AdapterConfig):
    return spec
  if isinstance(spec, Mapping):
    return AdapterConfig(**spec)
  raise ValueError(f"adapters must be an AdapterConfig or a dict of its fields, got {spec!r}")


def lora_config(spec: LoRAConfig | Mapping[str, Any] | None) -> LoRAConfig | None:
  """Accepts a `LoRAConfig`, a dict of its fields or None."""
  if spec is None or isinstance(spec, LoRAConfig):
    return spec
  if isinstance(spec, Mapping):
    return LoRAConfig(**spec)
  raise ValueError(f"lora must be a LoRAConfig or a dict of its fields, got {spec!r}")


def over_tokens(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """fn applied to `x` [..., d] flattened to [tokens, d], the result reshaped back.

  A trained projection of a [B, T, d] input has a weight gradient contracting B and T; XLA:CPU
  lowers that by first writing the output gradient transposed, a strided copy that cost 15% of
  a W3 decoder step (BENCHMARKS.md). On [tokens, d] the gradient is one plain matmul.
  """
  out = fn(x.reshape(-1, x.shape[-1]))
  return out.reshape(*x.shape[:-1], out.shape[-1])


class BottleneckAdapter(nnx.Module):
  """h -> h + up(act(down(h))), with `up` zero-initialised so a fresh adapter is the identity."""

  def __init__(self, features: int, bottleneck: int, activation: Callable[[jax.Array], jax.Array],
               *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
    self.down = nnx.Linear(features, bottleneck, dtype=dtype, param_dtype=param_dtype,
                           kernel_init=nnx.initializers.normal(1e-2), rngs=rngs)
    self.up = nnx.Linear(bottleneck, features, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.activation = activation

  def delta(self, h: jax.Array) -> jax.Array:
    """The adapter's residual branch, up(act(down(h)))."""
    return over_tokens(lambda t: self.up(self.activation(self.down(t))), h)

  def __call__(self, h: jax.Array) -> jax.Array:
    return h + self.delta(h)


def resolve_adapter_weights(names: Sequence[str],
                            weights: Mapping[str, Any] | None) -> dict[str, Any]:
  """Weights per adapter name: uniform 1/n when `weights` is None, 0 for names left out.

  Raises:
    ValueError: if `weights` names an adapter the model does not have.
  """
  if weights is None:
    return {name: 1.0 / len(names) for name in names}
  unknown = sorted(set(weights) - set(names))
  if unknown:
    raise ValueError(f"adapter_weights name adapters {unknown} that the model does not have; "
                     f"its adapters are {list(names)}")
  return {name: weights.get(name, 0.0) for name in names}


def mix_adapters(adapters: Mapping[str, BottleneckAdapter], h: jax.Array,
                 weights: Mapping[str, Any] | None) -> jax.Array:
  """h + sum_i w_i * delta_i(h): the w-weighted sum of the adapters' outputs (FedDAT's mix).

  Args:
    adapters: name -> adapter.
    h: the feed-forward block's output, [..., features].
    weights: name -> weight (Python number or traced scalar, so one compiled model serves every
      mix); None means uniform. A weight that is the Python number 0 skips its adapter.

  Returns:
    The mixed output, shaped like `h`.
  """
  resolved = resolve_adapter_weights(list(adapters), weights)
  out = h
  for name, adapter in adapters.items():
    w = resolved[name]
    if isinstance(w, (int, float)) and w == 0:
      continue
    out = out + jnp.asarray(w, h.dtype) * adapter.delta(h)
  return out


class LoRA(nnx.Module):
  """The low-rank branch x -> (alpha / r) * x A B of a frozen projection.

  `a` [in, r] starts Gaussian with std 1/sqrt(in), `b` [r, out] starts at zero, so the adapted
  projection equals the pretrained one at initialisation (Hu et al. 2022, Sec. 4.1).
  """

  def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *,
               rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
    self.a = nnx.Param(jax.random.normal(rngs.params(), (in_features, rank), param_dtype)
                       / jnp.sqrt(jnp.asarray(in_features, param_dtype)))
    self.b = nnx.Param(jnp.zeros((rank, out_features), param_dtype))
    self.scale = alpha / rank
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
    return over_tokens(lambda t: (t @ a) @ b * jnp.asarray(self.scale, dtype), x.astype(dtype))


def maybe_lora(config: LoRAConfig | None, target: str, in_features: int, out_features: int, *,
               rngs: nnx.Rngs, dtype: Any, param_dtype: Any) -> LoRA | None:
  """A LoRA branch for `target` if `config` asks for one, else None."""
  if config is None or target not in config.targets:
    return None
  return LoRA(in_features, out_features, config.rank, config.alpha, rngs=rngs, dtype=dtype,
              param_dtype=param_dtype)


def with_lora(base: jax.Array, lora: LoRA | None, x: jax.Array) -> jax.Array:
  """base + lora(x), or base when there is no LoRA branch."""
  return base if lora is None else base + lora(x).astype(base.dtype)
