"""FedBone's isolating comparison (RESULTS.md, section FedBone; issue 17).

Runs `configs/fedbone_multitask.py:long` (120 rounds: 120 server steps of a 1-layer general
model) for
FedBone (PCGrad), plain averaging of the general-model gradients and Local (general model never
updated), seeds 0, 1, 2, one `launch.py` process at a time, each in
`<scratch>/<method>_s<seed>`; then copies each finished run's small files (summary.json,
metrics.jsonl, config.json; never checkpoints) to `results/fedbone/<method>_s<seed>/`, from which
`python -m fedjax_fm.results --rebuild` writes the RESULTS.md table and `results/fedbone.png`.

  nice -n 19 python benchmarks/fedbone_experiments.py --scratch /tmp/fedbone_runs
  python benchmarks/fedbone_experiments.py --seeds 0 --methods fedbone_average

Runs already in results/fedbone/ are skipped, so the script resumes where it stopped. After the
runs it prints the fraction of conflicting client-gradient pairs per quarter of training (the
mean over the rounds of each quarter, then mean ± std over seeds), which the table's last-round
columns cannot show.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The baseline first: its curve says whether the general model has converged.
METHODS = ("fedbone_average", "fedbone", "fedbone_local")
SEEDS = (0, 1, 2)
KEPT = ("summary.json", "metrics.jsonl", "config.json")
RESULTS = os.path.join(ROOT, "results", "fedbone")


def launch_and_keep(flags: list[str], out: str, work: str) -> float:
  """Runs `launch.py --config configs/fedbone_multitask.py:long <flags>` in `work` unless `out`
  already holds its summary, then copies the run's small files to `out`. Returns the wall
  seconds (0: skipped)."""
  if os.path.isfile(os.path.join(out, "summary.json")):
    return 0.0
  cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
         os.path.join(ROOT, "configs", "fedbone_multitask.py:long"), *flags, "--workdir", work,
         "--overwrite"]
  start = time.time()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  os.makedirs(out, exist_ok=True)
  for name in KEPT:
    shutil.copy(os.path.join(work, name), os.path.join(out, name))
  return time.time() - start


def conflict_quarters(run: str, parts: int = 4) -> list[float]:
  """The mean conflict fraction over each of `parts` equal spans of a run's rounds."""
  with open(os.path.join(run, "metrics.jsonl")) as f:
    values = [r["train/conflict_fraction"] for r in map(json.loads, f)
              if "train/conflict_fraction" in r]
  return [float(np.mean(chunk)) for chunk in np.array_split(np.asarray(values), parts)]


def print_conflicts(methods, seeds) -> None:
  print("| method | 1st quarter of rounds | 2nd | 3rd | 4th | all rounds |\n"
        "|---|---|---|---|---|---|")
  for method in methods:
    runs = [os.path.join(RESULTS, f"{method}_s{s}") for s in seeds]
    runs = [r for r in runs if os.path.isfile(os.path.join(r, "summary.json"))]
    if not runs or method == "fedbone_local":   # Local has no general-model gradients
      continue
    per_run = np.asarray([conflict_quarters(r) + [np.mean(conflict_quarters(r, 1))]
                          for r in runs])
    sd = per_run.std(0, ddof=1) if len(runs) > 1 else 0 * per_run[0]
    cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(per_run.mean(0), sd)]
    print(f"| {method} ({len(runs)} seeds) | " + " | ".join(cells) + " |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scratch", default="/tmp/fedbone_runs")
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
  args = parser.parse_args()
  for seed in args.seeds:
    for method in args.methods:
      name = f"{method}_s{seed}"
      seconds = launch_and_keep([f"--config.seed={seed}", f"--config.algorithm.name={method}"],
                                os.path.join(RESULTS, name), os.path.join(args.scratch, name))
      print(f"{method} seed {seed}: {seconds:.0f} s", flush=True)
  print_conflicts(args.methods, args.seeds)


if __name__ == "__main__":
  main()
