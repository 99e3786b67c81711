"""The server chain measured on real offline data (RESULTS.md, section "Privacy, compression and
robustness"): user-level DP-FedAvg at several epsilons, upload compression, robust aggregation
under attack.

Every run is `fedjax_fm.experiment.run` of a config file with overrides, in this process (runs of
one experiment share compiled programs), seeds 0, 1, 2; results (final global and personalized
accuracy, epsilon, bytes) go to ``<out>/<experiment>.json``, and the privacy plot to --plot::

  python benchmarks/privacy_experiments.py privacy --out results/privacy --plot results/privacy.png
  python benchmarks/privacy_experiments.py compression --out results/privacy
  python benchmarks/privacy_experiments.py robustness --out results/privacy
  python benchmarks/privacy_experiments.py minilm --out results/privacy --rounds 6 --seeds 0 \
      --epsilons 8,4,1 --clip_norm 0.5 --adaptive_clip
  python benchmarks/privacy_experiments.py accountants --out results/privacy  # epsilons
  python benchmarks/privacy_experiments.py report --out results/privacy   # tables only

Digits: configs/digits.py (50 clients, 10 per round, 200 rounds, one local epoch), FedAvg;
delta = 1 / 50. MiniLM: configs/default.py (FedPer on 16 Shakespeare clients, cohort 8), with
fewer rounds and seeds on a CPU (flags).
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EPSILONS = (1.0, 4.0, 8.0)
COMPRESSIONS = (None, "int8", "int4", "top_k")
AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bounded_mean")
ATTACKS = ((None, 1.0), ("flip", 1.0), ("flip", 10.0), ("scale", 100.0))


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(None)


def run_one(config, label):
  """Runs `config` (no workdir); returns the final metrics, the epsilon curve and the time. A
  run that diverges (`TrainingDiverged`, e.g. the plain mean under scaled attackers) is a row
  with ``diverged`` set and no accuracy."""
  from fedjax_fm.experiment import run
  from fedjax_fm.train import TrainingDiverged
  t0 = time.time()
  try:
    history = run(config, None, progress=False)
  except TrainingDiverged as e:
    print(f"{label:40s} seed {config.seed}  diverged: {e}", flush=True)
    return {"label": label, "seed": config.seed, "seconds": time.time() - t0,
            "diverged": str(e), "global_accuracy": None, "personalized_accuracy": None,
            "global_loss": None, "bytes_up_per_round": None, "epsilon": None}
  last = {}
  for h in history:
    last.update(h)
  out = {"label": label, "seed": config.seed, "seconds": time.time() - t0,
         "global_accuracy": last.get("global/accuracy"),
         "personalized_accuracy": last.get("personalized/accuracy"),
         "global_loss": last.get("global/loss"),
         "bytes_up_per_round": history[-1]["bytes_up"],
         "bytes_down_per_round": history[-1]["bytes_down"],
         "epsilon": last.get("privacy/epsilon"),
         "epsilon_curve": [h.get("privacy/epsilon") for h in history],
         "accuracy_curve": [(h["round"], h["global/accuracy"]) for h in history
                            if "global/accuracy" in h]}
  print(f"{label:40s} seed {config.seed}  global {out['global_accuracy']:.4f}  "
        f"eps {out['epsilon']}  up {out['bytes_up_per_round']}  {out['seconds']:.0f}s",
        flush=True)
  return out


def save(out_dir, name, rows):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(rows, f, indent=1)


def seeded(config_name, seed, rounds):
  """`configs/<config_name>.py` at `seed`, with `rounds` (if given) and an evaluation at its end."""
  c = load_config(config_name)
  c.seed = seed
  if rounds:
    c.rounds = rounds
    c.eval_every = min(c.eval_every, rounds)
  return c


def privacy_runs(args, config_name="digits", name="privacy"):
  """No DP and DP at each of `args.epsilons`, per seed; saved after each run."""
  rows = []
  for seed in args.seeds:
    for eps in (None,) + args.epsilons:
      c = seeded(config_name, seed, args.rounds)
      if eps is not None:
        c.privacy.target_epsilon = eps
        c.privacy.clip_norm = args.clip_norm
        c.privacy.adaptive_clip = args.adaptive_clip
      rows.append(run_one(c, "no DP" if eps is None else f"DP eps={eps:g}"))
      save(args.out, name, rows)
  return rows


def compression_runs(args):
  rows = []
  for seed in args.seeds:
    for comp in COMPRESSIONS:
      c = seeded("digits", seed, args.rounds)
      c.aggregation.compression = comp
      rows.append(run_one(c, comp or "float32"))
  return rows


def robustness_runs(args):
  """Every aggregator under every attack; saved after each run, and runs already in
  ``<out>/robustness.json`` are not repeated."""
  path = os.path.join(args.out, "robustness.json")
  rows = json.load(open(path)) if os.path.exists(path) else []
  done = {(r["label"], r["seed"]) for r in rows}
  for seed in args.seeds:
    for attack, scale in ATTACKS:
      for agg in AGGREGATORS:
        label = f"{agg} | {attack or 'none'} x{scale:g}"
        if (label, seed) in done:
          continue
        c = seeded("digits", seed, args.rounds)
        c.aggregation.aggregator = agg
        c.aggregation.bucket_size = 1
        c.aggregation.trim_fraction = 0.2
        c.aggregation.attack = attack
        c.aggregation.attack_scale = scale
        c.aggregation.attacker_fraction = 0.2
        rows.append(run_one(c, label))
        save(args.out, "robustness", rows)
  return rows


def accountant_rows():
  """Our epsilons for the digits (q = 10/50, 200 rounds, delta 1/50) and MiniLM (q = 8/16,
  delta 1/16) settings at the noise of each target: RDP, PLD, and fixed-size (replace-one) RDP."""
  from fedjax_fm import privacy
  rows = []
  for name, rate, rounds, delta, population in (("digits", 0.2, 200, 1 / 50, 50),
                                                ("minilm", 0.5, 30, 1 / 16, 16)):
    for target in EPSILONS:
      z = privacy.noise_multiplier(target, rate, rounds, delta)
      rows.append(dict(
          setting=name, target=target, noise_multiplier=z, sampling_rate=rate, rounds=rounds,
          delta=delta, rdp=privacy.epsilon(z, rate, rounds, delta, "rdp"),
          pld=privacy.epsilon(z, rate, rounds, delta, "pld"),
          fixed_rdp=privacy.epsilon(z, rate, rounds, delta, sampling="fixed",
                                    population=population)))
      print(rows[-1], flush=True)
  return rows


def table(rows, key="global_accuracy"):
  """label -> (mean, std, n) of `key` over the seeds that did not diverge, in first-seen order
  (nan, 0 when every seed diverged)."""
  out = {}
  for r in rows:
    out.setdefault(r["label"], [])
    if r.get(key) is not None:
      out[r["label"]].append(r[key])
  return {k: (float(np.mean(v)) if v else float("nan"),
              float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
          for k, v in out.items()}


def report(out_dir):
  for name in ("privacy", "minilm", "compression", "robustness"):
    path = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(path):
      continue
    rows = json.load(open(path))
    print(f"\n## {name}")
    acc = table(rows)
    pers = table(rows, "personalized_accuracy")
    eps = table([r for r in rows if r["epsilon"] is not None], "epsilon")
    up = table(rows, "bytes_up_per_round")
    loss = table(rows, "global_loss")
    diverged = {}
    for r in rows:
      diverged[r["label"]] = diverged.get(r["label"], 0) + bool(r.get("diverged"))
    for label, (m, s, n) in acc.items():
      extra = f" eps {eps[label][0]:.3f}" if label in eps else ""
      if label in loss and loss[label][2]:
        extra += f" loss {loss[label][0]:.4f} ± {loss[label][1]:.4f}"
      if diverged[label]:
        extra += f" diverged in {diverged[label]} seeds"
      print(f"| {label} | {m:.4f} ± {s:.4f} | {pers[label][0]:.4f} ± {pers[label][1]:.4f} | "
            f"{up[label][0]:.0f} |{extra} (n={n})")


def plot(out_dir, path):
  """Accuracy vs epsilon (mean and std over seeds), one panel per experiment that has run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [(name, title) for name, title in
            (("privacy", "digits (FedAvg, 50 clients, 200 rounds)"),
             ("minilm", "MiniLM / Shakespeare (FedPer, 16 clients, 6 rounds, seed 0)"))
            if os.path.exists(os.path.join(out_dir, f"{name}.json"))]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
  for ax, (name, title) in zip(axes[0], panels):
    acc = table(json.load(open(os.path.join(out_dir, f"{name}.json"))))
    base = acc.pop("no DP")
    xs = [float(k.split("=")[1]) for k in acc]
    ax.errorbar(xs, [v[0] for v in acc.values()], yerr=[v[1] for v in acc.values()], fmt="o-",
                capsize=3, label="DP-FedAvg (user-level)")
    ax.axhline(base[0], color="k", ls="--", label=f"no DP ({base[0]:.3f})")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("epsilon (delta = 1 / clients)")
    ax.set_ylabel("global test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("experiment",
                      choices=("privacy", "minilm", "compression", "robustness", "accountants",
                               "report"))
  parser.add_argument("--out", default="results/privacy")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--rounds", type=int, default=None, help="override the config's rounds")
  parser.add_argument("--clip_norm", type=float, default=0.1,
                      help="digits updates have median norm ~0.2 (adaptive clipping), 0.1 clips most")
  parser.add_argument("--adaptive_clip", action="store_true",
                      help="clip_norm is the initial clip, tracking the median update norm")
  parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
  parser.add_argument("--plot", default=None)
  args = parser.parse_args()
  args.seeds = [int(s) for s in args.seeds.split(",")]
  args.epsilons = tuple(float(e) for e in args.epsilons.split(","))
  if args.experiment == "privacy":
    save(args.out, "privacy", privacy_runs(args, "digits", "privacy"))
  elif args.experiment == "minilm":
    save(args.out, "minilm", privacy_runs(args, "default", "minilm"))
  elif args.experiment == "compression":
    save(args.out, "compression", compression_runs(args))
  elif args.experiment == "robustness":
    save(args.out, "robustness", robustness_runs(args))
  elif args.experiment == "accountants":
    save(args.out, "accountants", accountant_rows())
  report(args.out)
  if args.plot:
    plot(args.out, args.plot)


if __name__ == "__main__":
  main()
