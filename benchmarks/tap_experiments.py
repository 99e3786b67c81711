"""TAP's isolating comparison on multi-task clients (RESULTS.md, section TAP; issue 17).

Runs `configs/tap_suite.py:<variant>,multitask` (digit classification on 5 image clients and
4 multi-task text clients holding play and speaker classification, the first MiniLM layer,
40 rounds; stage 2 with 50 steps and a sweep of the distillation strength in the same
evaluation) for every variant and seeds 0, 1, 2, one `launch.py` process at a time, each in
`<scratch>/<variant>_s<seed>`; then copies each finished run's small files (summary.json,
metrics.jsonl, config.json; never checkpoints) to `results/tap/<variant>_s<seed>/`, from which
`python -m fedjax_fm.results --rebuild` writes the RESULTS.md tables.

Variants: ``tap`` (validation-loss replacement, the default), ``train_replacement`` (the
reference's training-loss rule), ``no_replacement`` (its ``personal_fl`` is Local training),
``post10`` (``tap`` with stage 2 cut to 10 steps, the step count of the earlier table).

  nice -n 19 python benchmarks/tap_experiments.py --scratch /tmp/tap_runs
  python benchmarks/tap_experiments.py --variants tap --seeds 0

Runs already in results/tap/ are skipped, so the script resumes where it stopped.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feddat_experiments import ROOT, launch_and_keep  # pylint: disable=wrong-import-position

# variant -> the config argument of configs/tap_suite.py
VARIANTS = {"tap": "multitask", "no_replacement": "no_replacement,multitask",
            "train_replacement": "train_replacement,multitask", "post10": "multitask,post10"}
SEEDS = (0, 1, 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scratch", default="/tmp/tap_runs")
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
  parser.add_argument("--flags", nargs="*", default=[],
                      help="extra launch.py flags for every run (e.g. --config.rounds=30)")
  args = parser.parse_args()
  for seed in args.seeds:
    for variant in args.variants:
      name = f"{variant}_s{seed}"
      seconds = launch_and_keep(f"tap_suite.py:{VARIANTS[variant]}",
                                [f"--config.seed={seed}", *args.flags],
                                os.path.join(ROOT, "results", "tap", name),
                                os.path.join(args.scratch, name))
      print(f"{variant} seed {seed}: {seconds:.0f} s", flush=True)


if __name__ == "__main__":
  main()
