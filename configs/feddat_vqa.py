"""FedDAT (Chen et al. 2024) on digit VQA: clients differ in domain (question family).

The real all-MiniLM-L6-v2 reads the question (8 tokens) followed by the digit image as an image
CLS and 4 patch tokens of 4x4 pixels (13 tokens in all, sized for a CPU; fresh patch embeddings,
trained and shared; the pretrained text embeddings and encoder stay frozen) and answers from a
fixed set ("0".."9", "yes", "no"). Every client asks one question family
("which digit is this?", "is it even?", "is it greater than five?", "is it a prime?"), the
domain shift of the paper's setting: 8 clients, 2 per family, all sampled every round. FedDAT:
three adapters per layer (personal A_c, shared A_s, the frozen copy of A_s) and personal heads.

Variants (`configs/feddat_vqa.py:<variant>[,small][,tiny]`) are the paper's baselines, with one
shared adapter per layer of the same size, the same AdamW client optimizer and learning rate, and
the same local steps, and FedDAT's ablations:
  fedavg        FedAvg-adapter: adapter, head and image tokens averaged (one shared head);
  fedprox       FedProx-adapter: the same with a proximal term (mu = 0.01);
  local         Local: each client trains its own adapter, head and image tokens, nothing shared;
  fedper        FedAvg with personal heads (FedPer): the head stays on the client, the adapter
                and image tokens are averaged: FedDAT's personal heads without its adapters;
  fedprox_heads FedProx (mu = 0.01) with personal heads;
  fedper_adapter FedPer with FedDAT's parameters: a personal adapter A_c beside the shared A_s
                (mixed 0.5/0.5, both in every forward) and a personal head, one step per batch,
                no frozen copy, no distillation;
  no_mkd        FedDAT without mutual distillation (each sub-step on its task loss alone);
  no_dat        FedDAT without the dual-adapter teacher: A_c alone (teacher_weights (1, 0)) is
                the personal model and the teacher of A_s.
`small` is the isolating comparison's set-up (RESULTS.md): the first MiniLM layer only and 30
rounds evaluated every 5, so that 30 runs (5 methods, 2 learning rates, 3 seeds) fit a 2-core
CPU (`benchmarks/feddat_experiments.py`).

  python launch.py --config configs/feddat_vqa.py --workdir runs/feddat_vqa
  python launch.py --config configs/feddat_vqa.py:fedavg --workdir runs/feddat_vqa_fedavg
  python launch.py --config configs/feddat_vqa.py:tiny
  python launch.py --config configs/feddat_vqa.py:no_mkd,small --config.seed=1 \\
      --config.algorithm.hparams.client_lr=1e-4 --workdir runs/x   # one run of the table
"""

import ml_collections

from configs import _algorithms, feddat_text

BASELINES = ("fedavg", "fedprox", "local", "fedper", "fedprox_heads", "fedper_adapter")
ABLATIONS = ("no_mkd", "no_dat")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "").split(",") if p]
  unknown = set(parts) - {"tiny", "small", "feddat", *BASELINES, *ABLATIONS}
  if unknown or len(set(parts) - {"tiny", "small"}) > 1:
    raise ValueError(f"unknown variant {arg!r} of configs/feddat_vqa.py; use one of feddat, "
                     f"{', '.join(BASELINES + ABLATIONS)}, optionally with ',small' and/or "
                     "',tiny'")
  tiny = "tiny" in parts
  c = feddat_text.get_config("tiny" if tiny else None)
  c.data = ml_collections.ConfigDict(dict(
      name="digits_vqa", test_fraction=0.2, max_length=8,   # the longest question: 8 tokens
      empty_clients="error",   # or "exclude": see configs/digits.py
      families=("identity", "parity", "greater_than_five", "prime"),
      partition=dict(kind="iid", num_clients=2)))   # clients per family
  c.model.image = dict(image_size=8, patch_size=4, num_channels=1)   # 4 patch tokens
  c.model.trainable = ("adapters/personal", "adapters/shared", "head", "image_embeddings")
  c.rounds, c.eval_every, c.cohort_size = 6, 3, 8
  if "small" in parts and not tiny:
    c.model.num_layers = 1
    c.rounds, c.eval_every, c.checkpoint_every = 30, 5, 30
  if "no_mkd" in parts:
    c.algorithm.hparams.mutual_distillation = False
  if "no_dat" in parts:
    c.algorithm.hparams.teacher_weights = (1.0, 0.0)
  method = next((p for p in parts if p in BASELINES), None)
  if method:
    c.model.adapters.names = ("shared",)
    c.model.trainable = ("adapters", "head", "image_embeddings")
    c.model.personal = ("head",) if method == "fedprox_heads" else ()
    hparams = dict(client_lr=c.algorithm.hparams.client_lr, client_optimizer="adamw")
    if method.startswith("fedprox"):
      hparams["mu"] = 0.01
    if method == "fedper_adapter":
      c.model.adapters.names = ("personal", "shared")
      hparams["personal"] = "^head/|/adapters/personal/"
    c.algorithm = _algorithms.algorithm(method.split("_")[0], **hparams)
  if tiny:
    c.rounds, c.eval_every = 2, 2
    c.data.families = ("identity", "parity")
    c.data.partition.num_clients = 2
    c.data.test_fraction = 0.05   # evaluating every test question is most of a tiny run's time
    c.cohort_size = 2
  return c
