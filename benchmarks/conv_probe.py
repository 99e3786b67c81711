r"""Where W1's time goes: conv2's convolutions and one client's local update, per CPU measure.

Times, on one client (5 local SGD steps of batch 10 of workload W1, `workload_w1.py`):

- conv2 of `SimpleCNN` (the layer with 86% of W1's FLOPs): forward, input-gradient and
  kernel-gradient convolutions, in JAX with and without YNNPACK convolutions and in torch;
- one client's local update with and without each CPU measure the engine takes
  (canonical-layout conv VJP, reshape max-pool, YNNPACK convolutions off, steps in a loop),
  and the same update in torch.

`--profile` adds a per-op profile (jax.profiler trace) of the old CPU default and the current
engine default. Results and their reading: BENCHMARKS.md, "Where the time goes".

Usage::

  python benchmarks/conv_probe.py
  python benchmarks/conv_probe.py --profile --xla_flags=--xla_cpu_enable_xprof_traceme=true
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--profile", action="store_true",
                 help="per-op profile of one client's update (stock and current); on CPU add "
                 "--xla_flags=--xla_cpu_enable_xprof_traceme=true")
  p.add_argument("--examples", type=int, default=50, help="examples per client")
  p.add_argument("--batch", type=int, default=10, help="local batch size")
  p.add_argument("--xla_flags", type=str, default="",
                 help="extra XLA_FLAGS, appended before jax is imported")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads (default: all cores)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.xla_flags:
  # XLA reads XLA_FLAGS once, when jax initialises its backend: set it before importing jax.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_fm import client_update
from fedjax_fm import runner as runner_lib
from fedjax_fm.models import SimpleCNN, classification_loss, functional
from fedjax_fm.models.cnn import dropout

from measure import Noise, interleaved_medians, progress, torch_sync
from workload_w1 import CLIENT_LR, IMAGE, NUM_CLASSES, round_flops, torch_cnn

# The round's XLA:CPU options (YNNPACK for dots and reductions, not convolutions).
CPU_OPTIONS = runner_lib.CPU_COMPILER_OPTIONS


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
    sync = torch_sync(torch, tdev)
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
    med = interleaved_medians(ops, reps=5)
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
      objective = lambda p, bt, m, k: client_update.masked_loss(loss_fn, p, bt, m, k)
      return client_update.train_steps(objective, optax.sgd(CLIENT_LR), p, bt, m, k, unroll=unroll)[0]

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
    sync = torch_sync(torch, tdev)

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
    med = interleaved_medians({k: v for k, v in fns.items() if k not in slow}, reps=5)
    med.update(interleaved_medians(slow, reps=1, calls=3))
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


def main(args):
  try:
    import torch
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    tdev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  except ImportError:
    torch, tdev = None, None
  progress(f"backend={jax.default_backend()} cpu_cores={os.cpu_count()} jax={jax.__version__} "
           f"torch={getattr(torch, '__version__', None)} "
           f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  probe(args, torch, tdev)


if __name__ == "__main__":
  main(ARGS)
