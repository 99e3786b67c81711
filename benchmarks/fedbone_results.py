"""RESULTS.md's FedBone table: per-task test metrics at the end of the run and the mean
fraction of conflicting client-gradient pairs over all rounds, mean ± std over seeds.

  python benchmarks/fedbone_results.py /tmp/runs            # runs named <algorithm>_s<seed>
"""

import json
import os
import sys

import numpy as np

METHODS = (("FedBone (PCGrad)", "fedbone"), ("Averaging", "fedbone_average"),
           ("Local", "fedbone_local"))
FINAL = (("digits acc", "personalized/digits_classification/accuracy"),
         ("ink pixel acc", "personalized/digits_segmentation/pixel_accuracy"),
         ("ink IoU", "personalized/digits_segmentation/iou"),
         ("play acc", "personalized/shakespeare_classification/accuracy"))


def main(root: str) -> None:
  header = ["method", "seeds"] + [name for name, _ in FINAL] + ["conflicting pairs / round"]
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for label, prefix in METHODS:
    runs = sorted(os.path.join(root, d) for d in os.listdir(root)
                  if d.rsplit("_s", 1)[0] == prefix
                  and os.path.isfile(os.path.join(root, d, "summary.json")))
    if not runs:
      continue
    cells, per_run = [], {key: [] for _, key in FINAL}
    conflicts = []
    for run in runs:
      final = json.load(open(os.path.join(run, "summary.json")))["final"]
      for _, key in FINAL:
        per_run[key].append(final[key])
      with open(os.path.join(run, "metrics.jsonl")) as f:
        rounds = [json.loads(line) for line in f]
      conflicts.append(np.mean([r["train/conflict_fraction"] for r in rounds]))
    for values in list(per_run.values()) + [conflicts]:
      v = np.asarray(values)
      cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}")
    print(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/runs")
