"""Scaling: FedAvg round time against the number of devices and against the cohort size.

Two sweeps of the same engine round (`RoundRunner`, FedAvg, clients under `vmap`, the client axis
sharded over the mesh's ``clients`` axis):

- devices: a fixed cohort on meshes over the first 1, 2, 4, 8 devices. Every mesh runs the same
  rounds (same cohorts, same keys) from the same start, so the final server parameters must agree
  up to float rounding; the table gives their largest difference from the 1-device run. On fake
  CPU devices (`--xla_force_host_platform_device_count=8`) all meshes share the same physical
  cores, so this sweep measures correctness and the cost of partitioning (collectives, per-device
  dispatch), not a speedup; on a host with several GPUs the same command measures the speedup.
- cohort: cohorts of 50 to 5,000 clients out of a federation of 5,000, on one mesh (all
  devices by default). The host time to build a cohort (`make_cohort`, numpy) is reported next
  to the round time, since at large cohorts it is what a run must hide behind the device
  (`fedjax_fm.train` builds round r+1's cohort while round r computes).

Workload: synthetic federated classification (64 features, 10 classes, labels from a fixed
random linear teacher; 16-48 examples per client, seeded), an MLP 64-256-256-10, 4 local SGD
steps of batch 16, client lr 0.1. Each point: one warm-up round (compilation, reported
separately), then `--repeats` timed rounds; the table gives the median (and min-max) and the
share of the machine's CPU that other processes took meanwhile (`measure.Noise`). Round time
includes placing the cohort on the devices and waiting for the round's metrics.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scaling.py \\
      --json /tmp/scaling.json --plot results/scaling.png
  python benchmarks/scaling.py --quick    # seconds: what tests/test_benchmark_scaling.py runs
  python benchmarks/scaling.py --devices 1,2,4,8  # on a host with 8 GPUs (not run here)

Prints two markdown tables (BENCHMARKS.md, "Scaling").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fedjax_fm import algorithms, cohort as cohort_lib, models, roles, sharding  # noqa: E402
from fedjax_fm.protocol import ClientExecution  # noqa: E402
from fedjax_fm.runner import RoundRunner, padded_rows  # noqa: E402
from measure import Noise  # noqa: E402  # benchmarks/measure.py

FEATURES, CLASSES = 64, 10


def synthetic_federation(num_clients: int, seed: int = 0, sizes=(16, 48)):
  """Clients with 16-48 examples of a learnable 10-class problem (a random linear teacher)."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(sizes[0], sizes[1] + 1, num_clients)
  n = int(counts.sum())
  x = rng.normal(size=(n, FEATURES)).astype(np.float32)
  teacher = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
  y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(n, CLASSES)), 1).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return cohort_lib.FederatedData({"x": x, "y": y}, offsets)


class Workload:
  """The model, algorithm factory and data of one sweep."""

  def __init__(self, num_clients, hidden, steps, batch, strategy, seed=0):
    self.fed = synthetic_federation(num_clients, seed)
    model = models.MLP(FEATURES, CLASSES, hidden=hidden, rngs=nnx.Rngs(seed))
    self.graphdef, self.params = models.functional(model)
    self.roles = roles.assign_roles(self.params)
    self.steps, self.batch, self.strategy, self.seed = steps, batch, strategy, seed

  def algorithm(self, mesh):
    return algorithms.fedavg(models.classification_loss(self.graphdef, "x"), self.roles,
                             client_lr=0.1, execution=ClientExecution(self.strategy, mesh=mesh))

  def cohort(self, cohort_size, r):
    ids = cohort_lib.sample_clients(self.seed, r, self.fed.num_clients, cohort_size)
    return cohort_lib.make_cohort(self.fed, ids, steps=self.steps, batch_size=self.batch,
                                  seed=self.seed, round_num=r)


def time_rounds(work: Workload, mesh, cohort_size: int, repeats: int) -> dict:
  """One warm-up round then `repeats` timed rounds on `mesh`; the same rounds on every mesh."""
  alg = work.algorithm(mesh)
  runner = RoundRunner(alg, mesh)
  server, clients = runner.place(alg.init(work.params, jax.random.key(0)),
                                 alg.init_clients(work.params,
                                                  padded_rows(work.fed.num_clients, mesh)))
  build_s, cohorts = [], []
  for r in range(repeats + 1):
    t = time.perf_counter()
    cohorts.append(work.cohort(cohort_size, r))
    build_s.append(time.perf_counter() - t)
  times = []
  with Noise() as noise:
    for r, cohort in enumerate(cohorts):
      t = time.perf_counter()
      server, clients, metrics = runner(server, clients, cohort, jax.random.key(r + 1))
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
  params = jax.tree_util.tree_map(np.asarray, jax.device_get(server.params))
  return {"devices": mesh.devices.size, "cohort": cohort_size,
          "s_per_round": float(np.median(times[1:])), "min_s": float(np.min(times[1:])),
          "max_s": float(np.max(times[1:])), "warmup_s": times[0],
          "cohort_build_s": float(np.median(build_s)), "compilations": runner.compilations,
          "loss": float(metrics["loss"]), "other_cpu": noise.other, "steal_cpu": noise.steal,
          "params": params}


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def device_sweep(args) -> list[dict]:
  work = Workload(args.device_clients, args.hidden, args.steps, args.batch, args.strategy)
  rows, base = [], None
  for d in args.devices:
    mesh = sharding.make_mesh(((sharding.CLIENTS, d),), jax.devices()[:d])
    row = time_rounds(work, mesh, args.device_cohort, args.repeats)
    base = base or row
    row["speedup"] = base["s_per_round"] / row["s_per_round"]
    row["max_diff_vs_first"] = max_diff(row["params"], base["params"])
    rows.append(row)
    print(f"devices {d}: {row['s_per_round']:.4f} s/round", file=sys.stderr, flush=True)
  return rows


def cohort_sweep(args) -> list[dict]:
  work = Workload(args.federation, args.hidden, args.steps, args.batch, args.strategy)
  d = args.cohort_devices or len(jax.devices())
  mesh = sharding.make_mesh(((sharding.CLIENTS, d),), jax.devices()[:d])
  rows = []
  for k in args.cohorts:
    row = time_rounds(work, mesh, k, args.repeats)
    row["clients_per_s"] = k / row["s_per_round"]
    rows.append(row)
    print(f"cohort {k}: {row['s_per_round']:.4f} s/round", file=sys.stderr, flush=True)
  return rows


def _noise(r) -> str:
  """CPU share other processes / the hypervisor took while the rounds ran (measure.Noise)."""
  return f"{100 * r['other_cpu']:.0f}/{100 * r['steal_cpu']:.0f}"


def tables(dev_rows, coh_rows, args) -> str:
  head = (f"backend {jax.default_backend()} ({len(jax.devices())} devices: "
          f"{jax.devices()[0].device_kind}); FedAvg, MLP 64-{'-'.join(map(str, args.hidden))}-10, "
          f"{args.steps} local steps of batch {args.batch}, strategy {args.strategy}; median of "
          f"{args.repeats} rounds after 1 warm-up")
  out = [head, "",
         f"Devices (cohort {args.device_cohort} of {args.device_clients} clients):",
         "| devices | s/round | min-max s | vs 1 device | warm-up s | max abs diff of params vs "
         "1 device | compilations | other/steal CPU % |", "|---|---|---|---|---|---|---|---|"]
  for r in dev_rows:
    out.append(f"| {r['devices']} | {r['s_per_round']:.4f} | {r['min_s']:.4f}-{r['max_s']:.4f} | "
               f"{r['speedup']:.2f}x | {r['warmup_s']:.2f} | {r['max_diff_vs_first']:.1e} | "
               f"{r['compilations']} | {_noise(r)} |")
  d = coh_rows[0]["devices"] if coh_rows else 0
  out += ["", f"Cohort size (federation of {args.federation} clients, {d} devices):",
          "| cohort | s/round | min-max s | clients/s | host cohort build s | warm-up s | "
          "other/steal CPU % |", "|---|---|---|---|---|---|---|"]
  for r in coh_rows:
    out.append(f"| {r['cohort']} | {r['s_per_round']:.4f} | {r['min_s']:.4f}-{r['max_s']:.4f} | "
               f"{r['clients_per_s']:,.0f} | {r['cohort_build_s']:.4f} | {r['warmup_s']:.2f} | "
               f"{_noise(r)} |")
  return "\n".join(out)


def plot(dev_rows, coh_rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
  ax = axes[0]
  ax.plot([r["devices"] for r in dev_rows], [r["s_per_round"] for r in dev_rows], "o-",
          label="round (median)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("devices on the clients axis")
  ax.set_ylabel("s / round")
  ax.set_title(f"fixed cohort ({jax.default_backend()})")
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax = axes[1]
  ks = [r["cohort"] for r in coh_rows]
  ax.loglog(ks, [r["s_per_round"] for r in coh_rows], "o-", label="round (device)")
  ax.loglog(ks, [r["cohort_build_s"] for r in coh_rows], "s--", label="cohort build (host)")
  ax.set_xlabel("clients per round")
  ax.set_ylabel("s")
  ax.set_title("cohort size")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def parse_args(argv=None):
  ints = lambda s: [int(v) for v in s.split(",") if v]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=ints, default=[1, 2, 4, 8])
  p.add_argument("--device_clients", type=int, default=1000)
  p.add_argument("--device_cohort", type=int, default=200)
  p.add_argument("--cohorts", type=ints, default=[50, 100, 500, 1000, 5000])
  p.add_argument("--federation", type=int, default=5000)
  p.add_argument("--cohort_devices", type=int, default=0, help="0: all devices")
  p.add_argument("--hidden", type=ints, default=[256, 256])
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--strategy", default="vmap")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (small sizes)")
  p.add_argument("--json", default=None)
  p.add_argument("--plot", default=None)
  args = p.parse_args(argv)
  if args.quick:
    args.devices = [d for d in (1, 2) if d <= len(jax.devices())]
    args.device_clients, args.device_cohort = 64, 16
    args.cohorts, args.federation = [8, 32], 64
    args.cohort_devices = max(args.devices)
    args.hidden, args.steps, args.batch, args.repeats = [32], 2, 8, 2
  too_many = [d for d in args.devices if d > len(jax.devices())]
  if too_many:
    p.error(f"--devices {too_many} exceed the {len(jax.devices())} devices; start with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU")
  if max(args.cohorts) > args.federation or args.device_cohort > args.device_clients:
    p.error("a cohort is larger than its federation; raise --federation / --device_clients")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  dev_rows, coh_rows = device_sweep(args), cohort_sweep(args)
  print(tables(dev_rows, coh_rows, args))
  strip = lambda rows: [{k: v for k, v in r.items() if k != "params"} for r in rows]
  result = {"backend": jax.default_backend(), "num_devices": len(jax.devices()),
            "args": vars(args), "devices": strip(dev_rows), "cohorts": strip(coh_rows)}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  if args.plot:
    plot(dev_rows, coh_rows, args.plot)
  return result


if __name__ == "__main__":
  main()
