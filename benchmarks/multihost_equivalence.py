"""A multi-host run gives the single-process run's results: 2 processes x 2 CPU devices (through
jax.distributed on localhost, gloo collectives) against 1 process x 4 devices, over seeds.

For each seed it runs `launch.py` both ways on the same config (the same global mesh of 4
devices on the ``clients`` axis), then prints the largest difference between the two runs' final
checkpointed parameters (server and every client's personal state) and the metrics table of
`fedjax_fm.results` (mean ± std over seeds).

  python benchmarks/multihost_equivalence.py --seeds 0,1,2 --rounds 40 \\
      --workdir /tmp/runs --plot results/multihost.png

The runs land in `<workdir>/<name>_single_s<seed>` and `<workdir>/<name>_multi_s<seed>`; each is
also one `launch.py` command (printed as it starts). With a frozen backbone split over an `fsdp`
axis that stays within each process and `clients` across the processes:

  python benchmarks/multihost_equivalence.py --seeds 0 --rounds 4 --name fsdp --algorithm fedavg \
      --config configs/default.py:tiny --override="--config.mesh=(('clients', 2), ('fsdp', 2))"
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(flags, devices, log_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *flags]
  print(f"XLA_FLAGS={env['XLA_FLAGS']} python launch.py {' '.join(flags)}", flush=True)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"),
                          stderr=subprocess.STDOUT)


def _wait(procs, timeout_s):
  try:
    for p in procs:
      p.wait(timeout=timeout_s)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  bad = [p.args for p in procs if p.returncode]
  if bad:
    raise SystemExit(f"error: a run failed: {bad[0]}; see its .log next to the workdir")


def final_state(workdir: str) -> dict:
  """The last checkpoint's state as numpy arrays, whatever device layout wrote it."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  path = os.path.join(workdir, "checkpoints", str(steps[-1]), "state")
  reader = ocp.PyTreeCheckpointer()
  meta = reader.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return reader.restore(path, restore_args=args)


def max_difference(a: dict, b: dict) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb) > 0
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(la, lb))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rounds", type=int, default=40)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "digits.py"))
  p.add_argument("--algorithm", default="fedper", help="fedper: personal heads span the hosts")
  p.add_argument("--workdir", default="/tmp/runs")
  p.add_argument("--plot", default=None)
  p.add_argument("--timeout_s", type=int, default=900)
  p.add_argument("--override", action="append", default=[],
                 help="extra launch.py flags for both set-ups, e.g. "
                 "--override=\"--config.mesh=(('clients', 2), ('fsdp', 2))\"")
  p.add_argument("--name", default="mh", help="prefix of the run folders")
  args = p.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.workdir, exist_ok=True)
  rows = []
  for seed in seeds:
    # The algorithm is picked by the config argument, with all its hyperparameters.
    config = f"{args.config}{',' if ':' in args.config else ':'}{args.algorithm}"
    common = ["--config", config, f"--config.rounds={args.rounds}",
              f"--config.seed={seed}", "--overwrite", *args.override]
    single = os.path.join(args.workdir, f"{args.name}_single_s{seed}")
    multi = os.path.join(args.workdir, f"{args.name}_multi_s{seed}")
    procs = [_launch(common + [f"--workdir={single}"], 4, single + ".log")]
    address = f"127.0.0.1:{_free_port()}"
    for pid in range(2):
      procs.append(_launch(common + [f"--workdir={multi}", f"--coordinator={address}",
                                     "--num_processes=2", f"--process_id={pid}"], 2,
                           f"{multi}-{pid}.log"))
    _wait(procs, args.timeout_s)
    diff = max_difference(final_state(single), final_state(multi))
    rows.append((seed, diff))
    print(f"seed {seed}: max |params(2 processes) - params(1 process)| = {diff:.2e}", flush=True)

  from fedjax_fm import results  # pylint: disable=import-outside-toplevel
  methods = [results.parse_method(f"1 process x 4 devices={args.workdir}/{args.name}_single_s*"),
             results.parse_method(f"2 processes x 2 devices={args.workdir}/{args.name}_multi_s*")]
  metrics = ("personalized/accuracy", "global/accuracy", "train/loss")
  print()
  print(results.table(methods, metrics))
  print()
  print("| seed | max abs difference of final parameters (server + all clients) |")
  print("|---|---|")
  for seed, diff in rows:
    print(f"| {seed} | {diff:.1e} |")
  if args.plot:
    results.plot(methods, ("personalized/accuracy", "train/loss"), args.plot)


if __name__ == "__main__":
  main()
