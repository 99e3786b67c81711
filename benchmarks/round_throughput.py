r"""Round throughput of FedAvg on workload W1 (pfl-research's CIFAR-10 cross-device setup).

W1: 1000 clients x 50 synthetic 32x32x3 images (seeded numpy; CIFAR-10 itself is not
downloaded), cohort 50, one local epoch with batch 10 (5 local SGD steps), client SGD lr 0.1,
server SGD lr 1.0, pfl-research's small CIFAR-10 CNN (`fedjax_fm.models.SimpleCNN`).

Runners, timed side by side in one process on the same pre-built cohorts:

- ``fedjax_fm[...]``: the engine's round (`fedavg` + `RoundRunner`, one jitted program per
  round), one row per client execution strategy; ``*`` marks `default_execution()`.
- ``jax_client_loop``: FedJAX's execution model: the same JAX local update (one client's 5 SGD
  steps) jitted once and called per client from a Python loop, then weighted averaging.
- ``torch_loop``: a sequential PyTorch loop over clients with one model reloaded per client
  (load_state_dict of the global model, local SGD, accumulate the weighted state), NCHW.

Reported per runner: seconds per round (median over the timed rounds, after warm-up rounds
that include compilation), client-steps/s, the ratio to the default fedjax_fm row, achieved
GFLOP/s from an analytic FLOP count, and its fraction of this machine's fp32 matmul peak
(measured here: the faster of a 2048^3 jnp.dot and torch.mm, median of several).

Usage::

  python benchmarks/round_throughput.py                      # full W1 (~10 min on 2 CPU cores)
  python benchmarks/round_throughput.py --quick              # CI smoke (< 1 min)
  python benchmarks/round_throughput.py --json /tmp/w1.json
  python benchmarks/round_throughput.py --cohort 500 --runners fedjax_fm[vmap],torch_loop
  python benchmarks/round_throughput.py --devices 2          # 2 fake CPU devices (mesh)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Runner names -> (strategy, chunk_size, scan_unroll) for the engine rows.
ENGINE_RUNNERS = {
    "fedjax_fm[unrolled]": ("unrolled", 8, True),
    "fedjax_fm[unrolled,scan]": ("unrolled", 8, 1),
    "fedjax_fm[chunked5]": ("chunked", 5, True),
    "fedjax_fm[chunked10]": ("chunked", 10, True),
    "fedjax_fm[vmap]": ("vmap", 8, True),
    "fedjax_fm[vmap,scan]": ("vmap", 8, 1),
}
BASELINE_RUNNERS = ("jax_client_loop", "torch_loop")
ALL_RUNNERS = tuple(ENGINE_RUNNERS) + BASELINE_RUNNERS
# The CPU-worthy subset run by default (vmap/scan rows are slow on XLA:CPU; ask for them).
DEFAULT_RUNNERS = ("fedjax_fm[unrolled]", "fedjax_fm[unrolled,scan]", "fedjax_fm[chunked5]",
                   "fedjax_fm[chunked10]", "fedjax_fm[vmap]", "jax_client_loop", "torch_loop")
QUICK_RUNNERS = ("fedjax_fm[default]", "jax_client_loop", "torch_loop")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="CI smoke run: cohort 10, 3 rounds, the default engine row + baselines")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds per runner (default 5; quick: 3)")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed rounds per runner before timing (include compilation)")
  p.add_argument("--cohort", type=int, default=None, help="clients per round (default 50)")
  p.add_argument("--clients", type=int, default=1000, help="clients in the federation")
  p.add_argument("--examples", type=int, default=50, help="examples per client")
  p.add_argument("--batch", type=int, default=10, help="local batch size")
  p.add_argument("--runners", type=str, default=None,
                 help="comma-separated subset of: " + ", ".join(ALL_RUNNERS)
                 + ", fedjax_fm[default]; 'all' for every runner")
  p.add_argument("--devices", type=int, default=None,
                 help="fake CPU devices (sets XLA_FLAGS=--xla_force_host_platform_device_count)")
  p.add_argument("--xla_flags", type=str, default="",
                 help="extra XLA_FLAGS, appended before jax is imported")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads (default: all cores)")
  p.add_argument("--json", type=str, default=None, help="write the records to this path")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.rounds is None:
    args.rounds = 3 if args.quick else 5
  if args.cohort is None:
    args.cohort = 10 if args.quick else 50
  if args.runners is None:
    args.runners = ",".join(QUICK_RUNNERS if args.quick else DEFAULT_RUNNERS)
  elif args.runners == "all":
    args.runners = ",".join(ALL_RUNNERS)
  args.runners = [r.strip() for r in args.runners.split(",") if r.strip()]
  for r in args.runners:
    if r not in ALL_RUNNERS and r != "fedjax_fm[default]":
      p.error(f"unknown runner {r!r}; choose from {ALL_RUNNERS + ('fedjax_fm[default]',)}")
  return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
  # XLA reads XLA_FLAGS once, when jax initialises its backend: set it before importing jax.
  flags = os.environ.get("XLA_FLAGS", "")
  if ARGS.devices:
    flags += f" --xla_force_host_platform_device_count={ARGS.devices}"
  if ARGS.xla_flags:
    flags += " " + ARGS.xla_flags
  os.environ["XLA_FLAGS"] = flags.strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_fm import cohort as cohort_lib
from fedjax_fm import local
from fedjax_fm import roles as roles_lib
from fedjax_fm import runner as runner_lib
from fedjax_fm import sharding
from fedjax_fm.algorithm import ClientExecution, default_execution
from fedjax_fm.algorithms import fedavg
from fedjax_fm.models import SimpleCNN, classification_loss, functional

WORKLOAD = "W1"
IMAGE = (32, 32, 3)
NUM_CLASSES = 10
CLIENT_LR, SERVER_LR = 0.1, 1.0


def forward_flops_per_image() -> int:
  """Multiply-adds x2 of SimpleCNN on one 32x32x3 image (convs, dense layers; VALID padding)."""
  return 2 * (30 * 30 * 32 * 27 + 28 * 28 * 64 * 288 + 12544 * 128 + 128 * 10)


def round_flops(cohort: int, steps: int, batch: int) -> float:
  """Training FLOPs of one round: forward + backward ~ 3x forward, per example seen."""
  return 3.0 * forward_flops_per_image() * cohort * steps * batch


def _median_time(fn, reps: int) -> float:
  fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def measure_peak(torch_mod, torch_device, n: int = 2048, reps: int = 10) -> dict[str, float]:
  """fp32 GFLOP/s of an n^3 matmul in JAX and in torch (median of `reps`)."""
  flops = 2.0 * n ** 3
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  out = {"jax": flops / _median_time(lambda: dot(a, b).block_until_ready(), reps) / 1e9}
  if torch_mod is not None:
    ta = torch_mod.randn(n, n, device=torch_device)
    tb = torch_mod.randn(n, n, device=torch_device)
    sync = torch_mod.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)

    def mm():
      torch_mod.mm(ta, tb)
      sync()

    out["torch"] = flops / _median_time(mm, reps) / 1e9
  return out


def make_federation(args) -> cohort_lib.FederatedData:
  """`clients` x `examples` synthetic CIFAR-shaped images with random labels (seeded numpy)."""
  rng = np.random.default_rng(args.seed)
  n = args.clients * args.examples
  x = rng.standard_normal((n,) + IMAGE, dtype=np.float32)
  y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  offsets = np.arange(0, n + 1, args.examples, dtype=np.int64)
  return cohort_lib.FederatedData({"x": x, "y": y}, offsets)


def make_cohorts(fed, args, steps: int, count: int) -> list[cohort_lib.Cohort]:
  """The cohorts of rounds 0..count-1 (the same for every runner; built before timing)."""
  out = []
  for r in range(count):
    ids = cohort_lib.sample_clients(args.seed, r, fed.num_clients, args.cohort)
    out.append(cohort_lib.make_cohort(fed, ids, steps=steps, batch_size=args.batch,
                                      seed=args.seed, round_num=r))
  return out


# --------------------------------------------------------------------------- runners
# Each runner is built as `make() -> step(cohort, round) -> None`; `step` runs one full round
# and blocks until its results exist.


def engine_runner(execution: ClientExecution, graphdef, params, mesh, num_clients: int):
  roles = roles_lib.assign_roles(params)
  alg = fedavg(classification_loss(graphdef), roles, client_lr=CLIENT_LR, server_lr=SERVER_LR,
               execution=execution)
  run = runner_lib.RoundRunner(alg, mesh)
  state = {}
  state["server"], state["clients"] = run.place(
      alg.init(params, jax.random.key(0)),
      alg.init_clients(params, runner_lib.padded_rows(num_clients, mesh)))
  base = jax.random.key(1)

  def step(cohort, r):
    server, clients, metrics = run(state["server"], state["clients"], cohort,
                                   jax.random.fold_in(base, r))
    jax.block_until_ready((server, clients, metrics))
    state["server"], state["clients"] = server, clients
    state["loss"] = float(metrics["loss"])

  step.info = lambda: f"compilations={run.compilations} loss={state.get('loss', float('nan')):.3f}"
  return step


def jax_client_loop_runner(graphdef, params):
  """FedJAX's model: one jitted local update (5 SGD steps), called per client from Python."""
  loss_fn = classification_loss(graphdef)
  opt = optax.sgd(CLIENT_LR)

  def objective(p, batch, mask, key):
    return local.masked_loss(loss_fn, p, batch, mask, key)

  @jax.jit
  def local_update(p, batches, mask, key):
    # unroll=True: no loop in the XLA program, as with FedJAX's per-batch jitted step.
    trained, _ = local.train_steps(objective, opt, p, batches, mask, key, unroll=True)
    return jax.tree_util.tree_map(jnp.subtract, trained, p)

  @jax.jit
  def accumulate(acc, delta, w):
    return jax.tree_util.tree_map(lambda a, d: a + w * d, acc, delta)

  @jax.jit
  def server_update(p, acc, total):
    return jax.tree_util.tree_map(lambda x, a: x + SERVER_LR * a / total, p, acc)

  state = {"params": jax.tree_util.tree_map(jnp.array, params)}
  base = jax.random.key(1)

  def step(cohort, r):
    p = state["params"]
    acc = jax.tree_util.tree_map(jnp.zeros_like, p)
    keys = jax.random.split(jax.random.fold_in(base, r), cohort.num_clients)
    for k in range(cohort.num_clients):
      batches = {name: v[k] for name, v in cohort.data.items()}
      delta = local_update(p, batches, cohort.mask[k], keys[k])
      acc = accumulate(acc, delta, cohort.weights[k])
    state["params"] = jax.block_until_ready(
        server_update(p, acc, float(np.sum(cohort.weights))))

  step.info = lambda: ""
  return step


def torch_cnn(torch_mod):
  nn = torch_mod.nn
  return nn.Sequential(
      nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
      nn.Dropout(0.25), nn.Flatten(), nn.Linear(12544, 128), nn.ReLU(), nn.Dropout(0.5),
      nn.Linear(128, NUM_CLASSES))


def torch_loop_runner(torch_mod, device):
  """Sequential clients; one model reloaded with the global state per client."""
  torch = torch_mod
  torch.manual_seed(0)
  global_model = torch_cnn(torch).to(device)
  model = torch_cnn(torch).to(device)
  model.train()
  loss_fn = torch.nn.CrossEntropyLoss()
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  def to_torch(cohort):
    # NHWC numpy -> NCHW tensors on the device. Part of the timed round, as the engine's
    # device_put of the cohort is (a few ms on CPU).
    x = torch.from_numpy(np.ascontiguousarray(cohort.data["x"].transpose(0, 1, 2, 5, 3, 4)))
    return x.to(device), torch.from_numpy(cohort.data["y"]).long().to(device)

  def step(cohort, r):
    del r
    x, y = to_torch(cohort)
    global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
    total = 0.0
    for k in range(cohort.num_clients):
      model.load_state_dict(global_state)
      opt = torch.optim.SGD(model.parameters(), lr=CLIENT_LR)
      for s in range(x.shape[1]):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[k, s]), y[k, s]).backward()
        opt.step()
      w = float(cohort.weights[k])
      total += w
      with torch.no_grad():
        for name, v in model.state_dict().items():
          acc[name].add_(v - global_state[name], alpha=w)
    with torch.no_grad():
      new = {name: global_state[name] + SERVER_LR * acc[name] / total for name in acc}
    global_model.load_state_dict(new)
    sync()

  step.info = lambda: ""
  return step


# --------------------------------------------------------------------------- main


def execution_name(ex: ClientExecution) -> str:
  for name, (strategy, chunk, unroll) in ENGINE_RUNNERS.items():
    if (ex.strategy == strategy and ex.scan_unroll == unroll
        and (strategy != "chunked" or ex.chunk_size == chunk)):
      return name
  return f"fedjax_fm[{ex.strategy},chunk={ex.chunk_size},unroll={ex.scan_unroll}]"


def progress(msg: str):
  print(msg, file=sys.stderr, flush=True)


def main(args):
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    tdev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  except ImportError:
    torch, tdev = None, None

  backend = jax.default_backend()
  mesh = sharding.make_mesh()
  default_name = execution_name(default_execution())
  runners = [default_name if r == "fedjax_fm[default]" else r for r in args.runners]
  runners = list(dict.fromkeys(runners))  # de-duplicate, keep order
  if torch is None and "torch_loop" in runners:
    progress("torch is not installed: skipping torch_loop")
    runners.remove("torch_loop")

  steps = -(-args.examples // args.batch)  # one local epoch
  flops = round_flops(args.cohort, steps, args.batch)
  client_steps = args.cohort * steps

  progress(f"backend={backend} devices={jax.device_count()} mesh={dict(mesh.shape)} "
           f"cpu_cores={os.cpu_count()} jax={jax.__version__} "
           f"torch={getattr(torch, '__version__', None)} torch_device={tdev}")
  progress(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  peak = measure_peak(torch, tdev)
  peak_gflops = max(peak.values())
  progress("fp32 matmul peak (2048^3, median): "
           + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))

  fed = make_federation(args)
  cohorts = make_cohorts(fed, args, steps, args.warmup + args.rounds)
  model = SimpleCNN(IMAGE, NUM_CLASSES, rngs=nnx.Rngs(args.seed))
  graphdef, params = functional(model)

  records = []
  for name in runners:
    t_build = time.perf_counter()
    if name in ENGINE_RUNNERS:
      strategy, chunk, unroll = ENGINE_RUNNERS[name]
      ex = ClientExecution(strategy=strategy, chunk_size=chunk, scan_unroll=unroll, mesh=mesh)
      step = engine_runner(ex, graphdef, params, mesh, fed.num_clients)
    elif name == "jax_client_loop":
      step = jax_client_loop_runner(graphdef, params)
    else:
      step = torch_loop_runner(torch, tdev)
    times = []
    for r in range(args.warmup + args.rounds):
      t = time.perf_counter()
      step(cohorts[r], r)
      dt = time.perf_counter() - t
      if r >= args.warmup:
        times.append(dt)
      progress(f"  {name:26s} round {r + 1}/{args.warmup + args.rounds}"
               f"{' (warm-up)' if r < args.warmup else ''}: {dt:7.3f} s {step.info()}")
    s = float(np.median(times))
    gflops = flops / s / 1e9
    records.append({
        "workload": WORKLOAD, "runner": name, "s_per_round": s,
        "client_steps_per_s": client_steps / s, "gflops": gflops,
        "peak_fraction": gflops / peak_gflops,
        "default": name == default_name,
        "warmup_s": time.perf_counter() - t_build - sum(times),
        "round_times_s": times,
    })

  ref = next((r["s_per_round"] for r in records if r["default"]), None)
  title = (f"{WORKLOAD}: {fed.num_clients} clients x {args.examples} imgs, cohort {args.cohort}, "
           f"{steps} local steps of batch {args.batch}, {flops / 1e9:.1f} GFLOP/round; "
           f"backend {backend} ({jax.device_count()} device(s)); fp32 matmul peak "
           f"{peak_gflops:.0f} GFLOP/s; median of {args.rounds} rounds")
  print(title)
  header = ("| runner | s/round | client-steps/s | vs default | GFLOP/s | % of peak "
            "| warm-up s |")
  print(header)
  print("|" + "---|" * 7)
  for rec in records:
    ratio = f"{ref / rec['s_per_round']:.2f}x" if ref else "n/a"
    print(f"| {rec['runner'] + (' *' if rec['default'] else '')} | {rec['s_per_round']:.3f} "
          f"| {rec['client_steps_per_s']:.0f} | {ratio} | {rec['gflops']:.1f} "
          f"| {100 * rec['peak_fraction']:.0f}% | {rec['warmup_s']:.1f} |")
  print(f"* = default_execution() on this backend: {default_name}. 'vs default' = default "
        "s/round / runner s/round (>1 is faster than the default). Warm-up includes compilation.")

  if args.json:
    meta = {"peak_gflops": peak_gflops, "peak": peak, "backend": backend,
            "devices": jax.device_count(), "cohort": args.cohort, "rounds": args.rounds,
            "round_gflop": flops / 1e9, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for rec in records:
      rec.update(meta)
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
    progress(f"wrote {len(records)} records to {args.json}")
  return records


if __name__ == "__main__":
  main(ARGS)
