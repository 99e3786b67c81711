"""FFGG against FedAvg and FedPer, and the plain mean against robust aggregators under 20%
flipping attackers (RESULTS.md, section FFGG; issue 17).

Runs `configs/ffgg_vqa.py:<variant>,small` (the first MiniLM layer only, 30 rounds: long enough
that the personalized models leave the answer prior) for every variant and seeds 0, 1, 2, one
`launch.py` process at a time in `<scratch>/<variant>_s<seed>`, and keeps each finished run's
small files (summary.json, metrics.jsonl, config.json) in `results/ffgg/<variant>_s<seed>/`,
from which `python -m fedjax_fm.results --rebuild` writes the RESULTS.md tables.

  nice -n 10 python benchmarks/ffgg_experiments.py --scratch /tmp/ffgg_runs

Runs already in results/ffgg/ are skipped, so the script resumes where it stopped.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feddat_experiments import ROOT, launch_and_keep  # pylint: disable=wrong-import-position

VARIANTS = ("fedavg", "fedper", "ffgg", "byzantine_mean", "byzantine", "byzantine_trimmed",
            "median")
SEEDS = (0, 1, 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scratch", default="/tmp/ffgg_runs")
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
  args = parser.parse_args()
  for seed in args.seeds:
    for variant in args.variants:
      name = f"{variant}_s{seed}"
      seconds = launch_and_keep(f"ffgg_vqa.py:{variant},small", [f"--config.seed={seed}"],
                                os.path.join(ROOT, "results", "ffgg", name),
                                os.path.join(args.scratch, name))
      print(f"{variant} seed {seed}: {seconds:.0f} s", flush=True)


if __name__ == "__main__":
  main()
