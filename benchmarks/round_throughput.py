r"""Round throughput of FedAvg on workload W1 (pfl-research's CIFAR-10 cross-device setup).

W1: 1000 clients x 50 synthetic 32x32x3 images (seeded numpy; CIFAR-10 itself is not
downloaded), cohort 50, one local epoch with batch 10 (5 local SGD steps), client SGD lr 0.1,
server SGD lr 1.0, pfl-research's small CIFAR-10 CNN (`fedjax_fm.models.SimpleCNN`).

Runners, timed side by side in one process on the same pre-built cohorts:

- ``fedjax_fm[...]``: the engine's round (`fedavg` + `RoundRunner`, one jitted program per
  round, with the runner's default XLA options), one row per client execution strategy
  (``sequential5`` = strategy "sequential" with chunk_size 5, ``chunked5`` = "chunked" with 5;
  a ``,scan`` suffix = local steps in a rolled `lax.scan`, scan_unroll=1, otherwise
  scan_unroll=True); ``*`` marks `default_execution()`.
- ``jax_client_loop``: FedJAX's execution model: the same JAX local update (one client's 5 SGD
  steps, same model and XLA options) jitted once and called per client from a Python loop,
  then weighted averaging.
- ``torch_loop``: a sequential PyTorch loop over clients with one model reloaded per client
  (load_state_dict of the global model, local SGD, accumulate the weighted state), NCHW.

Reported per runner: seconds per round (median over the timed rounds, after warm-up rounds
that include compilation), client-steps/s, the ratio to the default fedjax_fm row, achieved
GFLOP/s from an analytic FLOP count and its fraction of this machine's fp32 matmul peak
(measured here: the faster of a 2048^3 jnp.dot and torch.mm, median of 10), plus the share of
the CPU that other processes and the hypervisor (steal) took while the runner was timed.

`--probe` instead times the pieces on one client (5 local steps): conv2's forward and
backward convolutions per implementation, and the local update with and without each of the
CPU measures the engine takes (canonical-layout conv VJP, reshape max-pool, YNNPACK
convolutions off, steps in a loop), to show where the time goes.

Usage::

  python benchmarks/round_throughput.py --json /tmp/w1.json  # full W1 (~4 min on 2 CPU cores)
  python benchmarks/round_throughput.py --runners "fedjax_fm[unrolled],fedjax_fm[chunked5],fedjax_fm[chunked25]"
  python benchmarks/round_throughput.py --quick              # CI smoke (< 1 min)
  python benchmarks/round_throughput.py --probe              # per-op / per-client breakdown
  python benchmarks/round_throughput.py --cohort 500 --runners "fedjax_fm[default],torch_loop"
  python benchmarks/round_throughput.py --devices 2          # 2 fake CPU devices (mesh)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

# Runner names -> (strategy, chunk_size, scan_unroll) for the engine rows. A `,scan` suffix
# means scan_unroll=1 (local steps in a rolled lax.scan); no suffix, scan_unroll=True.
ENGINE_RUNNERS = {
    "fedjax_fm[sequential5,scan]": ("sequential", 5, 1),
    "fedjax_fm[sequential5]": ("sequential", 5, True),
    "fedjax_fm[sequential1,scan]": ("sequential", 1, 1),
    "fedjax_fm[unrolled]": ("unrolled", 8, True),
    "fedjax_fm[unrolled,scan]": ("unrolled", 8, 1),
    "fedjax_fm[chunked5]": ("chunked", 5, True),
    "fedjax_fm[chunked25]": ("chunked", 25, True),
    "fedjax_fm[vmap]": ("vmap", 8, True),
    "fedjax_fm[vmap,scan]": ("vmap", 8, 1),
}
BASELINE_RUNNERS = ("jax_client_loop", "torch_loop")
ALL_RUNNERS = tuple(ENGINE_RUNNERS) + BASELINE_RUNNERS
# The full run's rows: about 4 minutes on 2 CPU cores. `fedjax_fm[default]` is
# `default_execution()`: `sequential5,scan` on CPU, `vmap,scan` on an accelerator. The unrolled
# and chunked rows (1.5-4 minutes each on XLA:CPU, mostly compiling) are left out to keep the run
# short; BENCHMARKS.md runs them with a second command (`--runners`, about 7 minutes).
DEFAULT_RUNNERS = ("fedjax_fm[default]", "fedjax_fm[sequential5]", "fedjax_fm[vmap]",
                   "jax_client_loop", "torch_loop")
QUICK_RUNNERS = ("fedjax_fm[default]", "torch_loop")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="CI smoke run (< 1 min): 100 clients, cohort 5, 2 rounds, the default "
                 "engine row and torch_loop")
  p.add_argument("--probe", action="store_true",
                 help="time conv2's ops and one client's local update per CPU fix, no rounds")
  p.add_argument("--profile", action="store_true",
                 help="with --probe: per-op profile of one client's update (stock and current); "
                 "on CPU add --xla_flags=--xla_cpu_enable_xprof_traceme=true")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds per runner (default 5; quick: 2)")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed rounds per runner before timing (the first one compiles)")
  p.add_argument("--cohort", type=int, default=None, help="clients per round (default 50)")
  p.add_argument("--clients", type=int, default=None,
                 help="clients in the federation (default 1000; quick: 100)")
  p.add_argument("--examples", type=int, default=50, help="examples per client")
  p.add_argument("--batch", type=int, default=10, help="local batch size")
  p.add_argument("--runners", type=str, default=None,
                 help="comma-separated subset of: " + ", ".join(ALL_RUNNERS)
                 + ", fedjax_fm[default]; 'all' for every runner")
  p.add_argument("--devices", type=int, default=None,
                 help="fake CPU devices (sets XLA_FLAGS=--xla_force_host_platform_device_count)")
  p.add_argument("--xla_flags", type=str, default="",
                 help="extra XLA_FLAGS for every JAX row, appended before jax is imported")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads (default: all cores)")
  p.add_argument("--json", type=str, default=None, help="write the records to this path")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.rounds is None:
    args.rounds = 2 if args.quick else 5
  if args.cohort is None:
    args.cohort = 5 if args.quick else 50
  if args.clients is None:
    args.clients = 100 if args.quick else 1000
  if args.runners is None:
    args.runners = ",".join(QUICK_RUNNERS if args.quick else DEFAULT_RUNNERS)
  elif args.runners == "all":
    args.runners = ",".join(ALL_RUNNERS)
  # Split on the commas outside brackets ("fedjax_fm[vmap,scan],torch_loop").
  args.runners = [r.strip() for r in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", args.runners)
                  if r.strip()]
  for r in args.runners:
    if r not in ALL_RUNNERS and r != "fedjax_fm[default]":
      p.error(f"unknown runner {r!r}; choose from {ALL_RUNNERS + ('fedjax_fm[default]',)}")
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
from fedjax_fm.models.cnn import dropout

WORKLOAD = "W1"
IMAGE = (32, 32, 3)
NUM_CLASSES = 10
CLIENT_LR, SERVER_LR = 0.1, 1.0
# The round's XLA:CPU options (YNNPACK for dots and reductions, not convolutions).
CPU_OPTIONS = runner_lib.CPU_COMPILER_OPTIONS


def forward_flops_per_image() -> int:
  """Multiply-adds x2 of SimpleCNN on one 32x32x3 image (convs, dense layers; VALID padding)."""
  return 2 * (30 * 30 * 32 * 27 + 28 * 28 * 64 * 288 + 12544 * 128 + 128 * 10)


def round_flops(cohort: int, steps: int, batch: int) -> float:
  """Training FLOPs of one round: forward + backward ~ 3x forward, per example seen."""
  return 3.0 * forward_flops_per_image() * cohort * steps * batch


# --------------------------------------------------------------------------- measurement


def _cpu_stat() -> tuple[int, int, int]:
  """(busy, total, steal) jiffies of the whole machine; zeros where /proc/stat is absent."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return 0, 0, 0
  return sum(v[:3]) + sum(v[5:7]), sum(v), v[7]


class Noise:
  """Shares of the machine's CPU time taken, during a with-block, by other processes and by
  the hypervisor (steal). Both should be ~0 for a clean measurement."""

  def __enter__(self):
    self._stat, self._own = _cpu_stat(), sum(os.times()[:2])
    self.other = self.steal = float("nan")
    return self

  def __exit__(self, *exc):
    (b0, t0, s0), (b1, t1, s1) = self._stat, _cpu_stat()
    if t1 > t0:
      hz = os.sysconf("SC_CLK_TCK")
      own = sum(os.times()[:2]) - self._own
      self.other = max(0.0, ((b1 - b0) / hz - own) / ((t1 - t0) / hz))
      self.steal = (s1 - s0) / (t1 - t0)


def _median_time(fn, reps: int) -> float:
  fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def measure_peak(torch_mod, torch_device, n: int = 2048, reps: int = 10) -> dict[str, float]:
  """fp32 GFLOP/s of an n^3 matmul in JAX and in torch (median of `reps`; HIGHEST precision,
  so no TF32 on GPUs, as torch.mm's default)."""
  flops = 2.0 * n ** 3
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  out = {"jax": flops / _median_time(lambda: dot(a, b).block_until_ready(), reps) / 1e9}
  if torch_mod is not None:
    ta = torch_mod.randn(n, n, device=torch_device)
    tb = torch_mod.randn(n, n, device=torch_device)
    sync = _torch_sync(torch_mod, torch_device)

    def mm():
      torch_mod.mm(ta, tb)
      sync()

    out["torch"] = flops / _median_time(mm, reps) / 1e9
  return out


def _torch_sync(torch_mod, device):
  return torch_mod.cuda.synchronize if device.type == "cuda" else (lambda: None)


# --------------------------------------------------------------------------- data


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


class StockPoolCNN(SimpleCNN):
  """`SimpleCNN` with `nnx.max_pool` instead of its reshape-max pool (same function), to
  measure what the reshape-max saves (--probe)."""

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = dropout(x, self.dropout_rates[0], r1)
    x = x.reshape(x.shape[:-3] + (-1,))
    x = jax.nn.relu(self.dense1(x))
    x = dropout(x, self.dropout_rates[1], r2)
    return self.head(x)


# --------------------------------------------------------------------------- runners
# Each runner is built as `make() -> step(cohort, round) -> None`; `step` runs one full round
# and blocks until its results exist.


def engine_runner(execution: ClientExecution, graphdef, params, mesh, num_clients: int):
  roles = roles_lib.assign_roles(params)
  alg = fedavg(classification_loss(graphdef), roles, client_lr=CLIENT_LR, server_lr=SERVER_LR,
               execution=execution)
  run = runner_lib.RoundRunner(alg, mesh)  # default_compiler_options() for this backend
  # A private copy: with more than one device, RoundRunner.place's device_put(may_alias=False)
  # still aliases device 0's shard with the source, so the donated round would delete `params`.
  params = jax.tree_util.tree_map(jnp.copy, params)
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

  # The same XLA options as the engine's round, so that only the execution model differs.
  @functools.partial(jax.jit, compiler_options=runner_lib.default_compiler_options() or None)
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
  sync = _torch_sync(torch, device)

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


# --------------------------------------------------------------------------- probe


def _interleaved_medians(fns: dict, reps: int, calls: int = 3) -> dict[str, float]:
  """Median seconds per call of each fn, timed in interleaved passes (fairer under noise)."""
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      fn()
      for _ in range(calls):
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
  return {name: float(np.median(ts)) for name, ts in times.items()}


def probe(args, torch, tdev):
  """Per-op and per-client timings behind the findings in BENCHMARKS.md (CPU-oriented)."""
  rng = np.random.default_rng(args.seed)
  b = args.batch
  # conv2 of SimpleCNN: [b,30,30,32] * [3,3,32,64] -> [b,28,28,64].
  x = rng.standard_normal((b, 30, 30, 32), dtype=np.float32)
  w = (0.05 * rng.standard_normal((3, 3, 32, 64))).astype(np.float32)
  dy = rng.standard_normal((b, 28, 28, 64), dtype=np.float32)
  conv_flops = 2.0 * b * 28 * 28 * 64 * 288
  xj, wj, dyj = map(jnp.asarray, (x, w, dy))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ops = {}
  opt_sets = {"jax": None}
  if jax.default_backend() == "cpu":
    opt_sets["jax, YNNPACK convs off (round default)"] = CPU_OPTIONS
  for label, opts in opt_sets.items():
    fwd = jax.jit(conv, compiler_options=opts)
    dgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0],
                    compiler_options=opts)
    wgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0],
                    compiler_options=opts)
    ops[(label, "fwd")] = lambda f=fwd: f(xj, wj).block_until_ready()
    ops[(label, "dgrad")] = lambda f=dgrad: f(xj, wj, dyj).block_until_ready()
    ops[(label, "wgrad")] = lambda f=wgrad: f(xj, wj, dyj).block_until_ready()
  if torch is not None:
    sync = _torch_sync(torch, tdev)
    xt = torch.tensor(x.transpose(0, 3, 1, 2), device=tdev)
    wt = torch.tensor(w.transpose(3, 2, 0, 1), device=tdev)
    dyt = torch.tensor(dy.transpose(0, 3, 1, 2), device=tdev)
    f, g = torch.nn.functional, torch.nn.grad

    def timed(fn):
      def run():
        with torch.no_grad():
          fn()
        sync()
      return run

    ops[("torch", "fwd")] = timed(lambda: f.conv2d(xt, wt))
    ops[("torch", "dgrad")] = timed(lambda: g.conv2d_input(xt.shape, wt, dyt))
    ops[("torch", "wgrad")] = timed(lambda: g.conv2d_weight(xt, wt.shape, dyt))
  with Noise() as noise:
    med = _interleaved_medians(ops, reps=5)
  print(f"conv2 of SimpleCNN, batch {b} ({conv_flops / 1e6:.0f} MFLOP per op), median ms "
        f"(GFLOP/s); other processes {100 * noise.other:.0f}% / steal {100 * noise.steal:.0f}%")
  print("| implementation | forward | input grad | kernel grad |")
  print("|---|---|---|---|")
  for label in dict.fromkeys(k[0] for k in ops):
    cells = [f"{1e3 * med[(label, op)]:.2f} ({conv_flops / med[(label, op)] / 1e9:.0f})"
             for op in ("fwd", "dgrad", "wgrad")]
    print(f"| {label} | " + " | ".join(cells) + " |")

  # One client's local update (5 steps of batch 10), per variant.
  steps = -(-args.examples // b)
  client_flops = round_flops(1, steps, b)
  batches = {"x": jnp.asarray(rng.standard_normal((steps, b) + IMAGE, dtype=np.float32)),
             "y": jnp.asarray(rng.integers(0, NUM_CLASSES, (steps, b)).astype(np.int32))}
  mask, key = jnp.ones((steps, b)), jax.random.key(0)
  cpu = jax.default_backend() == "cpu"
  stock, current = "SimpleCNN(canonical_conv=False), YNNPACK convs on", "SimpleCNN on CPU"
  variants = [  # (label, model class, canonical conv, scan unroll, compiler options)
      (f"{stock}, steps unrolled (old CPU default)", SimpleCNN, False, True, None),
      (f"{stock}, steps in lax.scan", SimpleCNN, False, 1, None),
      ("SimpleCNN(canonical_conv=False), steps unrolled", SimpleCNN, False, True, CPU_OPTIONS),
      (f"{current}, steps in lax.scan (engine default)", SimpleCNN, True, 1, CPU_OPTIONS),
      (f"{current}, steps unrolled", SimpleCNN, True, True, CPU_OPTIONS),
      (f"{current}, YNNPACK convs on, steps in lax.scan", SimpleCNN, True, 1, None),
      (f"{current} with nnx.max_pool, steps in lax.scan", StockPoolCNN, True, 1, CPU_OPTIONS),
  ]
  fns, compile_s, texts = {}, {}, {}
  for label, cls, canonical, unroll, opts in variants:
    if opts is not None and not cpu:
      continue
    model = cls(IMAGE, NUM_CLASSES, rngs=nnx.Rngs(args.seed), canonical_conv=canonical)
    graphdef, params = functional(model)
    loss_fn = classification_loss(graphdef)

    def update(p, bt, m, k, loss_fn=loss_fn, unroll=unroll):
      objective = lambda p, bt, m, k: local.masked_loss(loss_fn, p, bt, m, k)
      return local.train_steps(objective, optax.sgd(CLIENT_LR), p, bt, m, k, unroll=unroll)[0]

    fn = jax.jit(update, compiler_options=opts)
    t = time.perf_counter()
    if args.profile:
      texts[label] = fn.lower(params, batches, mask, key).compile().as_text()
    jax.block_until_ready(fn(params, batches, mask, key))
    compile_s[label] = time.perf_counter() - t
    fns[label] = lambda fn=fn, params=params: jax.block_until_ready(fn(params, batches, mask, key))
    progress(f"  probe: compiled {label!r} in {compile_s[label]:.1f} s")
  if torch is not None:
    model = torch_cnn(torch).to(tdev)
    xt = torch.from_numpy(np.ascontiguousarray(
        np.asarray(batches["x"]).transpose(0, 1, 4, 2, 3))).to(tdev)
    yt = torch.from_numpy(np.array(batches["y"])).long().to(tdev)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    loss = torch.nn.CrossEntropyLoss()
    sync = _torch_sync(torch, tdev)

    def torch_update():
      model.load_state_dict(state0)
      opt = torch.optim.SGD(model.parameters(), lr=CLIENT_LR)
      for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss(model(xt[s]), yt[s]).backward()
        opt.step()
      sync()

    fns["torch (NCHW, nn.Conv2d)"] = torch_update
    compile_s["torch (NCHW, nn.Conv2d)"] = 0.0
  # The lax.scan variant with JAX's own conv VJP is ~25x slower: time it less often.
  slow = {k: v for k, v in fns.items() if k == f"{stock}, steps in lax.scan"}
  with Noise() as noise:
    med = _interleaved_medians({k: v for k, v in fns.items() if k not in slow}, reps=5)
    med.update(_interleaved_medians(slow, reps=1, calls=3))
  print(f"\nOne client's local update ({steps} SGD steps of batch {b}, "
        f"{client_flops / 1e9:.2f} GFLOP), median of interleaved calls; other processes "
        f"{100 * noise.other:.0f}% / steal {100 * noise.steal:.0f}%")
  print("| variant | ms / client | x 50 clients = s/round | GFLOP/s | compile s |")
  print("|---|---|---|---|---|")
  for label in fns:
    s = med[label]
    print(f"| {label} | {1e3 * s:.1f} | {50 * s:.2f} | {client_flops / s / 1e9:.0f} "
          f"| {compile_s[label]:.1f} |")

  if args.profile:
    for label in (f"{stock}, steps unrolled (old CPU default)",
                  f"{current}, steps in lax.scan (engine default)"):
      if label in fns:
        print(f"\nProfile of one client's local update: {label}")
        profile_top_ops(fns[label], texts[label])


def profile_top_ops(fn, compiled_text: str, calls: int = 10, top: int = 12):
  """Per-op time of `fn` from a jax.profiler trace (needs XLA_FLAGS with
  --xla_cpu_enable_xprof_traceme=true on CPU for op-level events); prints the top ops."""
  import collections, glob, gzip, re, tempfile  # pylint: disable=g-import-not-at-top,multiple-imports
  info = {}
  for line in compiled_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name="([^"]*)"', line)
    if m:
      info[m.group(1)] = (m.group(2)[:34], m.group(3).split("/")[-1])
  fn()
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(calls):
      fn()
    wall = (time.perf_counter() - t) / calls
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
    events = json.load(gzip.open(files[0]))["traceEvents"] if files else []
  total, count = collections.Counter(), collections.Counter()
  skip = ("ThunkExecutor", "block_until_ready", "stop_trace", "Pjit", "Execute", "PjRt",
          "ThreadPool")
  for e in events:
    if (e.get("ph") == "X" and not e["name"].startswith("$")
        and not any(k in e["name"] for k in skip)):
      total[e["name"]] += e["dur"] / calls
      count[e["name"]] += 1
  print(f"wall {1e3 * wall:.1f} ms per call under the profiler; traced ops sum to "
        f"{sum(total.values()) / 1e3:.1f} ms over both threads (Eigen convolutions and dots "
        "are not traced: the rest of the wall time)")
  print("| op | ms / call | runs | shape | jax op |")
  print("|---|---|---|---|---|")
  for name, us in total.most_common(top):
    shape, op = info.get(name, ("", ""))
    print(f"| {name} | {us / 1e3:.2f} | {count[name] // calls} | {shape} | {op} |")


# --------------------------------------------------------------------------- main


def execution_name(ex: ClientExecution) -> str:
  for name, (strategy, chunk, unroll) in ENGINE_RUNNERS.items():
    same_unroll = (ex.scan_unroll == unroll
                   and isinstance(ex.scan_unroll, bool) == isinstance(unroll, bool))
    if (ex.strategy == strategy and same_unroll
        and (strategy not in ("chunked", "sequential") or ex.chunk_size == chunk)):
      return name
  return f"fedjax_fm[{ex.strategy},chunk={ex.chunk_size},unroll={ex.scan_unroll}]"


def progress(msg: str):
  print(msg, file=sys.stderr, flush=True)


def build_runner(name, mesh, fed, graphdef, params, torch, tdev):
  if name in ENGINE_RUNNERS:
    strategy, chunk, unroll = ENGINE_RUNNERS[name]
    ex = ClientExecution(strategy=strategy, chunk_size=chunk, scan_unroll=unroll, mesh=mesh)
    return engine_runner(ex, graphdef, params, mesh, fed.num_clients)
  if name == "jax_client_loop":
    return jax_client_loop_runner(graphdef, params)
  return torch_loop_runner(torch, tdev)


def main(args):
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    tdev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  except ImportError:
    torch, tdev = None, None

  backend = jax.default_backend()
  progress(f"backend={backend} devices={jax.device_count()} cpu_cores={os.cpu_count()} "
           f"jax={jax.__version__} torch={getattr(torch, '__version__', None)} "
           f"torch_device={tdev} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if args.probe:
    probe(args, torch, tdev)
    return []

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

  peak_reps = 3 if args.quick else 10
  peak = measure_peak(torch, tdev, reps=peak_reps)
  peak_gflops = max(peak.values())
  progress(f"fp32 matmul peak (2048^3, median of {peak_reps}): "
           + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))

  fed = make_federation(args)
  cohorts = make_cohorts(fed, args, steps, args.warmup + args.rounds)
  graphdef, params = functional(SimpleCNN(IMAGE, NUM_CLASSES, rngs=nnx.Rngs(args.seed)))

  records = []
  for name in runners:
    t_build = time.perf_counter()
    step = build_runner(name, mesh, fed, graphdef, params, torch, tdev)
    times = []
    for r in range(args.warmup):
      t = time.perf_counter()
      step(cohorts[r], r)
      progress(f"  {name:30s} round {r + 1}/{args.warmup + args.rounds} (warm-up): "
               f"{time.perf_counter() - t:7.3f} s {step.info()}")
    warmup_s = time.perf_counter() - t_build
    with Noise() as noise:
      for r in range(args.warmup, args.warmup + args.rounds):
        t = time.perf_counter()
        step(cohorts[r], r)
        times.append(time.perf_counter() - t)
        progress(f"  {name:30s} round {r + 1}/{args.warmup + args.rounds}: "
                 f"{times[-1]:7.3f} s {step.info()}")
    s = float(np.median(times))
    gflops = flops / s / 1e9
    records.append({
        "workload": WORKLOAD, "runner": name, "s_per_round": s,
        "client_steps_per_s": client_steps / s, "gflops": gflops,
        "peak_fraction": gflops / peak_gflops,
        "default": name == default_name, "warmup_s": warmup_s, "round_times_s": times,
        "other_cpu_share": noise.other, "steal_share": noise.steal,
    })

  ref = next((r["s_per_round"] for r in records if r["default"]), None)
  print(f"{WORKLOAD}: {fed.num_clients} clients x {args.examples} images, cohort {args.cohort}, "
        f"{steps} local steps of batch {args.batch}, {flops / 1e9:.1f} GFLOP/round; backend "
        f"{backend} ({jax.device_count()} device(s)); fp32 matmul peak {peak_gflops:.0f} GFLOP/s "
        f"(" + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()) + f", median of "
        f"{peak_reps}); median of "
        f"{args.rounds} rounds after {args.warmup} warm-up")
  print("| runner | s/round | client-steps/s | vs default | GFLOP/s | % of peak | warm-up s "
        "| other/steal CPU % |")
  print("|---|---|---|---|---|---|---|---|")
  for rec in records:
    ratio = f"{ref / rec['s_per_round']:.2f}x" if ref else "n/a"
    print(f"| {rec['runner'] + (' *' if rec['default'] else '')} | {rec['s_per_round']:.2f} "
          f"| {rec['client_steps_per_s']:.0f} | {ratio} | {rec['gflops']:.1f} "
          f"| {100 * rec['peak_fraction']:.0f}% | {rec['warmup_s']:.1f} "
          f"| {100 * rec['other_cpu_share']:.0f}/{100 * rec['steal_share']:.0f} |")
  print(f"* = default_execution() on this backend ({default_name}). vs default = default "
        "s/round / runner s/round (>1 = faster). warm-up s: build + first round(s), compile "
        "included. other/steal: CPU share taken by other processes / the hypervisor while timed.")

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
