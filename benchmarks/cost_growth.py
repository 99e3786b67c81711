r"""Cost growth of the default round: seconds per round against cohort size and model size.

Two sweeps of `round_throughput.py` (each point its own process, the default engine row only,
1 warm-up + `--rounds` timed rounds, median):

- cohort: W1's CNN with one local step of batch 10 per client (10 examples each, to keep the
  5,000-client point affordable on a CPU), cohorts of `--cohorts` clients out of a federation of
  the largest cohort;
- model: W2 (16 clients x 4 steps x batch 8 x 32 tokens, adapters + head trained) on random
  BERTs of all-MiniLM-L6-v2's sizes with `--layers` layers.

Each sweep's slope is the least-squares exponent b of s/round ~ a x^b on log-log axes (b = 1:
linear growth); both sweeps go in one figure. Usage::

  python benchmarks/cost_growth.py --json results/cost_growth.json --plot results/cost_growth.png
  python benchmarks/cost_growth.py --quick   # 2 tiny points per sweep (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cohorts", type=str, default="50,500,5000")
  p.add_argument("--layers", type=str, default="2,6,12")
  p.add_argument("--rounds", type=int, default=2, help="timed rounds per point")
  p.add_argument("--runner", type=str, default="fedjax_fm[default]")
  p.add_argument("--quick", action="store_true",
                 help="W1 cohorts 2 and 8 of tiny clients, W2 quick model at 1 and 2 clients")
  p.add_argument("--json", type=str, default=None)
  p.add_argument("--plot", type=str, default=None)
  return p.parse_args(argv)


def run_point(args_list: list[str]) -> dict:
  """One round_throughput.py process; its (single) record."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  cmd = [sys.executable, os.path.join(HERE, "round_throughput.py"), *args_list, "--json", out]
  print("+", " ".join(cmd), file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
  with open(out) as f:
    (rec,) = json.load(f)
  os.unlink(out)
  return rec


def slope(xs, ys) -> float:
  """Least-squares b of log y = log a + b log x."""
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(args):
  common = ["--runners", args.runner, "--rounds", str(args.rounds)]
  points = []
  cohorts = [2, 8] if args.quick else [int(c) for c in args.cohorts.split(",")]
  for c in cohorts:
    extra = (["--quick", "--clients", str(max(cohorts))] if args.quick else
             ["--clients", str(max(cohorts)), "--examples", "10"])
    rec = run_point(["--workload", "w1", "--cohort", str(c), *extra, *common])
    points.append({"sweep": "cohort", "x": c, **rec})
  layers = [1, 2] if args.quick else [int(l) for l in args.layers.split(",")]
  for n in layers:
    extra = ["--quick", "--clients", str(n)] if args.quick else ["--layers", str(n)]
    rec = run_point(["--workload", "w2", *extra, *common])
    points.append({"sweep": "clients (quick)" if args.quick else "layers", "x": n, **rec})

  sweeps = {}
  for p in points:
    sweeps.setdefault(p["sweep"], []).append(p)
  print("| sweep | x | s/round | warm-up s | other/steal CPU % |")
  print("|---|---|---|---|---|")
  for p in points:
    print(f"| {p['sweep']} | {p['x']} | {p['s_per_round']:.3f} | {p['warmup_s']:.1f} "
          f"| {100 * p['other_cpu_share']:.0f}/{100 * p['steal_share']:.0f} |")
  slopes = {name: slope([p["x"] for p in ps], [p["s_per_round"] for p in ps])
            for name, ps in sweeps.items()}
  for name, b in slopes.items():
    print(f"{name}: s/round ~ x^{b:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"points": points, "slopes": slopes}, f, indent=1)
  if args.plot:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4))
    axes = np.atleast_1d(axes)
    labels = {"cohort": "cohort size (W1 CNN, 1 local step)",
              "layers": "encoder layers (W2, MiniLM-sized)"}
    for ax, (name, ps) in zip(axes, sweeps.items()):
      xs, ys = [p["x"] for p in ps], [p["s_per_round"] for p in ps]
      ax.loglog(xs, ys, "o-", label=f"{args.runner}: slope {slopes[name]:.2f}")
      ax.set_xlabel(labels.get(name, name))
      ax.set_ylabel("s / round")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend()
    fig.suptitle("Cost growth of the default round (log-log; slope 1 = linear)")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
  return points, slopes


if __name__ == "__main__":
  main(parse_args())
