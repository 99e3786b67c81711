"""FedPFT against its two baselines on the real all-MiniLM-L6-v2 (RESULTS.md, section FedPFT).

Runs `configs/fedpft_text.py` for every variant (fedpft, fedot = the sub-FM without alignment,
full = FedAvg-LoRA on the uncompressed FM), both partitions (IID and Dirichlet 0.5) and seeds
0, 1, 2, each as its own `launch.py` process writing to `<root>/fedpft_<variant>_<part>_s<seed>`,
then prints the parameter / byte counts and the tables, and draws the curves:

  python benchmarks/fedpft_experiments.py --root /tmp/runs          # all 18 runs, then tables
  python benchmarks/fedpft_experiments.py --root /tmp/runs --report  # tables only

The persistent XLA cache (`--cache`) lets runs of one variant share compiled rounds: the public
split is the same for every seed, so the round's program is too.
"""

import argparse
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {"fedpft": "FedPFT", "fedot": "FedOT-like (no alignment)", "full": "FedAvg-LoRA (full FM)"}
# `shakespeare_play` deals speeches by Dirichlet label skew only; alpha = 1e4 gives every client
# the same label proportions up to rounding, i.e. IID labels.
PARTITIONS = {"iid": ["--config.data.partition.kind=dirichlet",
                      "--config.data.partition.alpha=10000.0"],
              "dir0.5": ["--config.data.partition.kind=dirichlet",
                         "--config.data.partition.alpha=0.5"]}
SEEDS = (0, 1, 2)


def workdir(root, variant, part, seed):
  return os.path.join(root, f"fedpft_{variant}_{part}_s{seed}")


def command(root, variant, part, seed):
  return [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
          os.path.join(ROOT, "configs", "fedpft_text.py"),
          f"--config.algorithm.hparams.variant={variant}", f"--config.seed={seed}",
          *PARTITIONS[part], "--workdir", workdir(root, variant, part, seed), "--overwrite"]


def sizes():
  """Parameter counts and bytes of the FM and the sub-FM of the config, from shapes only."""
  from configs import fedpft_text
  from fedjax_fm import assets, models
  from fedjax_fm.algorithms.fedpft import fedpft
  from fedjax_fm.models.sub_fm import size_report
  c = fedpft_text.get_config()
  hp = c.algorithm.hparams
  build = lambda: models.from_pretrained(
      assets.path("all-minilm-l6-v2"), lora=c.model.lora.to_dict(),
      head={"kind": "classification", "pooling": "mean", "num_classes": c.data.num_plays})
  _, params = models.functional(build())
  roles = models.transformer_roles(params, trainable=tuple(c.model.trainable))
  report = size_report(params, roles, hp.keep_neurons, tuple(hp.retained_layers))
  alg = fedpft(lambda *a: None, roles, params, keep_neurons=hp.keep_neurons,
               retained_layers=tuple(hp.retained_layers),
               public={"attention_mask": np.zeros((1, 1))},
               align_every=hp.align_every, align_steps=1, align_batch_size=1,
               align_retained_ratio=hp.align_retained_ratio)
  report["fedpft_bytes_down_up_per_client_round"] = alg.bytes_per_client(params)
  return report


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--root", default="/tmp/runs")
  parser.add_argument("--report", action="store_true", help="only print tables and plot")
  parser.add_argument("--cache", default="/tmp/fedpft_xla_cache")
  parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
  parser.add_argument("--parts", nargs="*", default=list(PARTITIONS))
  parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
  args = parser.parse_args()
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": args.cache}
  if not args.report:
    for seed in args.seeds:  # seed-major: an interrupted sweep still has every variant
      for part in args.parts:
        for variant in args.variants:
          if os.path.isfile(os.path.join(workdir(args.root, variant, part, seed),
                                         "summary.json")):
            continue  # finished before
          cmd = command(args.root, variant, part, seed)
          print(" ".join(cmd[1:]), flush=True)
          subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
  from fedjax_fm import results
  print(sizes())
  metrics = ["personalized/accuracy", "global/accuracy", "train/accuracy",
             "train/ffn_inactive_fraction", "bytes_down", "bytes_up"]
  for part in args.parts:
    methods = [results.parse_method(f"{VARIANTS[v]}={workdir(args.root, v, part, '*')}")
               for v in args.variants]
    print(f"\n{part}\n" + results.table(methods, metrics))
    results.plot(methods, ["personalized/accuracy", "train/accuracy"],
                 os.path.join(ROOT, "results", f"fedpft_{part}.png"),
                 title=f"MiniLM on Shakespeare plays, {part}")


if __name__ == "__main__":
  main()
