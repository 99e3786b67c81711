"""TAP's tables and the pair-sweep plot from finished runs of configs/tap_suite.py.

  python benchmarks/tap_results.py --runs /tmp/runs --plot results/tap_pairs_sweep.png \
      --convergence_plot results/tap_pairs_convergence.png

Expects workdirs ``<runs>/<variant>_s<seed>`` written by (one per seed 0, 1, 2)::

  python launch.py --config configs/tap_suite.py --config.seed=S --workdir <runs>/tap_sS
  python launch.py --config configs/tap_suite.py:no_replacement --config.seed=S \\
      --workdir <runs>/norep_sS
  python launch.py --config configs/tap_suite.py:no_distill --config.seed=S --workdir <runs>/nokd_sS
  python launch.py --config configs/tap_suite.py:pairs2 --config.seed=S --workdir <runs>/pairs2_sS
  python launch.py --config configs/tap_suite.py:pairs4 --config.seed=S --workdir <runs>/pairs4_sS
  python launch.py --config configs/tap_suite.py:pairs8 --config.seed=S --workdir <runs>/pairs8_sS

One TAP run reports four models per client (its evaluation runs stage 2): TAP
(``personalized``), FedAvg (``global``: the server model restricted to the client), FedAvg +
local fine-tuning (``global_ft``) and the personal model before stage 2 (``personal_fl``). In
the ``no_replacement`` variant the personal models never take anything from the server, so its
``personal_fl`` is Local training (the ``local`` variant runs the same round) and its
``personalized`` is TAP without replacement.
Prints markdown tables (mean ± std over the seeds found, sample std; the replacement rate per
group from each run's ``metrics.jsonl``) and plots the server model's per-task metric against
the number of modality-task pairs.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from fedjax_fm import results as results_lib

# (row label, variant prefix, evaluation mode)
METHODS = (("TAP", "tap", "personalized"), ("FedAvg", "tap", "global"),
           ("FedAvg + FT", "tap", "global_ft"), ("Local", "norep", "personal_fl"),
           ("TAP w/o replacement", "norep", "personalized"),
           ("TAP w/o distillation", "nokd", "personalized"))
# group -> (metric, higher is better)
GROUPS = {"digits_classification": ("accuracy", True),
          "shakespeare_classification": ("accuracy", True),
          "digits_denoising": ("mse", False), "shakespeare_next_char": ("accuracy", True),
          "digits_segmentation": ("accuracy", True), "digits_vqa": ("accuracy", True),
          "shakespeare_speaker": ("accuracy", True), "digits_matching": ("accuracy", True)}
DEFAULT_GROUPS = tuple(GROUPS)[:6]     # the default (6-pair) federation's groups
SWEEP = ((2, "pairs2"), (4, "pairs4"), (6, "tap"), (8, "pairs8"))


def finished(runs: str, prefix: str) -> list[str]:
  """The finished workdirs ``<runs>/<prefix>_s<seed>``."""
  return results_lib.finished_runs(os.path.join(runs, f"{prefix}_s*"))


def finals(runs: str, prefix: str) -> list[dict]:
  return [results_lib.final_metrics(d) for d in finished(runs, prefix)]


def cell(values: list[float], digits: int = 3) -> str:
  if not values:
    return "—"
  mean, std = results_lib.mean_std(values)
  return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"


def method_table(runs: str) -> str:
  head = "| method | " + " | ".join(f"{g} ({GROUPS[g][0]}{'↑' if GROUPS[g][1] else '↓'})"
                                     for g in DEFAULT_GROUPS) + " |"
  lines = [head, "|" + "---|" * (len(DEFAULT_GROUPS) + 1)]
  for label, prefix, mode in METHODS:
    rows = finals(runs, prefix)
    cells = [cell([r[f"{mode}/{g}/{GROUPS[g][0]}"] for r in rows
                   if f"{mode}/{g}/{GROUPS[g][0]}" in r]) for g in DEFAULT_GROUPS]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def sweep(runs: str) -> dict[int, dict[str, list[float]]]:
  """Number of pairs -> group -> the server model's (``global``) metric per seed."""
  out = {}
  for n, prefix in SWEEP:
    rows = finals(runs, prefix)
    out[n] = {g: [r[f"global/{g}/{m}"] for r in rows if f"global/{g}/{m}" in r]
              for g, (m, _) in GROUPS.items()}
  return out


def sweep_table(data) -> str:
  lines = ["| pairs | " + " | ".join(f"{g} ({m})" for g, (m, _) in GROUPS.items()) + " |",
           "|" + "---|" * (len(GROUPS) + 1)]
  for n, per_group in data.items():
    lines.append(f"| {n} | " + " | ".join(cell(per_group[g]) for g in GROUPS) + " |")
  return "\n".join(lines)


def replacement_table(runs: str) -> str:
  """Per run: the fraction of sampled clients whose personal model was replaced, averaged over
  rounds (``train/<group>/replaced`` and ``train/replaced`` in metrics.jsonl)."""
  lines = ["| run | " + " | ".join(GROUPS) + " | all |", "|" + "---|" * (len(GROUPS) + 2)]
  for _, prefix in SWEEP:
    for d in finished(runs, prefix):

      def mean(key, d=d):
        values = results_lib.curves(d, key)[1]
        return f"{values.mean():.2f}" if values.size else ""

      lines.append(f"| {os.path.basename(d)} | " + " | ".join(
          mean(f"train/{g}/replaced") for g in GROUPS) + f" | {mean('train/replaced')} |")
  return "\n".join(lines)


def plot(data, path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for g, (m, _) in GROUPS.items():
    ax = axes[1] if m == "mse" else axes[0]
    xs = [n for n in data if data[n][g]]
    if not xs:
      continue
    mean, std = zip(*(results_lib.mean_std(data[n][g]) for n in xs))
    ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=g)
  axes[0].set(xlabel="modality-task pairs in the federation", ylabel="server model accuracy")
  axes[1].set(xlabel="modality-task pairs in the federation", ylabel="server model MSE")
  axes[0].legend(fontsize=7)
  axes[1].legend(fontsize=7)
  for ax in axes:
    ax.set_xticks([n for n, _ in SWEEP])
  fig.suptitle("TAP server model per task vs number of modality-task pairs (mean ± std)",
               fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=90)


def convergence(runs: str) -> dict[int, dict[str, np.ndarray]]:
  """Number of pairs -> group -> [seeds, rounds] training loss of the global-path model
  (``train/<group>/global_loss``) for the groups every sweep point has (the first two)."""
  shared = tuple(GROUPS)[:2]
  out = {}
  for n, prefix in SWEEP:
    curves = {g: [] for g in shared}
    for d in finished(runs, prefix):
      for g in shared:
        curves[g].append(results_lib.curves(d, f"train/{g}/global_loss")[1])
    if all(curves.values()):   # seeds with fewer rounds cut every seed to the shortest
      length = min(len(c) for per_group in curves.values() for c in per_group)
      out[n] = {g: np.asarray([c[:length] for c in per_group], np.float64)
                for g, per_group in curves.items()}
  return out


def plot_convergence(data, path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  groups = list(next(iter(data.values()))) if data else []
  fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(9, 3.4))
  for ax, g in zip(np.atleast_1d(axes), groups):
    for n, per_group in data.items():
      c = per_group[g]
      rounds = np.arange(1, c.shape[1] + 1)
      mean, std = c.mean(0), (c.std(0, ddof=1) if len(c) > 1 else np.zeros(c.shape[1]))
      ax.plot(rounds, mean, label=f"{n} pairs (n={len(c)})")
      ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
    ax.set(title=g, xlabel="round", ylabel="global-path training loss")
    ax.legend(fontsize=7)
  fig.suptitle("Server (global-path) model convergence vs number of modality-task pairs",
               fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=90)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="/tmp/runs")
  parser.add_argument("--plot", default="results/tap_pairs_sweep.png")
  parser.add_argument("--convergence_plot", default="results/tap_pairs_convergence.png")
  args = parser.parse_args()
  print(method_table(args.runs))
  print()
  data = sweep(args.runs)
  print(sweep_table(data))
  print()
  print(replacement_table(args.runs))
  plot(data, args.plot)
  plot_convergence(convergence(args.runs), args.convergence_plot)


if __name__ == "__main__":
  main()
