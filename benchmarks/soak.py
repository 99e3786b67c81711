"""Soak: a long run killed at many random moments and resumed each time ends bit-identical to the
same run left alone.

Two workdirs, one config (tiny digits by default, 200 rounds): the reference is launched once
and runs to the end; the soaked run is launched, SIGKILLed, and relaunched with --resume (or
--overwrite while it has no complete checkpoint yet) until it has been killed `--kills` times,
then resumed to the end. Kill moments come from a seeded generator: a quarter of them land while
a launch builds and compiles (a random delay after it has prepared its workdir), the rest a
random moment after a random round has been logged (inside rounds, evaluations and checkpoint saves,
which run every `--checkpoint_every` rounds). At the end:

- metrics.jsonl must hold rounds 1..R exactly once each, every value equal to the reference's
  (wall-clock time aside);
- the final checkpoint's arrays (server state, every client's personal state) must be equal bit
  for bit, and so must summary.json's numbers.

  python benchmarks/soak.py                                        # 200 rounds, 20 kills
  python benchmarks/soak.py --rounds 50 --kills 5 --json /tmp/soak.json

Not part of the test suite (minutes of relaunches); `tests/test_train.py` kills a short run at
a few seeded points. Prints one JSON line with the outcome and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("wall_seconds",)


def _metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    # A kill can cut the last line short; a resume rewrites the file from the checkpoint.
    out = []
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        break
    return out


def _complete_checkpoints(workdir: str) -> list[int]:
  ckpts = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []


def _launch(args: list[str], kill_when=None, timeout: float = 1800.0) -> tuple[int, str]:
  """Runs launch.py; SIGKILLs it as soon as `kill_when(started)` holds. (status, stderr tail)."""
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=err)
    started = time.time()
    while proc.poll() is None:
      if time.time() - started > timeout:
        proc.kill()
        raise RuntimeError(f"launch {args} still running after {timeout} s")
      if kill_when is not None and kill_when(started):
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.005)
    proc.wait()
    err.seek(0)
    return proc.returncode, err.read()[-3000:]


def _final_arrays(workdir: str) -> list[np.ndarray]:
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  out = mgr.restore(mgr.latest_step(),
                    args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(out["state"])]


def kill_plan(seed: int, kills: int, rounds: int) -> list[tuple[str, float]]:
  """The seeded kill moments, in order: ("startup", seconds after the launch has prepared its
  workdir, while it builds and compiles) or ("round", r + f: f seconds after this launch has
  logged round r)."""
  rng = random.Random(seed)
  startup = kills // 4
  plan = [("round", r + rng.uniform(0.0, 0.9))
          for r in sorted(rng.sample(range(1, rounds), kills - startup))]
  for _ in range(startup):
    plan.insert(rng.randrange(len(plan) + 1), ("startup", rng.uniform(0.0, 2.0)))
  return plan


def soak(config: str, rounds: int, kills: int, seed: int, checkpoint_every: int,
         eval_every: int, root: str) -> dict:
  common = ["--config", config, f"--config.rounds={rounds}",
            f"--config.checkpoint_every={checkpoint_every}", f"--config.eval_every={eval_every}"]
  reference, soaked = os.path.join(root, "reference"), os.path.join(root, "soaked")
  t0 = time.time()
  status, err = _launch(common + ["--workdir", reference])
  if status != 0:
    raise RuntimeError(f"the reference run failed: {err}")
  reference_s = time.time() - t0

  t0 = time.time()
  landed = []   # (kind, rounds logged when killed, complete checkpoints then)
  plan = kill_plan(seed, kills, rounds)
  for kind, value in plan:
    resume = bool(_complete_checkpoints(soaked))
    args = common + ["--workdir", soaked] + (["--resume"] if resume else
                                             ["--overwrite"] if os.path.exists(soaked) else [])
    if kind == "startup":
      config_file = os.path.join(soaked, "config.json")
      def when(started, delay=value, path=config_file):
        # `value` seconds after this launch prepared the workdir: building, compiling, round 1.
        return (os.path.exists(path) and os.path.getmtime(path) > started
                and time.time() - os.path.getmtime(path) > delay)
    else:
      target, frac, reached = int(value), value - int(value), []
      log = os.path.join(soaked, "metrics.jsonl")
      def when(started, target=target, frac=frac, reached=reached, log=log):
        # Lines this launch wrote (a resume first rewrites the file to its checkpoint's rounds).
        if (not reached and os.path.exists(log) and os.path.getmtime(log) > started
            and len(_metrics(soaked)) >= target):
          reached.append(time.time())
        return bool(reached) and time.time() - reached[0] > frac
    status, err = _launch(args, when)
    if status not in (0, -signal.SIGKILL):
      raise RuntimeError(f"launch {args} failed ({status}): {err}")
    landed.append((kind, status, len(_metrics(soaked)), _complete_checkpoints(soaked)[-1:]))
    if status == 0:
      break   # finished before this kill (a slow kill point past the end)
  status, err = _launch(common + ["--workdir", soaked, "--resume"])
  if status != 0:
    raise RuntimeError(f"the final resume failed ({status}): {err}")
  soaked_s = time.time() - t0

  strip = lambda hs: [{k: v for k, v in h.items() if k not in VOLATILE} for h in hs]
  a, b = _metrics(reference), _metrics(soaked)
  rounds_logged = [h["round"] for h in b]
  same_metrics = strip(a) == strip(b)
  arrays_a, arrays_b = _final_arrays(reference), _final_arrays(soaked)
  same_arrays = len(arrays_a) == len(arrays_b) > 0 and all(
      x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
      for x, y in zip(arrays_a, arrays_b))
  summaries = [json.load(open(os.path.join(w, "summary.json"))) for w in (reference, soaked)]
  same_summary = all(s["final"] == summaries[0]["final"] and
                     s["per_client"] == summaries[0]["per_client"] for s in summaries)
  return {
      "config": config, "rounds": rounds, "kills_planned": len(plan),
      "kills_landed": sum(status == -signal.SIGKILL for _, status, _, _ in landed),
      "seed": seed,
      "kill_points": [{"kind": k, "killed": status == -signal.SIGKILL, "rounds_logged": n,
                       "last_checkpoint": c[0] if c else None} for k, status, n, c in landed],
      "rounds_once_each": rounds_logged == list(range(1, rounds + 1)),
      "metrics_identical": same_metrics, "final_arrays_identical": same_arrays,
      "arrays": len(arrays_a), "summary_identical": same_summary,
      "reference_s": round(reference_s, 1), "soaked_s": round(soaked_s, 1),
      "identical": bool(same_metrics and same_arrays and same_summary and
                        rounds_logged == list(range(1, rounds + 1))),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "digits.py") + ":tiny")
  p.add_argument("--rounds", type=int, default=200)
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--checkpoint_every", type=int, default=5)
  p.add_argument("--eval_every", type=int, default=10)
  p.add_argument("--workdir", default=None, help="where the two runs go (default: a temp dir)")
  p.add_argument("--json", default=None, help="also write the result here")
  a = p.parse_args()
  root = a.workdir or tempfile.mkdtemp(prefix="fedjax_fm-soak-")
  result = soak(a.config, a.rounds, a.kills, a.seed, a.checkpoint_every, a.eval_every, root)
  result["workdir"] = root
  line = json.dumps(result)
  print(line)
  if a.json:
    with open(a.json, "w") as f:
      f.write(line + "\n")
  sys.exit(0 if result["identical"] else 1)


if __name__ == "__main__":
  main()
