"""FFGG (Mishchenko et al. 2023) on digit VQA with the real all-MiniLM-L6-v2: heterogeneous clients.

Clients ask different question families about digit images ("which digit?", "even?",
"greater than five?", "prime?"; 3 clients per family, 12 in all, 10 sampled per round), so one
shared answer head cannot serve them all: the head is each client's personal part y_m, the
adapters and image tokens are the global part x (the MiniLM backbone stays frozen). Each round a
sampled client fine-tunes its head for `personal_steps` SGD steps, then runs `local_steps` SGD
steps on x (Local FFGG, matching the baselines' local steps), and the server averages the deltas.

Variants (`configs/ffgg_vqa.py:<variant>[,small][,tiny]`):
  ffgg       synchronous Local FFGG (the default);
  async      updates computed at parameters up to 3 rounds stale (uniform delays);
  byzantine  20% of the sampled clients (2 of 10) send flipped updates; median of buckets of 2;
  byzantine_mean  the same attack with the plain mean (no robust aggregation), for contrast;
  byzantine_trimmed  the same attack with the coordinate-wise trimmed mean (20% cut at each end);
  median     no attack, median of buckets of 2: what the robust aggregator alone costs honest,
             heterogeneous clients;
  fedavg     FedAvg: adapters, image tokens and one head, all averaged;
  fedper     FedPer: the same split as FFGG (personal heads), FedAvg on the rest.

`small`: the set-up of RESULTS.md's isolating comparison, the first MiniLM layer only and 30
rounds evaluated every 5, long enough for the personalized models to leave the answer prior
(`benchmarks/ffgg_experiments.py` runs the table).

  python launch.py --config configs/ffgg_vqa.py --workdir runs/ffgg_vqa
  python launch.py --config configs/ffgg_vqa.py:byzantine --workdir runs/ffgg_vqa_byz
  for s in 0 1 2; do for v in ffgg async byzantine byzantine_mean fedavg fedper; do
    python launch.py --config configs/ffgg_vqa.py:$v --config.seed=$s \\
        --workdir runs/ffgg_${v}_s$s; done; done          # the RESULTS.md table
"""

import ml_collections

from configs import _algorithms, feddat_vqa

VARIANTS = ("ffgg", "async", "byzantine", "byzantine_mean", "byzantine_trimmed", "median",
            "fedavg", "fedper")
AGGREGATOR = {"byzantine": "median", "byzantine_trimmed": "trimmed_mean", "median": "median"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "").split(",") if p]
  unknown = set(parts) - {"tiny", "small", *VARIANTS}
  if unknown or len(set(parts) - {"tiny", "small"}) > 1:
    raise ValueError(f"unknown variant {arg!r} of configs/ffgg_vqa.py; use one of "
                     f"{', '.join(VARIANTS)}, optionally with ',small' and/or ',tiny'")
  tiny = "tiny" in parts
  variant = next((p for p in parts if p not in ("tiny", "small")), "ffgg")
  c = feddat_vqa.get_config(",".join(["fedavg", *(p for p in parts if p in ("small", "tiny"))]))
  c.data.partition.num_clients = 1 if tiny else 3    # clients per question family
  c.cohort_size = 2 if tiny else 10
  c.local_steps = 1 if tiny else 4
  lr = 0.5                                           # SGD everywhere, as in the paper
  if variant == "fedavg":
    c.algorithm = _algorithms.algorithm("fedavg", client_lr=lr)
  elif variant == "fedper":
    c.algorithm = _algorithms.algorithm("fedper", client_lr=lr, personal="^head/")
  else:
    c.algorithm = _algorithms.algorithm(
        "ffgg", personal="^head/", personal_lr=lr, personal_steps=1 if tiny else 2,
        server_lr=1.0, local_steps=c.local_steps, local_lr=lr,
        max_delay=3 if variant == "async" else 0,
        attack="flip" if variant.startswith("byzantine") else None,
        attacker_fraction=0.2 if variant.startswith("byzantine") else 0.0,
        aggregator=AGGREGATOR.get(variant, "mean"), trim_fraction=0.2)
  return c
