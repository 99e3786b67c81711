"""FedDAT on a decoder LM: dual LoRA (client A_c, global A_s, frozen copy Ā_s) with mutual
distillation on next-token logits.

`fedjax_fm.algorithms.feddat` runs FedDAT on any model seen as ``logits_fn(params, batch, rng,
adapter_weights)`` whose adapters live under ``adapters/<name>/``. A `DecoderLM` has one LoRA
per projection, so here the three adapters are three LoRA trees of rank r, kept apart in the
parameters::

    {"backbone": the decoder's parameters without LoRA (frozen),
     "adapters": {"personal": LoRA, "shared": LoRA, "frozen": LoRA}}

and a mix ``sum_n w_n * (alpha / r) x A_n B_n`` is computed as ONE LoRA of rank 3r: the factors
concatenated along the rank axis, ``A = [A_c | A_s | Ā_s]`` and ``B = [w_c B_c; w_s B_s;
w_copy B̄_s]``, with alpha 3 alpha so the scale alpha / r is unchanged. So the decoder, its
scanned layers, chunking and generation are used as they are, and a mix costs one rank-3r
LoRA (the weight-0 adapters are multiplied by zero, not skipped).

Distillation is per token: the task loss is next-token cross-entropy (mean over each
sequence's predicted tokens) and the KL is `distill.token_kl_per_example` (mean over positions;
padding positions carry zero logits in every forward and do not count). The logits are the
full ``[B, T, vocab]`` array (FedDAT's teacher logits ride in the batch), fine for a character
vocabulary; for a 128k-token vocabulary it is the largest tensor of the round (left to do:
chunked distillation, as `decoder_loss` chunks the cross-entropy).

There is no task head: A_c is the only personal parameter. A_c starts from its own Gaussian
draw (seed + 1), A_s from the model's LoRA init, Ā_s as a copy of A_s; every B starts at zero,
so the fresh model is the pretrained one under every mix.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm.algorithms import feddat as feddat_lib
from fedjax_fm.builders import (Built, Federation, ModelBundle, chain_config, make_sampler,
                                read_hparams)
from fedjax_fm.evaluate import make_evaluator
from fedjax_fm.models.decoder import DecoderConfig, DecoderLM
from fedjax_fm.models.decoder_generate import generate
from fedjax_fm.models.decoder_lora import DecoderLoRAConfig

PyTree = Any
NAMES = ("personal", "shared", "frozen")


def split_lora(tree: Mapping[str, Any]) -> tuple[dict, dict]:
  """A decoder's parameter dict -> (without the ``lora_*`` subtrees, only them)."""
  rest, lora = {}, {}
  for key, value in tree.items():
    if key.startswith("lora_"):
      lora[key] = value
    elif isinstance(value, Mapping):
      r, l = split_lora(value)
      rest[key] = r
      if l:
        lora[key] = l
    else:
      rest[key] = value
  return rest, lora


def join(backbone: Mapping[str, Any], lora: Mapping[str, Any]) -> dict:
  """Inverse of `split_lora`."""
  out = dict(backbone)
  for key, value in lora.items():
    out[key] = join(out[key], value) if key in out and isinstance(value, Mapping) else value
  return out


def dual_lora_params(params: PyTree, roles: PyTree, seed: int) -> tuple[dict, dict]:
  """FedDAT's parameters and roles from a rank-r LoRA decoder's (`models.builders.decoder_model`).

  Raises:
    ValueError: a model without LoRA, or with trained backbone leaves.
  """
  backbone, lora = split_lora(params)
  backbone_roles, _ = split_lora(roles)
  if not lora:
    raise ValueError("FedDAT on a decoder needs config.model.lora (its three adapters are LoRA)")
  trained = [roles_lib.leaf_path(p) for p, r in
             jax.tree_util.tree_leaves_with_path(backbone_roles) if r != roles_lib.FROZEN]
  if trained:
    raise ValueError(f"FedDAT on a decoder trains its three LoRA adapters only, but {trained[0]} "
                     "is trainable; set config.model.trainable=('lora',) and personal=()")
  rng = np.random.RandomState(seed + 1)

  def fresh(path, x):  # A_c's own draw: A ~ N(0, 1/in), B = 0
    if roles_lib.leaf_path(path).endswith("/a"):
      return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(x.shape[-2]), x.dtype)
    return jnp.zeros_like(x)

  adapters = {"personal": jax.tree_util.tree_map_with_path(fresh, lora), "shared": lora,
              "frozen": jax.tree_util.tree_map(jnp.array, lora)}
  role = {"personal": roles_lib.PERSONAL, "shared": roles_lib.SHARED, "frozen": roles_lib.FROZEN}
  out_roles = {"backbone": jax.tree_util.tree_map(lambda _: roles_lib.FROZEN, backbone),
               "adapters": {n: jax.tree_util.tree_map(lambda _, r=role[n]: r, lora)
                            for n in NAMES}}
  return {"backbone": backbone, "adapters": adapters}, out_roles


def mixed_params(params: Mapping[str, Any], weights: Mapping[str, Any]) -> dict:
  """The rank-3r decoder parameters of the mix ``weights`` (adapter name -> weight)."""
  adapters = [params["adapters"][n] for n in NAMES]
  w = [weights.get(n, 0.0) for n in NAMES]

  def combine(path, *leaves):
    if roles_lib.leaf_path(path).endswith("/a"):
      return jnp.concatenate(leaves, axis=-1)
    return jnp.concatenate([jnp.asarray(wi, x.dtype) * x for wi, x in zip(w, leaves)], axis=-2)

  return join(params["backbone"], jax.tree_util.tree_map_with_path(combine, *adapters))


def mix_graphdef(config: DecoderConfig, lora: DecoderLoRAConfig) -> nnx.GraphDef:
  """The graph of the decoder `config` with rank-3r LoRA (alpha 3 alpha: the same alpha / r)."""
  big = DecoderLoRAConfig(rank=3 * lora.rank, alpha=3 * lora.alpha, targets=lora.targets,
                          param_dtype=lora.param_dtype)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, lora=big,
                                                           rngs=nnx.Rngs(0))))
  return graphdef


def lm_logits_fn(graphdef: nnx.GraphDef):
  """FedDAT's ``logits_fn`` of the decoder: [B, T, vocab] float32 logits of a mix, zero at
  padding positions (so the per-token KL leaves them out)."""
  def logits_fn(params, batch, rng, adapter_weights):
    del rng  # no dropout
    model = nnx.merge(graphdef, mixed_params(params, adapter_weights))
    mask = batch["attention_mask"]
    return model(batch["input_ids"], mask) * mask[..., None].astype(jnp.float32)

  return logits_fn


def lm_task_loss(logits: jax.Array, batch: Mapping[str, jax.Array]):
  """Next-token cross-entropy and accuracy from full logits, per example, averaged over the
  positions `decoder_loss.causal_lm_loss` counts (both tokens real)."""
  ids, mask = batch["input_ids"], batch["attention_mask"]
  targets = ids[:, 1:]
  weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  correct = (jnp.argmax(logits[:, :-1], -1) == targets).astype(jnp.float32)
  count = jnp.maximum(weights.sum(-1), 1.0)
  return (nll * weights).sum(-1) / count, {"accuracy": (correct * weights).sum(-1) / count}


HPARAMS = ("client_lr", "teacher_weights", "temperature", "distill", "mutual_distillation",
           "weighted")


def build(config, model: ModelBundle, data: Federation, execution) -> Built:
  """`fedjax_fm.builders.AlgorithmBuilder` of FedDAT on ``model.name = "decoder"`` (called by
  `feddat_launch.build`): AdamW clients at ``client_lr``, the personalized evaluation and
  samples with the DAT mix, the global ones with A_s alone; perplexity added."""
  hp = read_hparams(config, HPARAMS)
  if hp["distill"] != "softmax_tokens":
    raise ValueError(f"FedDAT on a decoder distils per token: set "
                     f"config.algorithm.hparams.distill='softmax_tokens', got {hp['distill']!r}")
  decoder_config = model.extras["decoder_config"]
  lora = nnx.merge(model.graphdef, model.params).lora
  params, roles = dual_lora_params(model.params, model.roles, config.seed)
  graphdef = mix_graphdef(decoder_config, lora)
  logits_fn = lm_logits_fn(graphdef)
  alg = feddat_lib.feddat(
      logits_fn, roles, params, task_loss=lm_task_loss, adapter_names=NAMES,
      client_optimizer=feddat_lib.default_client_optimizer(hp["client_lr"]),
      teacher_weights=tuple(hp["teacher_weights"]), temperature=hp["temperature"],
      distill=hp["distill"], mutual_distillation=hp["mutual_distillation"],
      weighted=hp["weighted"], aggregation=chain_config(config, data.train.num_clients),
      execution=execution)
  mixes = feddat_lib.adapter_weights_by_mode(NAMES, tuple(hp["teacher_weights"]))
  personal = make_evaluator(feddat_lib.adapter_mix_loss(logits_fn, lm_task_loss, mixes["dat"]),
                            data.test, modes=("personalized",))
  global_ = make_evaluator(feddat_lib.adapter_mix_loss(logits_fn, lm_task_loss,
                                                       mixes["global"]),
                           data.test, modes=("global",))
  derive = model.derived_metrics or (lambda m: m)
  evaluate = lambda server_params, clients: derive({**personal(server_params, clients),
                                                    **global_(server_params, clients)})
  samples = None
  if data.prompts is not None:
    def generator(mix):
      return lambda p, ids, mask, n: generate(nnx.merge(graphdef, mixed_params(p, mix)), ids,
                                              mask, n)
    samples = make_sampler(generator(mixes["dat"]), data.prompts, data.test.num_clients,
                           generate_global=generator(mixes["global"]))
  # FedDAT's params differ from the model builder's: the run starts from these.
  return Built(alg, evaluate, samples, params=params)


build.hparams = HPARAMS
