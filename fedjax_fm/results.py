"""Tables and curves over seeds, from finished runs' workdirs, and RESULTS.md rebuilt from them.

  python -m fedjax_fm.results "FedDAT=runs/feddat_s*" "FedAvg=runs/fedavg_s*" \\
      --metrics personalized/accuracy global/accuracy --plot results/feddat.png
  python -m fedjax_fm.results --rebuild          # every RESULTS.md table with committed runs
  python -m fedjax_fm.results --rebuild --check  # exit 1 if RESULTS.md is out of date

Each argument is `label=glob`; the glob names the workdirs of one method's seeds. A row of the
markdown table is the mean ± std over those runs of each metric's last value (from
`summary.json`, written at the end of a run); the plot shows each method's mean curve per round
(from `metrics.jsonl`) with a ± std band. The std is the sample std (ddof=1) over seeds.

A metric is a key of the summary's ``final`` record (``personalized/accuracy``) or
``group/<group>/<metric>``, a per-group row of the summary (``group/identity/personalized/
per_client_accuracy``: the mean over that question family's clients).

``--rebuild`` renders every `Table` of `TABLES` whose runs are committed under ``results/``
(each run: summary.json, metrics.jsonl, config.json, copied there by the experiment scripts of
``benchmarks/``) and writes it into RESULTS.md between the table's markers
``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``, and its plot, if it has one.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def summary(run: str) -> dict:
  with open(os.path.join(run, "summary.json")) as f:
    return json.load(f)


def final_metrics(run: str) -> dict:
  return summary(run)["final"]


def metric_value(run_summary: dict, metric: str, run: str | None = None) -> float | None:
  """`metric` of one run: a key of its summary's ``final`` record, ``group/<group>/<metric>``
  (a per-group row), ``gain/<k>/<metric>``: the last value of `metric`'s curve in the run's
  metrics.jsonl minus its value k rounds earlier (how much the curve still rose at the end; needs
  `run`, the run's folder), or ``mean/<metric>``: the mean of that curve over all its rounds (a
  rate per round, such as TAP's replacement rate). None if the run has no such value."""
  if metric.startswith("mean/"):
    values = curves(run, metric[len("mean/"):])[1]
    return float(values.mean()) if values.size else None
  if metric.startswith("gain/"):
    _, k, name = metric.split("/", 2)
    rounds, values = curves(run, name)
    earlier = np.nonzero(rounds <= rounds[-1] - int(k))[0] if len(rounds) else []
    return float(values[-1] - values[earlier[-1]]) if len(earlier) else None
  if metric.startswith("group/"):
    _, group, name = metric.split("/", 2)
    return run_summary.get("per_group", {}).get(group, {}).get(name)
  return run_summary["final"].get(metric)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def table(methods: Sequence[tuple[str, list[str]]], metrics: Sequence[str] = DEFAULT_METRICS,
          digits: int = 3, headers: Sequence[str] | None = None) -> str:
  """The markdown table: one row per method, mean ± std over its runs for each metric (a
  `metric_value` name); `headers` names the columns (default: the metrics)."""
  headers = list(headers or metrics)
  lines = ["| method | seeds | " + " | ".join(headers) + " |",
           "|---|---|" + "---|" * len(metrics)]
  for label, runs in methods:
    summaries = [summary(r) for r in runs]
    cells = []
    for m in metrics:
      values = [v for v in (metric_value(s, m, r) for s, r in zip(summaries, runs))
                if v is not None]
      if len(values) < len(summaries):
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


# ---- RESULTS.md, rebuilt from the committed runs under results/ ----

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSONAL_AND_GLOBAL = (("personalized/accuracy", "personalized"), ("global/accuracy", "global"),
                       ("gain/10/personalized/accuracy", "personalized gain, last 10 rounds"))
FAMILIES = ("identity", "parity", "greater_than_five", "prime")


@dataclasses.dataclass(frozen=True)
class Table:
  """One RESULTS.md table: its marker name, its rows (label, glob of run folders relative to the
  repository) and its columns (metric, header); optionally a plot of `plot_metrics`' curves."""
  name: str
  rows: tuple[tuple[str, str], ...]
  columns: tuple[tuple[str, str], ...] = PERSONAL_AND_GLOBAL
  plot: str | None = None
  plot_metrics: tuple[str, ...] = ("personalized/accuracy", "global/accuracy")
  digits: int = 3


def _per_family(prefix: str = "personalized") -> tuple[tuple[str, str], ...]:
  return tuple((f"group/{g}/{prefix}/per_client_accuracy", g) for g in FAMILIES)


def _feddat_rows(lr: str) -> tuple[tuple[str, str], ...]:
  return tuple((label, f"results/feddat/lr{lr}/{method}_s*") for label, method in (
      ("FedDAT", "feddat"), ("FedDAT w/o mutual distillation", "no_mkd"),
      ("FedDAT w/o dual-adapter teacher", "no_dat"), ("FedAvg + personal heads (FedPer)", "fedper"),
      ("FedProx + personal heads", "fedprox_heads"),
      ("FedPer + personal adapter (FedDAT's parameters, one plain step)", "fedper_adapter")))


_FFGG = (("FFGG (Local FFGG)", "results/ffgg/ffgg_s*"), ("FedAvg", "results/ffgg/fedavg_s*"),
         ("FedPer", "results/ffgg/fedper_s*"))
_FFGG_ATTACK = (("no attack, mean", "results/ffgg/ffgg_s*"),
                ("no attack, median of buckets", "results/ffgg/median_s*"),
                ("20% flip, plain mean", "results/ffgg/byzantine_mean_s*"),
                ("20% flip, median of buckets", "results/ffgg/byzantine_s*"),
                ("20% flip, trimmed mean (20%)", "results/ffgg/byzantine_trimmed_s*"))
_FEDBONE = (("FedBone (PCGrad)", "results/fedbone/fedbone_s*"),
            ("Averaging", "results/fedbone/fedbone_average_s*"),
            ("Local (general model fixed)", "results/fedbone/fedbone_local_s*"))
_FEDBONE_COLUMNS = (
    ("personalized/digits_classification/accuracy", "digits acc"),
    ("personalized/digits_segmentation/iou", "ink IoU"),
    ("personalized/shakespeare_classification/accuracy", "play acc"),
    ("gain/48/personalized/digits_classification/accuracy", "digits acc gain, last 48 rounds"),
    ("gain/48/personalized/digits_segmentation/iou", "ink IoU gain, last 48 rounds"),
    ("mean/train/conflict_fraction", "conflicting pairs, mean over rounds"))
_FEDPFT_METHODS = {
    "full": "FedAvg-LoRA (full FM)", "fedpft": "FedPFT (384 of 1536 FFN neurons)",
    "fedot": "FedOT-like (sub-FM, no alignment)",
    "no_layer_align": "FedPFT w/o layer-level alignment",
    "no_neuron_align": "FedPFT w/o neuron-level alignment",
    "keep192": "FedPFT, 192 of 1536 FFN neurons", "keep768": "FedPFT, 768 of 1536 FFN neurons"}
_fedpft_rows = lambda *names: tuple((_FEDPFT_METHODS[n], f"results/fedpft/{n}_s*") for n in names)
_FEDPFT = _fedpft_rows("full", "fedpft", "fedot", "no_layer_align", "no_neuron_align")
_FEDPFT_ALIGNED = _fedpft_rows("fedpft", "no_layer_align", "no_neuron_align", "keep192", "keep768")
_FEDPFT_SIZES = _fedpft_rows("keep192", "fedpft", "keep768", "full")
_FEDPFT_COLUMNS = (("personalized/accuracy", "full-FM test acc"),
                   ("train/accuracy", "clients' train acc (last round)"),
                   ("gain/8/personalized/accuracy", "test acc gain, last 8 rounds"))
_FEDPFT_ALIGNMENT = (
    ("train/layer_align_loss_start", "layer-level loss, first step"),
    ("train/layer_align_loss_end", "layer-level loss, last step"),
    ("train/neuron_align_loss_start", "neuron-level loss, first step (last round)"),
    ("train/neuron_align_loss_end", "neuron-level loss, last step (last round)"))
_TAP_MT = "shakespeare_classification+shakespeare_speaker"   # the multi-task text clients' group
_TAP_TASKS = {"digits": "digits_classification", "play": f"{_TAP_MT}/shakespeare_classification",
              "speaker": f"{_TAP_MT}/shakespeare_speaker"}
_TAP_RULES = (("TAP, validation-loss replacement", "results/tap/tap_s*"),
              ("TAP, training-loss replacement (reference)", "results/tap/train_replacement_s*"),
              ("TAP w/o replacement (personal after FL = Local)", "results/tap/no_replacement_s*"))
_TAP_STEPS = (("stage 2: 50 steps", "results/tap/tap_s*"),
              ("stage 2: 10 steps", "results/tap/post10_s*"))


def _tap_modes(task: str) -> tuple[tuple[str, str], ...]:
  g = _TAP_TASKS[task]
  return ((f"global/{g}/accuracy", "FedAvg"), (f"global_ft/{g}/accuracy", "FedAvg + FT"),
          (f"personal_fl/{g}/accuracy", "personal after FL"),
          (f"personalized/{g}/accuracy", "after stage 2 (TAP)"),
          (f"gain/10/train/{g}/global_loss", "global-path train loss, change over last 10 rounds"))


def _tap_sweep(prefix: str = "", metric: str = "accuracy") -> tuple[tuple[str, str], ...]:
  return ((f"personal_fl/{prefix}{metric}", "before stage 2"),
          *((f"personalized_lambda{w}/{prefix}{metric}", f"λ={w}")
            for w in ("0", "0.01", "0.1", "1", "10")),
          (f"personalized/{prefix}{metric}", "λ of the reference"))

TABLES = (
    Table("feddat_lr1e-3", _feddat_rows("1e-3"), plot="results/feddat_small_lr1e-3.png"),
    Table("feddat_lr1e-3_families", _feddat_rows("1e-3"), _per_family()),
    Table("feddat_lr1e-4", _feddat_rows("1e-4"), plot="results/feddat_small_lr1e-4.png"),
    Table("feddat_lr1e-4_families", _feddat_rows("1e-4"), _per_family()),
    Table("ffgg_small", _FFGG, plot="results/ffgg_small.png"),
    Table("ffgg_small_families", _FFGG, _per_family()),
    Table("ffgg_attack", _FFGG_ATTACK, plot="results/ffgg_attack.png",
          plot_metrics=("personalized/accuracy",)),
    Table("fedbone_long", _FEDBONE, _FEDBONE_COLUMNS, plot="results/fedbone.png",
          plot_metrics=tuple(m for m, _ in _FEDBONE_COLUMNS[:3]) + ("train/conflict_fraction",)),
    Table("fedpft_small", _FEDPFT, _FEDPFT_COLUMNS, plot="results/fedpft_small.png",
          plot_metrics=("personalized/accuracy", "train/accuracy")),
    Table("fedpft_alignment", _FEDPFT_ALIGNED, _FEDPFT_ALIGNMENT, digits=4),
    Table("fedpft_sizes", _FEDPFT_SIZES, _FEDPFT_COLUMNS),
    Table("tap_digits", _TAP_RULES, _tap_modes("digits"), plot="results/tap_multitask.png",
          plot_metrics=tuple(f"train/{g}/global_loss" for g in _TAP_TASKS.values())),
    Table("tap_play", _TAP_RULES, _tap_modes("play")),
    Table("tap_speaker", _TAP_RULES, _tap_modes("speaker")),
    Table("tap_replacement", _TAP_RULES[:2], tuple(
        (f"mean/train/{g}/replaced", f"{task}") for task, g in _TAP_TASKS.items()) + (
        (f"mean/train/{_TAP_MT}/replaced", "text client, either task"),), digits=2),
    Table("tap_distill_sweep", _TAP_STEPS, _tap_sweep()),
    Table("tap_distill_sweep_speaker", _TAP_STEPS, _tap_sweep(f"{_TAP_TASKS['speaker']}/")),
    Table("tap_distill_sweep_loss", _TAP_STEPS, _tap_sweep(metric="loss")),
)


def marker(name: str) -> tuple[str, str]:
  return f"<!-- table:{name} -->", f"<!-- /table:{name} -->"


def committed_methods(spec: Table, root: str = ROOT) -> list[tuple[str, list[str]]]:
  """(label, runs) of every row of `spec`; a row with no committed run has an empty list."""
  return [(label, finished_runs(os.path.join(root, pattern))) for label, pattern in spec.rows]


def render(spec: Table, root: str = ROOT) -> str | None:
  """The markdown of `spec` from the committed runs (a row without runs says "not run");
  None if no row has any."""
  methods = committed_methods(spec, root)
  if not any(runs for _, runs in methods):
    return None
  metrics, headers = zip(*spec.columns)
  lines = table([m for m in methods if m[1]], metrics, spec.digits, headers).splitlines()
  rows = iter(lines[2:])
  return "\n".join(lines[:2] + [
      next(rows) if runs else f"| {label} | 0 | " + " | ".join(["not run"] * len(metrics)) + " |"
      for label, runs in methods])


def section(text: str, name: str) -> str | None:
  """What RESULTS.md holds between `name`'s markers (stripped); None without the markers."""
  start, end = marker(name)
  if start not in text or end not in text:
    return None
  return text.split(start, 1)[1].split(end, 1)[0].strip()


def rebuild(text: str, specs: Sequence[Table] = TABLES, root: str = ROOT,
            plots: bool = True) -> tuple[str, list[str]]:
  """`text` (RESULTS.md) with every table of `specs` that has committed runs and markers
  re-rendered; returns (new text, one line of news per table)."""
  news = []
  for spec in specs:
    if section(text, spec.name) is None:
      news.append(f"{spec.name}: no markers in RESULTS.md, skipped")
      continue
    rendered = render(spec, root)
    if rendered is None:
      news.append(f"{spec.name}: no committed run under results/, left as is")
      continue
    start, end = marker(spec.name)
    head, rest = text.split(start, 1)
    text = f"{head}{start}\n{rendered}\n{end}{rest.split(end, 1)[1]}"
    methods = [m for m in committed_methods(spec, root) if m[1]]
    if plots and spec.plot:
      plot(methods, spec.plot_metrics, os.path.join(root, spec.plot))
    news.append(f"{spec.name}: rebuilt from {sum(len(r) for _, r in methods)} runs")
  return text, news


def rebuild_main(results_md: str, root: str, check: bool) -> int:
  with open(results_md) as f:
    text = f.read()
  new, news = rebuild(text, root=root, plots=not check)
  print("\n".join(news))
  if check:
    if new != text:
      print(f"error: {results_md} differs from the committed runs; run --rebuild",
            file=sys.stderr)
      return 1
    return 0
  with open(results_md, "w") as f:
    f.write(new)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("methods", nargs="*", help='label=glob of workdirs, e.g. "FedAvg=runs/a_s*"')
  parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
  parser.add_argument("--plot", help="write the curves to this PNG")
  parser.add_argument("--title", help="the plot's title")
  parser.add_argument("--rebuild", action="store_true",
                      help="write every table of TABLES with committed runs into RESULTS.md")
  parser.add_argument("--check", action="store_true",
                      help="with --rebuild: only say whether RESULTS.md is up to date")
  parser.add_argument("--root", default=ROOT, help="the repository (RESULTS.md and results/)")
  args = parser.parse_args(argv)
  if args.rebuild:
    return rebuild_main(os.path.join(args.root, "RESULTS.md"), args.root, args.check)
  if not args.methods:
    parser.error("name at least one label=glob, or --rebuild")
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
