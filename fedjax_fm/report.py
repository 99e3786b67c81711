"""What a run leaves behind: metrics as JSONL and TensorBoard events, curves, a summary table.

The metric history is a list of flat records, one per round::

    {"round": 3, "train/loss": ..., "personalized/accuracy": ..., "global/accuracy": ...,
     "bytes_up": ..., "bytes_down": ..., "wall_seconds": ...}

`personalized/*` is each client's own model on its own test split, `global/*` the server model
on the pooled test data; both are present on evaluation rounds only.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

# Keys that differ between two runs of the same experiment (timing), left out of comparisons.
VOLATILE_KEYS = ("wall_seconds",)


def _summary_writer():
  """tensorboardX's `SummaryWriter`, imported without torch: its writer module imports torch
  whenever it is installed, only to accept torch tensors (2.5-4.5 s of every launch on a
  2-core CPU); we log Python floats. A torch already imported is left as it is."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricLog:
  """Appends round records to ``metrics.jsonl`` and TensorBoard events in ``tensorboard/``.

  On resume, the JSONL file is rewritten (atomically) to hold exactly the checkpoint's history,
  dropping rounds logged after the checkpoint that the resumed run will recompute, and
  TensorBoard is told to purge events from those rounds.
  """

  def __init__(self, workdir: str, history: Sequence[dict] = ()):
    self.path = os.path.join(workdir, "metrics.jsonl")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(h) + "\n" for h in history)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    start = history[-1]["round"] + 1 if history else None
    # Generation samples: on resume, those of rounds after the checkpoint are dropped too.
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    if os.path.exists(self.samples_path):
      with open(self.samples_path) as f:
        kept = [line for line in f if line.strip() and start is not None
                and json.loads(line)["round"] < start]
      with open(self.samples_path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.samples_path + ".tmp", self.samples_path)
    self._tb = _summary_writer()(os.path.join(workdir, "tensorboard"), purge_step=start)

  def write(self, record: Mapping[str, float]):
    self._file.write(json.dumps(dict(record)) + "\n")
    self._file.flush()
    for key, value in record.items():
      # A bad round's NaN stays in the JSONL; TensorBoard gets a gap, not a warning per value.
      if key != "round" and np.isfinite(value):
        self._tb.add_scalar(key, value, global_step=int(record["round"]))

  def write_samples(self, round_num: int, samples: Sequence[Mapping[str, Any]]):
    """Appends one evaluation's generation samples to ``samples.jsonl`` (a record per prompt,
    with its round) and to TensorBoard as text (a markdown table per round)."""
    with open(self.samples_path, "a") as f:
      f.writelines(json.dumps({"round": round_num, **s}) + "\n" for s in samples)
    cell = lambda t: str(t).replace("|", "\\|").replace("\n", " / ")
    rows = ["| client | prompt | personalized | global |", "|---|---|---|---|"]
    rows += [f"| {cell(s['name'])} | {cell(s['prompt'])} | {cell(s['personalized'])} | "
             f"{cell(s['global'])} |" for s in samples]
    self._tb.add_text("samples", "\n".join(rows), global_step=round_num)

  def close(self):
    self._file.close()
    self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(history, key):
  pts = [(h["round"], h[key]) for h in history if key in h]
  return zip(*pts) if pts else ((), ())


def plot_curves(history: Sequence[dict], path: str):
  """Writes loss and accuracy per round (train, personalized, global) and the cumulative
  communication (MB up + down) as one PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  for ax, metric in zip(axes[:2], ("loss", "accuracy")):
    for prefix, style in (("train", "-"), ("personalized", "o-"), ("global", "s--")):
      xs, ys = _series(history, f"{prefix}/{metric}")
      if xs:
        ax.plot(xs, ys, style, label=prefix, markersize=3)
    ax.set_title(metric)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  rounds = [h["round"] for h in history]
  mb = np.cumsum([(h.get("bytes_up", 0) + h.get("bytes_down", 0)) / 2**20 for h in history])
  axes[2].plot(rounds, mb)
  axes[2].set_title("communication (MB, cumulative)")
  axes[2].set_xlabel("round")
  axes[2].grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _spans(rounds: Sequence[int]) -> str:
  """[3, 4, 5, 9] -> "3-5, 9"."""
  spans, start = [], None
  for i, r in enumerate(rounds):
    if start is None:
      start = r
    if i + 1 == len(rounds) or rounds[i + 1] != r + 1:
      spans.append(str(start) if start == r else f"{start}-{r}")
      start = None
  return ", ".join(spans)


def is_bad_record(record: Mapping) -> bool:
  """A logged round that was bad (`fedjax_fm.train.round_problem`): its averaged training
  metrics are NaN."""
  return any(k.startswith("train/") and isinstance(v, float) and not np.isfinite(v)
             for k, v in record.items())


def summarize(history: Sequence[dict], final_eval: Mapping[str, np.ndarray] | None = None,
              client_groups: Sequence[str] | None = None, *, excluded_clients: int = 0,
              stopped: str | None = None, samples: Sequence[Mapping] | None = None) -> dict:
  """The end-of-run summary: last-round metrics, per-client spread and per-group means, and
  warnings (bad rounds, clients left out, a run stopped for divergence).

  Args:
    history: the metric records.
    final_eval: the last evaluation's raw output (with `personalized/per_client_<m>` arrays).
    client_groups: a group name per client (e.g. its modality-task pair), for per-group rows.
    excluded_clients: clients left out of the run for having no training or test examples.
    stopped: why the run stopped early, if it did.
    samples: the last evaluation's generation samples (`builders.make_sampler`), if any.

  Returns:
    {"final": {...}, "per_client": {metric: {mean, std, min, p10, median, max, clients}},
     "per_group": {group: {metric: mean}}, "bad_rounds": [...], "excluded_clients": n,
     "warnings": [...]}, and "samples": [...] when there are samples.
  """
  last = {}
  for h in history:
    last.update({k: v for k, v in h.items() if k not in VOLATILE_KEYS})
  bad = [h["round"] for h in history if is_bad_record(h)]
  warnings = []
  if stopped:
    warnings.append(f"stopped early: {stopped}")
  if bad:
    warnings.append(f"{len(bad)} bad round(s) (non-finite training metrics or no healthy "
                    f"client; logged as NaN): {_spans(bad)}")
  if excluded_clients:
    warnings.append(f"{excluded_clients} client(s) with no training or test examples were "
                    "excluded from sampling and from the per-client statistics")
  out = {"final": last, "per_client": {}, "per_group": {}, "bad_rounds": bad,
         "excluded_clients": excluded_clients, "warnings": warnings}
  if samples:
    out["samples"] = list(samples)
  if final_eval:
    for key, values in final_eval.items():
      if "/per_client_" not in key:
        continue
      v = np.asarray(values, np.float64)
      out["per_client"][key] = {"mean": v.mean(), "std": v.std(), "min": v.min(),
                                "p10": np.percentile(v, 10), "median": np.median(v),
                                "max": v.max(), "clients": len(v)}
      if client_groups is not None and len(client_groups) == len(v):
        groups = np.asarray(client_groups)
        for g in sorted(set(groups.tolist())):
          out["per_group"].setdefault(g, {})[key] = float(v[groups == g].mean())
  return jsonable(out)


def jsonable(tree):
  if isinstance(tree, dict):
    return {k: jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [jsonable(v) for v in tree]
  if isinstance(tree, (np.generic, np.ndarray)):
    return tree.tolist()
  return tree


def format_summary(summary: Mapping) -> str:
  """Renders `summarize`'s output as plain-text tables."""
  lines = [""] + [f"warning: {w}" for w in summary.get("warnings", ())]
  lines += ["summary (last value of each metric)"]
  final = summary["final"]
  width = max([len(k) for k in final] + [len(k) for k in summary["per_client"]] + [10])
  for key in sorted(final):
    value = final[key]
    lines.append(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float)
                 else f"  {key:<{width}}  {value}")
  if summary["per_client"]:
    lines += ["", "per client (last evaluation)",
              f"  {'metric':<{width}}  {'mean':>7} {'std':>7} {'min':>7} {'p10':>7} "
              f"{'median':>7} {'max':>7}"]
    for key, s in summary["per_client"].items():
      lines.append(f"  {key:<{width}}  " + " ".join(
          f"{s[c]:7.4f}" for c in ("mean", "std", "min", "p10", "median", "max")))
  if summary["per_group"]:
    keys = sorted({k for g in summary["per_group"].values() for k in g})
    lines += ["", "per group (mean over the group's clients)",
              "  " + f"{'group':<24}" + "".join(f"{k.split('per_client_')[-1]:>12}" for k in keys)]
    for group, metrics in summary["per_group"].items():
      lines.append("  " + f"{group:<24}" + "".join(f"{metrics.get(k, float('nan')):12.4f}"
                                                  for k in keys))
  for s in summary.get("samples", ()):
    lines += ["", f"sample, {s['name']}: {s['prompt']!r}",
              f"  personalized: {s['personalized']!r}", f"  global:       {s['global']!r}"]
  return "\n".join(lines)
