"""FedPFT's builder: config -> the server's public split, the algorithm, its evaluator.

`build` is the launcher's builder of ``config.algorithm.name == "fedpft"``
(`configs/fedpft_text.py`): FedPFT or one of its baselines (`VARIANTS`) on the Shakespeare
play-classification clients, distilling on the public data of `shakespeare_public_inputs`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import optax

from fedjax_fm.algorithms.fedpft import decoder_proxy, fedpft
from fedjax_fm.algorithms.fedpft_alignment import default_align_optimizer
from fedjax_fm.builders import (Built, Federation, ModelBundle, chain_config,
                                model_evaluation, read_hparams)
from fedjax_fm.data import shakespeare, text
from fedjax_fm.evaluate import make_evaluator
from fedjax_fm.models.sub_fm import model_forward

# Baselines by name: the sub-FM without alignment (FedOT-like) and FedAvg-LoRA on the full FM.
VARIANTS = ("fedpft", "fedot", "full")
HPARAMS = ("variant", "client_lr", "keep_neurons", "retained_layers", "layer_align_steps",
           "align_every", "align_steps", "align_batch_size", "align_retained_ratio", "align_lr",
           "alpha", "product_grad", "active_threshold", "weighted", "public_examples")


def shakespeare_public_inputs(*, num_plays_held: int, count: int, max_length: int, seed: int,
                              unit: str = "speech", min_chars: int = 20,
                              input_keys: Sequence[str] = ("input_ids", "attention_mask",
                                                           "token_type_ids")
                              ) -> dict[str, np.ndarray]:
  """The server's public distillation data for the Shakespeare play-classification clients.

  The clients hold speeches of the `num_plays_held` plays with the most speeches
  (`fedjax_fm.data.suite.minilm_play_classification`, same `unit` and `min_chars`, so the same
  play ranking); the public split is `count` random speeches of the *other* plays, tokenised
  with the all-MiniLM-L6-v2 tokenizer: disjoint from every client's train and test data.
  """
  texts, labels, _, _ = shakespeare.classification_examples(
      shakespeare.load_records(), target="play", unit=unit, min_chars=min_chars)
  pool = texts[labels >= num_plays_held]
  if count > len(pool):
    raise ValueError(f"public_examples={count} but only {len(pool)} speeches of other plays; "
                     "lower config.algorithm.hparams.public_examples")
  rng = np.random.default_rng([seed, 0x9F7])
  chosen = pool[np.sort(rng.choice(len(pool), count, replace=False))]
  encoded = text.minilm_tokenizer(max_length).encode(chosen.tolist())
  return {k: np.asarray(encoded[k]) for k in input_keys}


def build(config, model: ModelBundle, data: Federation, execution) -> Built:
  """`fedjax_fm.builders.AlgorithmBuilder` of FedPFT or a baseline (``hparams.variant``) on the
  Shakespeare play-classification clients, with the public split of
  `shakespeare_public_inputs` (one fixed draw, the same for every seed, as a server's corpus
  would be). Evaluation is of the full FM with the aggregated LoRA and head (personalized: each
  client's test split; global: pooled; FedPFT keeps no personal state, so the two are the same
  model). The variants ignore what they do not use: ``full`` the sub-FM's sizes, ``fedot`` and
  ``full`` every alignment knob.
  """
  hp = read_hparams(config, HPARAMS)
  variant = hp["variant"]
  if variant not in VARIANTS:
    raise ValueError(f"unknown fedpft variant {variant!r}; use one of {VARIANTS}")
  if config.model.name == "decoder":
    return _build_decoder(config, model, data, execution, hp)
  if config.data.name != "shakespeare_play":
    raise ValueError(f"fedpft's public split is built for data.name='shakespeare_play', got "
                     f"{config.data.name!r}")
  full = variant == "full"
  aligned = variant == "fedpft"
  public = None
  if aligned:
    public = shakespeare_public_inputs(
        num_plays_held=config.data.num_plays, count=hp["public_examples"],
        max_length=config.data.max_length, seed=0, unit=config.data.unit,
        input_keys=model.input_keys)
  alg = fedpft(model_forward(model.graphdef, model.input_keys), model.roles, model.params,
               keep_neurons=None if full else hp["keep_neurons"],
               retained_layers=() if full else tuple(hp["retained_layers"]),
               public=public,
               layer_align_steps=hp["layer_align_steps"] if aligned else 0,
               align_every=hp["align_every"] if aligned else 0,
               align_steps=hp["align_steps"] if aligned else 0,
               align_batch_size=hp["align_batch_size"],
               align_retained_ratio=hp["align_retained_ratio"],
               alpha=hp["alpha"], product_grad=hp["product_grad"],
               active_threshold=hp["active_threshold"],
               align_optimizer=default_align_optimizer(hp["align_lr"]),
               client_optimizer=optax.adam(hp["client_lr"]),
               weighted=hp["weighted"],
               aggregation=chain_config(config, data.train.num_clients), execution=execution)
  return Built(alg, make_evaluator(model.loss(False), data.test))


build.hparams = HPARAMS


def _build_decoder(config, model: ModelBundle, data: Federation, execution, hp) -> Built:
  """FedPFT on a decoder LM (`decoder_proxy`): the sub-FM of the ``fedot`` variant or the full
  FM (``full``); the aligned variant is refused, as `decoder_proxy` does not support the
  alignments yet. Evaluation as `fedjax_fm.builders.loss_builder`'s: the full FM with the
  aggregated LoRA, the model's derived metrics (perplexity) and its generation samples
  (`model_evaluation`)."""
  if hp["variant"] == "fedpft":
    raise ValueError("fedpft's layer- and neuron-level alignment is not supported on a decoder "
                     "yet; set config.algorithm.hparams.variant='fedot' (the sub-FM) or 'full'")
  full = hp["variant"] == "full"
  alg = fedpft(decoder_proxy(model.loss(True)), model.roles, model.params,
               keep_neurons=None if full else hp["keep_neurons"],
               client_optimizer=optax.adam(hp["client_lr"]), weighted=hp["weighted"],
               aggregation=chain_config(config, data.train.num_clients), execution=execution)
  return Built(alg, *model_evaluation(model, data, alg.personal_rows))
