r"""The Shakespeare LLM experiment of RESULTS.md: every method of `configs/llm_shakespeare.py` for
three seeds, one launch at a time, and the table and curves from the committed run data.

  python benchmarks/llm_shakespeare.py run                 # all methods x seeds (about 1 h on 2 CPU cores)
  python benchmarks/llm_shakespeare.py run --methods fedavg,ffgg --seeds 0
  python benchmarks/llm_shakespeare.py table               # the markdown table + results/llm_shakespeare.png

`run` launches ``launch.py --config configs/llm_shakespeare.py:<method> --config.seed=<s>`` into
``runs/llm_shakespeare/<method>_s<seed>`` (skipping finished ones), copies each run's
``summary.json``, ``metrics.jsonl`` and ``samples.jsonl`` to
``results/llm_shakespeare/<method>_s<seed>/`` and evaluates the pretrained model with no
fine-tuning (``pretrained.json``: the same held-out windows, the frozen backbone). `table` reads
only ``results/llm_shakespeare/``: per method, the mean ± std over seeds of the clients' mean
perplexity (personalized and global models), its median client, and the pooled perplexity.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "llm_shakespeare.py")
RESULTS = os.path.join(ROOT, "results", "llm_shakespeare")
METHODS = {"fedavg": "FedAvg-LoRA", "fedper": "FedPer-LoRA (MLP LoRA personal)",
           "ffgg": "FFGG (MLP LoRA private)", "local": "Local (no federation)",
           "fedpft": "FedPFT sub-FM (FedOT-like, half the FFN)",
           "feddat": "FedDAT (dual LoRA, mutual distillation)"}
KEPT = ("summary.json", "metrics.jsonl", "samples.jsonl")


def run(methods, seeds, workroot):
  for seed in seeds:      # every method of a seed before the next seed
    for method in methods:
      name = f"{method}_s{seed}"
      workdir = os.path.join(workroot, name)
      if not os.path.isfile(os.path.join(workdir, "summary.json")):
        cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={CONFIG}:{method}",
               f"--config.seed={seed}", f"--workdir={workdir}", "--overwrite"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
      out = os.path.join(RESULTS, name)
      os.makedirs(out, exist_ok=True)
      for f in KEPT:
        if os.path.isfile(os.path.join(workdir, f)):
          shutil.copy(os.path.join(workdir, f), os.path.join(out, f))
  zero_shot()


def zero_shot():
  """The pretrained model with no fine-tuning on every client's held-out windows."""
  sys.path.insert(0, ROOT)
  from fedjax_fm import experiment  # pylint: disable=import-outside-toplevel
  from fedjax_fm.evaluate import make_evaluator  # pylint: disable=import-outside-toplevel
  from fedjax_fm.pretrain import load_config  # pylint: disable=import-outside-toplevel
  config = load_config(CONFIG)
  data = experiment.build_data(config)
  model = experiment.build_model(config, data)
  import jax  # pylint: disable=import-outside-toplevel
  no_personal = jax.tree_util.tree_map(lambda _: None, model.params)  # every client = the server
  metrics = model.derived_metrics(make_evaluator(model.loss(False), data.test,
                                                 modes=("personalized",))(model.params,
                                                                          no_personal))
  per_client = np.asarray(metrics["personalized/per_client_perplexity"])
  out = {"perplexity": float(metrics["personalized/perplexity"]),
         "client_mean_perplexity": float(per_client.mean()),
         "client_median_perplexity": float(np.median(per_client)),
         "accuracy": float(metrics["personalized/accuracy"])}
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "pretrained.json"), "w") as f:
    json.dump(out, f, indent=1)
  print("pretrained, no fine-tuning:", out)


def _runs(method):
  return sorted(glob.glob(os.path.join(RESULTS, f"{method}_s*")))


def _ms(values):
  v = np.asarray(values, np.float64)
  return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def table() -> str:
  rows = ["| method | seeds | personalized: clients' mean ppl | median client | global: "
          "clients' mean ppl | pooled personalized ppl |", "|---|---|---|---|---|---|"]
  zs = os.path.join(RESULTS, "pretrained.json")
  if os.path.isfile(zs):
    z = json.load(open(zs))
    rows.append(f"| pretrained, no fine-tuning | - | {z['client_mean_perplexity']:.3f} | "
                f"{z['client_median_perplexity']:.3f} | {z['client_mean_perplexity']:.3f} | "
                f"{z['perplexity']:.3f} |")
  for method, label in METHODS.items():
    runs = _runs(method)
    if not runs:
      rows.append(f"| {label} | 0 | not run | | | |")
      continue
    s = [json.load(open(os.path.join(r, "summary.json"))) for r in runs]
    pc = lambda mode, stat: [x["per_client"][f"{mode}/per_client_perplexity"][stat] for x in s]
    rows.append(f"| {label} | {len(runs)} | {_ms(pc('personalized', 'mean'))} | "
                f"{_ms(pc('personalized', 'median'))} | {_ms(pc('global', 'mean'))} | "
                f"{_ms([x['final']['personalized/perplexity'] for x in s])} |")
  return "\n".join(rows)


def plot(path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  for method, label in METHODS.items():
    curves = []
    for r in _runs(method):
      recs = [json.loads(l) for l in open(os.path.join(r, "metrics.jsonl")) if l.strip()]
      curves.append([(h["round"], h["personalized/perplexity"]) for h in recs
                     if "personalized/perplexity" in h])
    if not curves:
      continue
    rounds = [x for x, _ in curves[0]]
    values = np.asarray([[y for _, y in c] for c in curves if len(c) == len(rounds)])
    mean, std = values.mean(0), values.std(0)
    ax.plot(rounds, mean, marker="o", label=label)
    ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
  zs = os.path.join(RESULTS, "pretrained.json")
  if os.path.isfile(zs):
    ax.axhline(json.load(open(zs))["perplexity"], color="gray", linestyle="--",
               label="pretrained, no fine-tuning")
  ax.set_xlabel("round")
  ax.set_ylabel("held-out perplexity per character (personalized)")
  ax.set_title("Shakespeare roles as clients: LoRA on a pretrained 0.3M Llama")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("command", choices=("run", "table", "zero_shot"))
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--workroot", default=os.path.join(ROOT, "runs", "llm_shakespeare"))
  args = parser.parse_args()
  if args.command == "run":
    run(args.methods.split(","), [int(s) for s in args.seeds.split(",")], args.workroot)
  elif args.command == "zero_shot":
    zero_shot()
  print(table())
  plot(os.path.join(ROOT, "results", "llm_shakespeare.png"))


if __name__ == "__main__":
  main()
