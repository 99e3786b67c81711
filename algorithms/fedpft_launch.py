"""FedPFT's launch wiring: config -> the server's public split, the algorithm, its evaluator.

launch.py calls `build_algorithm` for ``config.algorithm.name == "fedpft"``
(`configs/fedpft_text.py`): FedPFT or one of its baselines (`VARIANTS`) on the Shakespeare
play-classification clients, distilling on the public data of `shakespeare_public_inputs`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import optax

from fedjax_fm import models
from fedjax_fm.algorithms.fedpft import fedpft
from fedjax_fm.algorithms.fedpft_alignment import default_align_optimizer
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


def build_algorithm(config, graphdef, params, role_tree, input_keys, execution):
  """launch.py's builder: FedPFT or a baseline (``hparams.variant``) on the Shakespeare
  play-classification clients, with the public split of `shakespeare_public_inputs` (one
  fixed draw, the same for every seed, as a server's corpus would be).

  Returns:
    (algorithm, test data -> evaluate function); evaluation is of the full FM with the
    aggregated LoRA and head (personalized: each client's test split; global: pooled; FedPFT
    keeps no personal state, so the two are the same model).
  """
  hp = config.algorithm.hparams.to_dict()
  unknown = sorted(set(hp) - set(HPARAMS))
  if unknown:
    raise ValueError(f"algorithm 'fedpft' takes no hyperparameter {unknown}; it takes "
                     f"{sorted(HPARAMS)}")
  variant = hp.get("variant", "fedpft")
  if variant not in VARIANTS:
    raise ValueError(f"unknown fedpft variant {variant!r}; use one of {VARIANTS}")
  if config.data.name != "shakespeare_play":
    raise ValueError(f"fedpft's public split is built for data.name='shakespeare_play', got "
                     f"{config.data.name!r}")
  full = variant == "full"
  aligned = variant == "fedpft"
  public = None
  if aligned:
    public = shakespeare_public_inputs(
        num_plays_held=config.data.num_plays, count=hp.get("public_examples", 256),
        max_length=config.data.max_length, seed=0, unit=config.data.unit,
        input_keys=input_keys)
  alg = fedpft(model_forward(graphdef, input_keys), role_tree, params,
               keep_neurons=None if full else hp.get("keep_neurons", 384),
               retained_layers=() if full else tuple(hp.get("retained_layers", ())),
               public=public,
               layer_align_steps=hp.get("layer_align_steps", 100) if aligned else 0,
               align_every=hp.get("align_every", 2) if aligned else 0,
               align_steps=hp.get("align_steps", 10) if aligned else 0,
               align_batch_size=hp.get("align_batch_size", 16),
               align_retained_ratio=hp.get("align_retained_ratio", 0.5),
               alpha=hp.get("alpha", 0.01), product_grad=hp.get("product_grad", True),
               active_threshold=hp.get("active_threshold", 1e-2),
               align_optimizer=default_align_optimizer(hp.get("align_lr", 6e-4)),
               client_optimizer=optax.adam(hp.get("client_lr", 8e-4)),
               weighted=hp.get("weighted", True), execution=execution)
  eval_loss = models.classification_loss(graphdef, input_keys, train=False)
  return alg, lambda test_data: make_evaluator(eval_loss, test_data)
