r"""Round throughput of FedAvg: the engine's one-program round against per-client loops.

Workloads (one module each):

- W1 (`workload_w1.py`): pfl-research's CIFAR-10 cross-device setup, 1000 clients x 50 synthetic
  images, cohort 50, 5 local steps of batch 10, a small CNN trained whole.
- W2 (`workload_w2.py`): the real all-MiniLM-L6-v2 encoder, frozen, with bottleneck adapters
  after every FFN block and a classification head; 16 clients (all in every round) x 4 local
  steps x batch 8 x 32 tokens; only adapters and head are trained and averaged.

Runners, timed side by side in one process on the same pre-built cohorts:

- ``fedjax_fm[...]``: the engine's round (`fedavg` + `RoundRunner`, one jitted program per
  round, with the runner's default XLA options), one row per client execution strategy
  (``vmap``, ``unrolled``, ``chunked8`` = vmap over chunks of 8, ``sequential5`` = a loop over
  groups of 5; a ``,scan`` suffix keeps the local steps in a rolled `lax.scan`);
  ``fedjax_fm[default]`` is `default_execution()`, marked ``*``.
- ``jax_client_loop``: FedJAX's execution model: the same JAX local update (one client's local
  steps, same model and XLA options) jitted once and called per client from a Python loop, then
  weighted averaging in small jits.
- ``torch_loop``: a sequential PyTorch loop over clients with one model reloaded per client
  (W1: an NCHW copy of the CNN; W2: HF `BertModel` from the same folder with the same adapters
  and head, backbone requires_grad False), local SGD, weighted FedAvg averaging.
  ``torch_loop[threads=1]`` runs it with one torch thread (on a CPU shared with another
  process, two OpenMP threads can be many times slower than one).

Reported per runner: seconds per round (median over the timed rounds, after warm-up rounds that
include compilation), client-steps/s, the ratio to the default fedjax_fm row and to the fastest
torch_loop row,
achieved GFLOP/s from the workload's analytic FLOP count and its fraction of this machine's
matmul peak (measured here: the faster of a 2048^3 jnp.dot and torch.mm, median of 10, in the
workload's dtype), plus the share of the CPU that other processes and the hypervisor (steal)
took while the runner was timed. In W2 (no dropout) the runners must compute the same round:
the table's last column is each runner's largest parameter difference from the first runner
after the first round, relative to the largest parameter.

The per-op probe of W1's convolutions is `conv_probe.py`.

Usage::

  python benchmarks/round_throughput.py --json /tmp/w1.json  # full W1 (~4 min on 2 CPU cores)
  python benchmarks/round_throughput.py --runners "fedjax_fm[unrolled],fedjax_fm[chunked5],fedjax_fm[chunked25]"
  python benchmarks/round_throughput.py --workload w2 --json /tmp/w2.json  # full W2
  python benchmarks/round_throughput.py --workload w2 --clients 256 --dtype bfloat16  # W2, GPU
  python benchmarks/round_throughput.py --quick              # CI smoke of W1 (< 1 min)
  python benchmarks/round_throughput.py --workload w2 --quick  # CI smoke of W2, tiny BERT
  python benchmarks/round_throughput.py --devices 2          # 2 fake CPU devices (mesh)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import time

BASELINE_RUNNERS = ("jax_client_loop", "torch_loop", "torch_loop[threads=1]", "pfl", "drjax")
ENGINE_EXAMPLES = ("fedjax_fm[default]", "fedjax_fm[vmap]", "fedjax_fm[vmap,scan]",
                   "fedjax_fm[unrolled]", "fedjax_fm[chunked8]", "fedjax_fm[sequential5,scan]")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workload", choices=("w1", "w2", "w3"), default="w1")
  p.add_argument("--quick", action="store_true",
                 help="CI smoke run (< 1 min): W1 with 100 clients, cohort 5, the default "
                 "engine row and torch_loop; W2 on a tiny random-weight BERT, 2 clients x 1 "
                 "step, every runner kind; 2 timed rounds")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds per runner (default 5; quick: 2)")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed rounds per runner before timing (the first one compiles)")
  p.add_argument("--clients", type=int, default=None,
                 help="clients in the federation (W1: 1000, quick 100; W2: 16, quick 4, all in "
                 "every round)")
  p.add_argument("--cohort", type=int, default=None, help="W1: clients per round (50; quick 5)")
  p.add_argument("--examples", type=int, default=None, help="W1: examples per client (50)")
  p.add_argument("--batch", type=int, default=None, help="local batch size (W1 10, W2 8)")
  p.add_argument("--steps", type=int, default=None, help="W2: local steps per client (4)")
  p.add_argument("--seq_len", type=int, default=None, help="W2: tokens per sequence (32)")
  p.add_argument("--layers", type=int, default=None,
                 help="W2: a random-weight BERT of all-MiniLM-L6-v2's sizes with this many "
                 "layers instead of the real model")
  p.add_argument("--shape", choices=("llama-100m", "tiny"), default=None,
                 help="W3: the decoder's shape (llama-100m; quick: tiny)")
  p.add_argument("--bottleneck", type=int, default=None, help="W2: adapter width (32)")
  p.add_argument("--no_dropout", action="store_true",
                 help="W1: dropout off in every runner, so all compute the same round and the "
                 "table's rel. diff column checks them")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="W2: compute dtype of the model (parameters stay float32) and of the peak")
  p.add_argument("--model_path", type=str, default=None,
                 help="W2: a Hugging Face BERT folder (default: the all-MiniLM-L6-v2 asset; "
                 "quick: a tiny random BERT)")
  p.add_argument("--runners", type=str, default=None,
                 help="comma-separated runners: engine rows like " + ", ".join(ENGINE_EXAMPLES)
                 + ", and " + ", ".join(BASELINE_RUNNERS))
  p.add_argument("--devices", type=int, default=None,
                 help="fake CPU devices (sets XLA_FLAGS=--xla_force_host_platform_device_count)")
  p.add_argument("--xla_flags", type=str, default="",
                 help="extra XLA_FLAGS for every JAX row, appended before jax is imported")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads (default: all cores)")
  p.add_argument("--no_interleave", dest="interleave", action="store_false",
                 help="time each runner's rounds right after its warm-up (default: all runners "
                 "warmed up, then the timed rounds round-robin over the runners)")
  p.add_argument("--json", type=str, default=None, help="write the records to this path")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.workload == "w1" and args.dtype != "float32":
    p.error("W1 runs in float32 only")
  if args.rounds is None:
    args.rounds = 2 if args.quick else 5
  # Split on the commas outside brackets ("fedjax_fm[vmap,scan],torch_loop").
  args.runners_given = args.runners
  if args.runners is not None:
    args.runners = [r.strip() for r in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", args.runners)
                    if r.strip()]
  return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
  # XLA reads XLA_FLAGS once, when jax initialises its backend: set it before importing jax.
  _flags = os.environ.get("XLA_FLAGS", "")
  if ARGS.devices:
    _flags += f" --xla_force_host_platform_device_count={ARGS.devices}"
  if ARGS.xla_flags:
    _flags += " " + ARGS.xla_flags
  os.environ["XLA_FLAGS"] = _flags.strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import jax

from fedjax_fm import sharding

import jax_runners
import pfl_runner
import workload_w1
import workload_w2
import workload_w3
from measure import Noise, autogroup_warning, measure_peak, progress

WORKLOADS = {"w1": workload_w1, "w2": workload_w2, "w3": workload_w3}
PFL_HOWTO = ("pfl pins an older absl-py than fedjax_fm: install it in its own venv, "
             "benchmarks/pfl_runner.py says how")


def fill_defaults(args, module):
  """The workload's defaults for every size flag left unset (its quick ones with --quick)."""
  defaults = dict(module.DEFAULTS, **(module.QUICK_DEFAULTS if args.quick else {}))
  for key, value in defaults.items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  if args.runners is None:
    args.runners = list(module.QUICK_RUNNERS if args.quick else module.DEFAULT_RUNNERS)


def build_runner(name: str, work, mesh):
  if jax_runners.parse_engine_runner(name):
    return jax_runners.engine_runner(name, work.loss_fn, work.roles, work.params, mesh,
                                     work.num_clients, client_lr=work.client_lr,
                                     server_lr=work.server_lr)
  if name == "jax_client_loop":
    return jax_runners.jax_client_loop_runner(work.loss_fn, work.roles, work.params,
                                              client_lr=work.client_lr, server_lr=work.server_lr)
  if name == "drjax":
    return jax_runners.drjax_runner(work.loss_fn, work.roles, work.params,
                                    client_lr=work.client_lr, server_lr=work.server_lr)
  if name == "pfl":
    if work.pfl_runner is None:
      raise ValueError("the pfl row needs torch")
    return work.pfl_runner()
  m = re.match(r"^torch_loop(?:\[threads=(\d+)\])?$", name)
  if m:
    step = work.torch_runner()
    if m.group(1):
      step = with_torch_threads(step, int(m.group(1)))
    return step
  raise ValueError(f"unknown runner {name!r}; engine rows look like {ENGINE_EXAMPLES}, "
                   f"baselines are {BASELINE_RUNNERS}")


def with_torch_threads(step, threads: int):
  """`step` run with torch.set_num_threads(threads), the process's setting restored after.

  On a CPU shared with other processes, torch's OpenMP threads slow down badly once one of them
  loses its core (each op waits for the slowest thread); one thread avoids that.
  """
  import torch

  def run(cohort, r):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
      step(cohort, r)
    finally:
      torch.set_num_threads(before)

  run.info, run.shared = step.info, step.shared
  return run


def relative_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  """max |a - b| / max |b| over all leaves (the same paths in both)."""
  if set(a) != set(b):
    raise ValueError(f"runners disagree on the shared parameters: {sorted(set(a) ^ set(b))}")
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in b)
  return diff / max(max(float(np.max(np.abs(v))) for v in b.values()), 1e-30)


def print_table(work, records, args, peak, peak_reps, default_name):
  backend = jax.default_backend()
  peak_best = max(peak.values())
  ref = next((r["s_per_round"] for r in records if r["default"]), None)
  torch_s = min((r["s_per_round"] for r in records if r["runner"].startswith("torch_loop")),
                default=None)
  print(f"{work.summary}, {work.round_flops / 1e9:.1f} GFLOP/round; backend {backend} "
        f"({jax.device_count()} device(s)); {args.dtype} matmul peak {peak_best:.0f} GFLOP/s ("
        + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()) + f", median of {peak_reps}); "
        f"median of {args.rounds} rounds after {args.warmup} warm-up"
        + (", timed rounds interleaved over runners" if args.interleave else ""))
  check = work.deterministic and args.warmup > 0
  tok = work.tokens is not None
  print("| runner | s/round | client-steps/s |" + (" tokens/s |" if tok else "")
        + " vs default | vs best torch | GFLOP/s | % of peak "
        "| warm-up s | other/steal CPU % |" + (" rel. diff |" if check else ""))
  print("|---|---|---|---|---|---|---|---|---|" + ("---|" if tok else "") + ("---|" if check else ""))
  for rec in records:
    s = rec["s_per_round"]
    row = (f"| {rec['runner'] + (' *' if rec['default'] else '')} | {s:.2f} "
           f"| {rec['client_steps_per_s']:.0f} "
           + (f"| {work.tokens / s:.0f} " if tok else "")
           + f"| {f'{ref / s:.2f}x' if ref else 'n/a'} "
           f"| {f'{torch_s / s:.2f}x' if torch_s else 'n/a'} | {rec['gflops']:.1f} "
           f"| {100 * rec['peak_fraction']:.0f}% | {rec['warmup_s']:.1f} "
           f"| {100 * rec['other_cpu_share']:.0f}/{100 * rec['steal_share']:.0f} |")
    if check:
      row += f" {rec['rel_diff_vs_first']:.1e} |"
    print(row)
  print(f"* = default_execution() on this backend ({default_name}). vs default / vs best torch = "
        "that runner's (the fastest torch_loop row's) s/round / this runner's s/round (>1 = "
        "faster). warm-up s: build + first "
        "round(s), compile included. other/steal: CPU share taken by other processes / the "
        "hypervisor while timed."
        + (" rel. diff: max |shared params - first runner's| / max |first runner's| after "
           "round 1." if check else ""))


def time_round(runner: dict, name: str, work, r: int, args):
  """Times round r of a built runner, with the CPU share others took meanwhile."""
  with Noise() as noise:
    t = time.perf_counter()
    runner["step"](work.cohorts[r], r)
    runner["times"].append(time.perf_counter() - t)
  runner["noise"].append(noise)
  progress(f"  {name:30s} round {r + 1}/{args.warmup + args.rounds}: "
           f"{runner['times'][-1]:7.3f} s {runner['step'].info()}")


def time_weighted(noises, times, attr: str) -> float:
  values = [(getattr(n, attr), t) for n, t in zip(noises, times) if not np.isnan(getattr(n, attr))]
  return (sum(v * t for v, t in values) / sum(t for _, t in values)) if values else float("nan")


def main(args):
  module = WORKLOADS[args.workload]
  fill_defaults(args, module)
  try:
    import torch
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    tdev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  except ImportError:
    torch, tdev = None, None

  backend = jax.default_backend()
  progress(f"backend={backend} devices={jax.device_count()} cpu_cores={os.cpu_count()} "
           f"jax={jax.__version__} torch={getattr(torch, '__version__', None)} "
           f"torch_device={tdev} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  warning = autogroup_warning() if os.nice(0) != 0 else None
  if warning:
    progress(f"warning: {warning}")
  mesh = sharding.make_mesh()
  default_name = jax_runners.default_runner_name()
  runners = [default_name if r == "fedjax_fm[default]" else r for r in args.runners]
  runners = list(dict.fromkeys(runners))  # de-duplicate, keep order
  if torch is None and any(r.startswith("torch_loop") or r == "pfl" for r in runners):
    progress("torch is not installed: skipping the torch_loop and pfl rows")
    runners = [r for r in runners if not (r.startswith("torch_loop") or r == "pfl")]
  if args.runners_given is None:  # the workload's default rows: peers only where installed
    for peer, ok, how in (("pfl", pfl_runner.available(), PFL_HOWTO),
                          ("drjax", importlib.util.find_spec("drjax") is not None,
                           "pip install drjax")):
      if peer in runners and not ok:
        progress(f"{peer} is not installed: no {peer} row ({how})")
        runners.remove(peer)

  peak_reps = 3 if args.quick else 10
  peak = measure_peak(torch, tdev, reps=peak_reps, dtype=args.dtype)
  peak_best = max(peak.values())
  progress(f"{args.dtype} matmul peak (2048^3, median of {peak_reps}): "
           + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))

  work = module.setup(args, torch, tdev, args.warmup + args.rounds)
  progress(f"{work.summary}: {work.round_flops / 1e9:.1f} GFLOP/round")

  # Every runner is built and warmed up first; then the timed rounds go round-robin (round r of
  # every runner, then round r + 1), so that on a shared machine a burst of other work lands
  # on all rows alike instead of on whichever runner happened to be timed then.
  # --no_interleave times each runner's rounds right after its warm-up (one runner alive at a
  # time: less memory).
  first_shared, built = None, {}
  timed = range(args.warmup, args.warmup + args.rounds)
  for name in runners:
    t_build = time.perf_counter()
    step = build_runner(name, work, mesh)
    rel_diff = None
    for r in range(args.warmup):
      t = time.perf_counter()
      step(work.cohorts[r], r)
      progress(f"  {name:30s} round {r + 1}/{args.warmup + args.rounds} (warm-up): "
               f"{time.perf_counter() - t:7.3f} s {step.info()}")
      if r == 0 and work.deterministic:
        shared = step.shared()
        first_shared = first_shared or shared
        rel_diff = relative_difference(shared, first_shared)
        progress(f"  {name:30s} after round 1: rel. diff from the first runner {rel_diff:.1e}")
    built[name] = {"step": step, "warmup_s": time.perf_counter() - t_build,
                   "rel_diff": rel_diff, "times": [], "noise": []}
    if not args.interleave:
      for r in timed:
        time_round(built[name], name, work, r, args)
      built[name]["step"] = None  # free the runner's device state before the next one
  if args.interleave:
    for r in timed:
      for name in runners:
        time_round(built[name], name, work, r, args)

  records = []
  for name in runners:
    b = built[name]
    s = float(np.median(b["times"]))
    gflops = work.round_flops / s / 1e9
    rec = {"workload": work.name, "runner": name, "s_per_round": s,
           "client_steps_per_s": work.client_steps / s, "gflops": gflops,
           "tokens_per_s": None if work.tokens is None else work.tokens / s,
           "peak_fraction": gflops / peak_best, "default": name == default_name,
           "warmup_s": b["warmup_s"], "round_times_s": b["times"],
           "other_cpu_share": time_weighted(b["noise"], b["times"], "other"),
           "steal_share": time_weighted(b["noise"], b["times"], "steal"),
           "interleaved": args.interleave}
    if work.deterministic and args.warmup:
      rec["rel_diff_vs_first"] = b["rel_diff"]
    records.append(rec)
  built.clear()

  print_table(work, records, args, peak, peak_reps, default_name)
  if args.json:
    meta = {"peak_gflops": peak_best, "peak": peak, "dtype": args.dtype, "backend": backend,
            "devices": jax.device_count(), "clients": args.clients, "rounds": args.rounds,
            "round_gflop": work.round_flops / 1e9, "summary": work.summary,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for rec in records:
      rec.update(meta)
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
    progress(f"wrote {len(records)} records to {args.json}")
  return records


if __name__ == "__main__":
  main(ARGS)
