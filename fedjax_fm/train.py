"""The run loop: sample a cohort, run the compiled round, evaluate, log. One readable story.

The algorithm arrives built (`fedjax_fm.algorithms.build`), so this module knows no algorithm.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from fedjax_fm import cohort as cohort_lib, sharding
from fedjax_fm.algorithm import Algorithm
from fedjax_fm.runner import RoundRunner, padded_rows

PyTree = Any


def _scalars(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def plot_curves(history: list[dict], path: str):
  """Writes train loss and evaluation metrics against the round as a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = [k for k in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy")
          if any(k in h for h in history)]
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
  for ax, key in zip(axes[0], keys):
    pts = [(h["round"], h[key]) for h in history if key in h]
    ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
    ax.set_title(key)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def train(alg: Algorithm, params: PyTree, train_data: cohort_lib.FederatedData, *,
          rounds: int, cohort_size: int, batch_size: int, local_steps: int | None = None,
          local_epochs: int | None = None, seed: int = 0, mesh=None,
          evaluate: Callable[[PyTree, PyTree], dict] | None = None, eval_every: int = 10,
          workdir: str | None = None, progress: bool = True) -> list[dict]:
  """Runs `rounds` rounds of `alg` and returns the per-round metric history.

  Args:
    alg: the algorithm.
    params: initial parameters (all roles).
    train_data: the federation's training data.
    rounds, cohort_size, batch_size: the usual.
    local_steps / local_epochs: exactly one of them: a fixed number of local steps (data
      cycled), or full passes over each client's data (steps sized for the largest client,
      smaller ones masked).
    seed: seeds cohort sampling, data order and the round keys.
    mesh: device mesh (all devices on ``clients`` if None).
    evaluate: (server params, client states) -> metrics; run every `eval_every` rounds and
      after the last.
    workdir: if set, `metrics.jsonl` and `curves.png` are written there.
    progress: show a progress bar.
  """
  if (local_steps is None) == (local_epochs is None):
    raise ValueError("set exactly one of local_steps and local_epochs")
  mesh = mesh or sharding.make_mesh()
  steps = local_steps or cohort_lib.steps_for_epochs(train_data.sizes, batch_size, local_epochs)
  runner = RoundRunner(alg, mesh)
  server, clients = runner.place(
      alg.init(params, jax.random.key(seed)),
      alg.init_clients(params, padded_rows(train_data.num_clients, mesh)))
  down, up = alg.bytes_per_client(params)
  base_key = jax.random.key(seed + 1)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, "metrics.jsonl"), "a") if workdir else None
  history = []
  bar = tqdm(range(rounds), desc="rounds", disable=not progress, dynamic_ncols=True)
  start = time.perf_counter()

  def finish(r, metrics, eval_metrics):
    """Reads round r's metrics back (blocking) and logs them."""
    record = {"round": r + 1, **{f"train/{k}": v for k, v in _scalars(metrics).items()},
              "bytes_down": down * cohort_size, "bytes_up": up * cohort_size}
    if eval_metrics is not None:
      record.update({f"eval/{k}": v for k, v in _scalars(eval_metrics).items()})
    record["seconds"] = time.perf_counter() - start
    history.append(record)
    if log:
      log.write(json.dumps(record) + "\n")
      log.flush()
    bar.set_postfix({k.split("/")[-1] if k.startswith("train") else k: f"{v:.3f}"
                     for k, v in record.items() if k in ("train/loss", "train/accuracy",
                                                          "eval/accuracy")})

  # Round r is dispatched before round r-1's metrics are read back: the host builds the next
  # cohort while the device computes (JAX dispatch is asynchronous).
  pending = None
  try:
    for r in bar:
      ids = cohort_lib.sample_clients(seed, r, train_data.num_clients, cohort_size)
      cohort = cohort_lib.make_cohort(train_data, ids, steps=steps, batch_size=batch_size,
                                      seed=seed, round_num=r, epochs=local_epochs)
      server, clients, metrics = runner(server, clients, cohort, jax.random.fold_in(base_key, r))
      eval_metrics = None
      if evaluate is not None and ((r + 1) % eval_every == 0 or r + 1 == rounds):
        eval_metrics = evaluate(server.params, clients)
      if pending:
        finish(*pending)
      pending = (r, metrics, eval_metrics)
    if pending:
      finish(*pending)
  finally:
    bar.close()
    if log:
      log.close()
  if runner.compilations > 1:
    warnings.warn(f"the round compiled {runner.compilations} times; it should compile once "
                  "(a shape or dtype changed between rounds)")
  if workdir and history:
    plot_curves(history, os.path.join(workdir, "curves.png"))
  return history
