"""Tables and curves over seeds, from finished runs' workdirs.

  python -m fedjax_fm.results "FedDAT=runs/feddat_s*" "FedAvg=runs/fedavg_s*" \\
      --metrics personalized/accuracy global/accuracy --plot results/feddat.png

Each argument is `label=glob`; the glob names the workdirs of one method's seeds. A row of the
markdown table is the mean ± std over those runs of each metric's last value (from
`summary.json`, written at the end of a run); the plot shows each method's mean curve per round
(from `metrics.jsonl`) with a ± std band. The std is the sample std (ddof=1) over seeds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Sequence

import numpy as np

DEFAULT_METRICS = ("personalized/accuracy", "global/accuracy")


def finished_runs(pattern: str) -> list[str]:
  """The workdirs matching `pattern` whose run finished (wrote summary.json), sorted."""
  return sorted(d for d in glob.glob(pattern) if os.path.isfile(os.path.join(d, "summary.json")))


def parse_method(spec: str) -> tuple[str, list[str]]:
  """'label=glob' -> (label, sorted finished run dirs)."""
  if "=" not in spec:
    raise ValueError(f"{spec!r} is not label=glob; write e.g. \"FedAvg=runs/fedavg_s*\"")
  label, pattern = spec.split("=", 1)
  runs = finished_runs(pattern)
  if not runs:
    raise ValueError(f"no finished run (a folder with summary.json) matches {pattern!r} for "
                     f"{label!r}; check the path or let the runs finish")
  return label, runs


def final_metrics(run: str) -> dict:
  with open(os.path.join(run, "summary.json")) as f:
    return json.load(f)["final"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def table(methods: Sequence[tuple[str, list[str]]], metrics: Sequence[str] = DEFAULT_METRICS,
          digits: int = 3) -> str:
  """The markdown table: one row per method, mean ± std over its runs for each metric."""
  lines = ["| method | seeds | " + " | ".join(metrics) + " |",
           "|---|---|" + "---|" * len(metrics)]
  for label, runs in methods:
    finals = [final_metrics(r) for r in runs]
    cells = []
    for m in metrics:
      values = [f[m] for f in finals if m in f]
      if len(values) < len(finals):
        cells.append("–")
        continue
      mu, sd = mean_std(values)
      cells.append(f"{mu:.{digits}f} ± {sd:.{digits}f}")
    lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def curves(run: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
  """(rounds, values) of `metric` in a run's metrics.jsonl."""
  rounds, values = [], []
  with open(os.path.join(run, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if metric in record:
        rounds.append(record["round"])
        values.append(record[metric])
  return np.asarray(rounds), np.asarray(values, np.float64)


def plot(methods: Sequence[tuple[str, list[str]]], metrics: Sequence[str], path: str,
         title: str | None = None):
  """One panel per metric; each method's mean over seeds with a ± std band."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for label, runs in methods:
      series = [curves(r, metric) for r in runs]
      series = [s for s in series if len(s[0])]
      if not series:
        continue
      n = min(len(s[0]) for s in series)  # runs of one method share their eval rounds
      rounds = series[0][0][:n]
      values = np.stack([s[1][:n] for s in series])
      mu, sd = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else 0 * values[0]
      ax.plot(rounds, mu, marker="o", markersize=3, label=label)
      ax.fill_between(rounds, mu - sd, mu + sd, alpha=0.2)
    ax.set_xlabel("round")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("methods", nargs="+", help='label=glob of workdirs, e.g. "FedAvg=runs/a_s*"')
  parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
  parser.add_argument("--plot", help="write the curves to this PNG")
  parser.add_argument("--title", help="the plot's title")
  args = parser.parse_args(argv)
  try:
    methods = [parse_method(m) for m in args.methods]
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(table(methods, args.metrics))
  if args.plot:
    plot(methods, args.metrics, args.plot, args.title)
  return 0


if __name__ == "__main__":
  sys.exit(main())
