"""TAP (Lee et al. 2025) on the federation suite: six modality-task pairs, one jitted round.

Client groups (`fedjax_fm.data.suite`), one per modality-task pair: digit classification,
denoising (dense regression) and ink segmentation (dense classification) on images; next
character prediction and play classification on Shakespeare text; digit VQA on image + text.
The server holds the superset model (`fedjax_fm.models.tap`): an image encoder, the real
all-MiniLM-L6-v2 text embeddings and first fusion layer (frozen, LoRA on q and v), shared,
per-modality and per-task expert adapters, one head per task. Each round samples `cohort_size`
clients of every group; stage 2 (post-FL distillation) runs in the evaluation after the last
round (`eval_every = rounds`), which reports TAP (``personalized/...``) and the baselines
FedAvg (``global/...``), FedAvg + fine-tuning (``global_ft/...``) and, in the ``local``
variant, Local training (``personal_fl/...``).

Sizes are cut for a shared 2-core CPU (short text, few clients, 12 rounds); the reference's
learning rates (3e-4 peak after 20 warm-up rounds) barely move a model in 12 rounds of 4 steps,
so the peak is 2e-3 after 3 rounds. A 6-pair run is 5-7 minutes on a 2-core CPU: about a minute
compiling, about 6 s per round, 1-2 minutes for stage 2 over all 25 clients (set
JAX_COMPILATION_CACHE_DIR to reuse compiled programs across runs). Margins and distillation
weights follow the reference (FLAVA): delta 0.005 for text classification and image generation
(here denoising), 0.01 otherwise; lambda 2e-3, x500 for text classification.

  python launch.py --config configs/tap_suite.py --workdir /tmp/runs/tap_s0 --config.seed=0
  python launch.py --config configs/tap_suite.py:tiny --workdir /tmp/runs/tap_tiny
  python launch.py --config configs/tap_suite.py:local --workdir /tmp/runs/local_s0
  python launch.py --config configs/tap_suite.py:no_replacement --workdir /tmp/runs/norep_s0
  python launch.py --config configs/tap_suite.py:no_distill --workdir /tmp/runs/nokd_s0
  python launch.py --config configs/tap_suite.py:pairs2 --workdir /tmp/runs/pairs2_s0
  python launch.py --config configs/tap_suite.py:pairs8 --workdir /tmp/runs/pairs8_s0

Multi-task clients (``multitask``, combinable: ``configs/tap_suite.py:train_replacement,multitask``):
the isolating set-up of RESULTS.md's TAP section (`benchmarks/tap_experiments.py`). Three tasks
in two groups: digit classification on images (5 clients), and 4 multi-task text clients each
holding a play-classification and a speaker-classification data set (``data.multitask``), so
replacement decides per task and can swap one task's paths while keeping the other's. 40
rounds, stage 2 with 50 steps, and a sweep of the distillation strength in the same evaluation
(``distill_sweep``: every task's lambda set to 0, 0.01, 0.1, 1, 10; reported as
``personalized_lambda<l>/...``). ``post10`` sets stage 2 back to 10 steps (the default's).
``multitask,tiny`` is its CI size.

  python launch.py --config configs/tap_suite.py:multitask --config.seed=0 --workdir /tmp/runs/mt

Variants: ``tiny`` (2 pairs, image and text, 2 rounds: a smoke test), ``local`` (no
replacement, no distillation: ``personal_fl`` is Local training; ``no_replacement`` runs the
same round, so its ``personal_fl`` is Local training too), ``no_replacement``, ``no_distill``,
``train_replacement`` (the reference's training-loss rule), ``pairs2`` / ``pairs4`` / ``pairs8``
(the first 2, 4 or 8 pairs of `GROUPS`: the sweep of the number of modality-task pairs; the
default has the first 6; pairs8 adds speaker classification on text and image-text matching on
image + text).
"""

import ml_collections
from ml_collections import config_dict

# The pairs in sweep order: pairs2 takes the first two, pairs4 four, the default six, pairs8 all.
GROUPS = (
    {"builder": "digits_classification",
     "partition": {"kind": "dirichlet", "num_clients": 5, "alpha": 0.5}},
    {"builder": "shakespeare_classification", "num_classes": 4, "examples_per_class": 60,
     "partition": {"kind": "dirichlet", "num_clients": 4, "alpha": 0.5}},
    {"builder": "digits_denoising", "partition": {"kind": "iid", "num_clients": 4}},
    {"builder": "shakespeare_next_char", "max_clients": 4, "max_windows_per_speaker": 48,
     "seq_length": 16},
    {"builder": "digits_segmentation", "partition": {"kind": "iid", "num_clients": 4}},
    {"builder": "digits_vqa", "families": ("identity", "parity"),
     "partition": {"kind": "iid", "num_clients": 2}},
    # Two more pairs for the sweep's 8-pair point (pairs8): text and image + text classification.
    {"builder": "shakespeare_classification", "name": "shakespeare_speaker", "target": "speaker",
     "num_classes": 4, "examples_per_class": 60,
     "partition": {"kind": "dirichlet", "num_clients": 4, "alpha": 0.5}},
    {"builder": "digits_matching", "partition": {"kind": "iid", "num_clients": 4}},
)
DEFAULT_PAIRS = 6
VARIANTS = ("", "tiny", "local", "no_replacement", "no_distill", "train_replacement", "pairs2",
            "pairs4", "pairs8")
MODIFIERS = ("multitask", "post10")
# The multi-task set-up: digit classification, then play + speaker classification on the same
# text clients (one multi-task group).
MULTITASK_GROUPS = (GROUPS[0], GROUPS[1], GROUPS[6])
MULTITASK = (("shakespeare_classification", "shakespeare_speaker"),)
DISTILL_SWEEP = (0.0, 0.01, 0.1, 1.0, 10.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "").split(",") if p]
  variants = [p for p in parts if p not in MODIFIERS]
  if len(variants) > 1 or set(variants) - set(VARIANTS) or \
      (set(parts) & set(MODIFIERS) and variants and variants[0] not in
       ("tiny", "no_replacement", "no_distill", "train_replacement")):
    raise ValueError(f"unknown variant {arg!r} of configs/tap_suite.py; use one of {VARIANTS}, "
                     "or ',multitask' (and ',post10') with tiny, no_replacement, no_distill or "
                     "train_replacement")
  arg = variants[0] if variants else ""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 12
  c.data = ml_collections.ConfigDict(dict(
      name="tap_suite", empty_clients="error", max_length=16, validation_fraction=0.2,
      groups=[dict(g) for g in GROUPS[:DEFAULT_PAIRS]], multitask=[]))
  c.model = ml_collections.ConfigDict(dict(
      name="tap", fusion_layers=1, image_size=8, patch_size=2, num_channels=1,
      lora=dict(rank=4, alpha=8.0, targets=("q", "v")), expert_bottleneck=16, dropout=0.0))
  c.algorithm = ml_collections.ConfigDict(dict(
      name="tap", hparams=ml_collections.ConfigDict(dict(
          peak_lr=2e-3, min_lr=5e-4, warmup_rounds=3, weight_decay=0.01, clip_norm=1.0,
          replacement="validation",
          deltas={"digit_classification": 0.01, "play_classification": 0.005,
                  "digit_denoising": 0.005, "next_char": 0.01, "ink_segmentation": 0.01,
                  "digit_vqa": 0.01, "speaker_classification": 0.005,
                  "image_text_matching": 0.01},
          distill_weights={"digit_classification": 2e-3, "play_classification": 1.0,
                           "digit_denoising": 2e-3, "next_char": 2e-3,
                           "ink_segmentation": 2e-3, "digit_vqa": 2e-3,
                           "speaker_classification": 1.0, "image_text_matching": 2e-3},
          temperature=1.0, post_steps=10, post_lr=5e-4, post_batch_size=16, distill_sweep=[]))))
  c.cohort_size = 2                     # clients sampled per group per round
  c.batch_size = 16
  c.local_steps = 4
  c.local_epochs = config_dict.placeholder(int)
  c.eval_every = c.rounds               # stage 2 runs once, after the last round
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  # stop after this many rounds in a row with non-finite training metrics or no healthy client
  c.max_bad_rounds = 3
  c.mesh = (("clients", -1),)
  c.execution = ml_collections.ConfigDict(dict(strategy="vmap", chunk_size=8, scan_unroll=1))
  hp = c.algorithm.hparams
  if "multitask" in parts:
    c.data.groups = [dict(g) for g in MULTITASK_GROUPS]
    c.data.multitask = [list(m) for m in MULTITASK]
    c.rounds = c.eval_every = 40
    hp.post_steps = 10 if "post10" in parts else 50
    hp.distill_sweep = list(DISTILL_SWEEP)
  if arg == "tiny" and "multitask" in parts:
    c.data.groups = [dict(g, test_fraction=0.05) for g in c.data.groups]
    c.rounds = c.eval_every = 2
    c.batch_size = 4
    c.local_steps = 1
    hp.post_steps = 2
    hp.post_batch_size = 4
    hp.distill_sweep = [0.0]
  elif arg == "tiny":
    # Two one-modality pairs (image, text), 5% of each client's examples held out: compiling
    # and running the evaluation (stage 2, then four models on every test example) is most of
    # a tiny run's time.
    c.data.groups = [dict(g, test_fraction=0.05) for g in GROUPS[:2]]
    c.rounds = c.eval_every = 2
    c.batch_size = 4
    c.local_steps = 1
    hp.post_steps = 2
    hp.post_batch_size = 4
  elif arg == "local":
    hp.replacement = "none"
    hp.distill_weights = {k: 0.0 for k in hp.distill_weights}
  elif arg == "no_replacement":
    hp.replacement = "none"
  elif arg == "no_distill":
    hp.distill_weights = {k: 0.0 for k in hp.distill_weights}
  elif arg == "train_replacement":
    hp.replacement = "train"
  elif arg in ("pairs2", "pairs4", "pairs8"):
    c.data.groups = [dict(g) for g in GROUPS[:int(arg[-1])]]
  return c
