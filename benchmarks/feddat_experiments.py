"""FedDAT's isolating comparison (RESULTS.md, section FedDAT; issue 17).

Runs `configs/feddat_vqa.py:<method>,small` (the first MiniLM layer only, 30 rounds, so that
the 30 runs fit a 2-core CPU) for every method, both client learning rates (the reference
code's 1e-4 and the 1e-3 of the earlier table) and seeds 0, 1, 2, one `launch.py` process at a
time, each in `<scratch>/<lr>/<method>_s<seed>`; then copies each finished run's small files (summary.json,
metrics.jsonl, config.json; never checkpoints) to `results/feddat/<lr>/<method>_s<seed>/`, from
which `python -m fedjax_fm.results --rebuild` writes the RESULTS.md tables.

  nice -n 10 python benchmarks/feddat_experiments.py --scratch /tmp/feddat_runs
  python benchmarks/feddat_experiments.py --scratch /tmp/feddat_runs --lrs 1e-3 --seeds 0

Runs already in results/feddat/ are skipped, so the script resumes where it stopped.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Baselines first: their curves say how long the comparison must run.
METHODS = ("fedper", "fedprox_heads", "feddat", "no_mkd", "no_dat", "fedper_adapter")
LRS = ("1e-3", "1e-4")
SEEDS = (0, 1, 2)
KEPT = ("summary.json", "metrics.jsonl", "config.json")


def launch_and_keep(config: str, flags: list[str], out: str, work: str) -> float:
  """Runs `launch.py --config <config> <flags>` in `work` unless `out` already holds its
  summary, then copies the run's small files to `out`. Returns the wall seconds (0: skipped)."""
  if os.path.isfile(os.path.join(out, "summary.json")):
    return 0.0
  cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
         os.path.join(ROOT, "configs", config), *flags, "--workdir", work, "--overwrite"]
  start = time.time()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  os.makedirs(out, exist_ok=True)
  for name in KEPT:
    shutil.copy(os.path.join(work, name), os.path.join(out, name))
  return time.time() - start


def run_one(scratch: str, lr: str, method: str, seed: int) -> float:
  name = os.path.join(f"lr{lr}", f"{method}_s{seed}")
  return launch_and_keep(f"feddat_vqa.py:{method},small",
                         [f"--config.seed={seed}", f"--config.algorithm.hparams.client_lr={lr}"],
                         os.path.join(ROOT, "results", "feddat", name),
                         os.path.join(scratch, name))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scratch", default="/tmp/feddat_runs")
  parser.add_argument("--lrs", nargs="+", default=list(LRS))
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
  args = parser.parse_args()
  for lr in args.lrs:
    for seed in args.seeds:
      for method in args.methods:
        seconds = run_one(args.scratch, lr, method, seed)
        print(f"lr {lr} {method} seed {seed}: {seconds:.0f} s", flush=True)


if __name__ == "__main__":
  main()
