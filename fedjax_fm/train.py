"""The run loop: sample a cohort, run the compiled round, evaluate, log, checkpoint. One story.

The algorithm arrives built (`fedjax_fm.experiment`, `fedjax_fm.algorithms.BUILDERS`), so this
module knows no algorithm. Everything random is a pure function of (seed, round), and checkpoints hold the server state, the
clients' personal state and the metric history, so a resumed run ends bit-identical to an
uninterrupted one. In a multi-host run (`fedjax_fm.distributed`) every process runs this loop on
its share of each cohort and takes part in the checkpoints; process 0 alone writes the rest.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from fedjax_fm import cohort as cohort_lib, distributed, report, sharding
from fedjax_fm.builders import check_schedule
from fedjax_fm.protocol import Algorithm
from fedjax_fm.checkpoint import Checkpointer
from fedjax_fm.runner import RoundRunner, padded_rows

PyTree = Any


def _scalars(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def train(alg: Algorithm, params: PyTree,
          train_data: cohort_lib.FederatedData | cohort_lib.GroupedData, *,
          rounds: int, cohort_size: int | tuple[int, ...], batch_size: int,
          local_steps: int | None = None, local_epochs: int | None = None, seed: int = 0, mesh=None,
          evaluate: Callable[[PyTree, PyTree], dict] | None = None, eval_every: int = 10,
          workdir: str | None = None, checkpoint_every: int = 0, keep_checkpoints: int = 3,
          resume: bool = False, fallback_checkpoint: bool = False,
          client_groups: Sequence[str] | None = None, param_shardings: PyTree | None = None,
          progress: bool = True) -> list[dict]:
  """Runs rounds of `alg` up to round `rounds` and returns the per-round metric history.

  Args:
    alg: the algorithm.
    params: initial parameters (all roles).
    train_data: the federation's training data; a `GroupedData` for a grouped algorithm (one
      cohort and one stacked client state per group, see `fedjax_fm.cohort.GroupedData`).
    rounds, cohort_size, batch_size: the usual; `rounds` is the total, resumed rounds included.
      With grouped data, `cohort_size` clients of every group are sampled each round (or
      `cohort_size[g]` of group g).
    local_steps / local_epochs: exactly one of them: a fixed number of local steps (data
      cycled), or full passes over each client's data (steps sized for the largest client,
      smaller ones masked).
    seed: seeds cohort sampling, data order and the round keys.
    mesh: device mesh (all devices on ``clients`` if None).
    evaluate: (server params, client states) -> metrics (`fedjax_fm.evaluate`); run every
      `eval_every` rounds and after the last.
    workdir: where metrics.jsonl, tensorboard/, checkpoints/, curves.png and the summary go.
    checkpoint_every: save every this many rounds (0: only at the end); needs `workdir`.
    keep_checkpoints: how many recent checkpoints to keep.
    resume: continue from the latest complete checkpoint in `workdir`.
    fallback_checkpoint: if that checkpoint is damaged, resume from the one before.
    client_groups: a group name per client, for the per-group rows of the summary.
    param_shardings: placement of the server parameters (e.g. an FSDP-sharded frozen
      backbone, `fedjax_fm.models.param_shardings`); replicated if None.
    progress: show a progress bar.
  """
  # ---- arguments: fail before anything is written (the checks `launch` makes too) ----
  check_schedule(rounds=rounds, cohort_size=cohort_size, batch_size=batch_size,
                 local_steps=local_steps, local_epochs=local_epochs, eval_every=eval_every,
                 checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints)
  grouped = isinstance(train_data, cohort_lib.GroupedData)
  if grouped:
    cohort_sizes = cohort_lib.group_cohort_sizes(train_data, cohort_size)
    groups = train_data.groups
    client_groups = client_groups or train_data.client_groups
  else:
    if cohort_size > train_data.num_clients:
      raise ValueError(f"cohort_size {cohort_size} is larger than the federation's "
                       f"{train_data.num_clients} clients; lower config.cohort_size")
    cohort_sizes, groups = (cohort_size,), (train_data,)
  if resume and not workdir:
    raise ValueError("resuming needs the --workdir of the run to continue")
  mesh = mesh or sharding.make_mesh()
  steps = [local_steps or cohort_lib.steps_for_epochs(g.sizes, batch_size, local_epochs)
           for g in groups]

  def round_cohort(r):
    """Round r's cohort (a tuple of per-group cohorts for grouped data). Each process builds
    only its own rows of it (all of them in a single process): `distributed.shard_cohort`."""
    cohorts = tuple(
        distributed.shard_cohort(
            lambda part, g=g, s=s, i=i: cohort_lib.make_cohort(
                g, part, steps=s, batch_size=batch_size, seed=seed, round_num=r,
                epochs=local_epochs, group=i if grouped else None),
            cohort_lib.sample_clients(seed, r, g.num_clients, k, i if grouped else None), mesh)
        for i, (g, k, s) in enumerate(zip(groups, cohort_sizes, steps)))
    return cohorts if grouped else cohorts[0]

  # ---- state: fresh, or the latest checkpoint ----
  runner = RoundRunner(alg, mesh, param_shardings=param_shardings)
  server, clients = runner.place(
      alg.init(params, jax.random.key(seed)),
      alg.init_clients(params, tuple(padded_rows(g.num_clients, mesh) for g in groups)
                       if grouped else padded_rows(train_data.num_clients, mesh)))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_checkpoints) if workdir else None
  # Multi-host: every process computes and checkpoints; process 0 alone logs, plots and prints.
  main = distributed.is_main()
  start, history = 0, []
  if resume:
    start, state, meta = ckpt.restore({"server": server, "clients": clients},
                                      fallback=fallback_checkpoint)
    server, clients, history = state["server"], state["clients"], list(meta["history"])
  log = report.MetricLog(workdir, history) if workdir and main else None
  down, up = alg.bytes_per_client(params)
  base_key = jax.random.key(seed + 1)
  last_eval = None

  # ---- the loop ----
  bar = tqdm(total=rounds, initial=min(start, rounds), desc="round", unit="round",
             disable=not (progress and main), dynamic_ncols=True)
  t0 = time.perf_counter() - (history[-1]["wall_seconds"] if history else 0.0)

  def finish(r, metrics, eval_metrics):
    """Reads round r's metrics back (blocking), logs them and checkpoints."""
    nonlocal last_eval
    record = {"round": r + 1, **{f"train/{k}": v for k, v in _scalars(metrics).items()},
              "bytes_down": down * sum(cohort_sizes), "bytes_up": up * sum(cohort_sizes)}
    if eval_metrics is not None:
      last_eval = distributed.fetch(eval_metrics)  # per-client arrays may span hosts
      record.update(_scalars(last_eval))
    record["wall_seconds"] = time.perf_counter() - t0
    history.append(record)
    if log:
      log.write(record)
    bar.update(1)
    bar.set_postfix({k.split("/")[-1] if k.startswith("train") else k: f"{v:.3f}"
                     for k, v in record.items()
                     if k in ("train/loss", "train/accuracy", "personalized/accuracy")})

  # Round r is dispatched before round r-1's metrics are read back: the host builds the next
  # cohort while the device computes (JAX dispatch is asynchronous).
  pending = None
  try:
    for r in range(start, rounds):
      server, clients, metrics = runner(server, clients, round_cohort(r),
                                        jax.random.fold_in(base_key, r))
      eval_metrics = None
      if evaluate is not None and ((r + 1) % eval_every == 0 or r + 1 == rounds):
        eval_metrics = evaluate(server.params, clients)
      if pending:
        finish(*pending)
      pending = (r, metrics, eval_metrics)
      if ckpt and ((checkpoint_every and (r + 1) % checkpoint_every == 0) or r + 1 == rounds):
        finish(*pending)  # the checkpoint's history must include this round
        pending = None
        ckpt.save(r + 1, {"server": server, "clients": clients}, {"history": history})
    if pending:
      finish(*pending)
  finally:
    bar.close()
    if log:
      log.close()
    if ckpt:
      ckpt.wait()
      ckpt.close()
  if runner.compilations > 1:
    warnings.warn(f"the round compiled {runner.compilations} times; it should compile once "
                  "(a shape or dtype changed between rounds)")

  # ---- what the run leaves behind ----
  if history and main:
    summary = report.summarize(history, last_eval, client_groups)
    text = report.format_summary(summary)
    if progress:
      print(text)
    if workdir:
      report.plot_curves(history, os.path.join(workdir, "curves.png"))
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
      with open(os.path.join(workdir, "summary.txt"), "w") as f:
        f.write(text.lstrip() + "\n")
  return history
