"""The run loop: sample a cohort, run the compiled round, evaluate, log, checkpoint. One story.

The algorithm arrives built (`fedjax_fm.experiment`, `fedjax_fm.algorithms.BUILDERS`), so this
module knows no algorithm. Everything random is a pure function of (seed, round), and
checkpoints hold the server state, the clients' personal state and the metric history (exactly
as it was after the checkpoint's round), so a resumed run ends bit-identical to an
uninterrupted run. In a multi-host run (`fedjax_fm.distributed`) every process runs this loop on
its share of each cohort and takes part in the checkpoints; process 0 alone writes the rest.

Divergence: a round whose training metrics are not finite, or in which no client was healthy
(every update non-finite, or no example trained on), is *bad*. Its averaged training metrics are
logged as NaN (never as a misleading 0), it is flagged on the progress bar and in the summary,
and it is not checkpointed. After `max_bad_rounds` bad rounds in a row the run stops with
`TrainingDiverged`, its checkpoints (all from good rounds) kept.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from fedjax_fm import cohort as cohort_lib, distributed, report, rundir, sharding
from fedjax_fm.builders import check_schedule
from fedjax_fm.protocol import Algorithm
from fedjax_fm.checkpoint import Checkpointer
from fedjax_fm.runner import RoundRunner, padded_rows

PyTree = Any


class TrainingDiverged(RuntimeError):
  """`max_bad_rounds` rounds in a row had non-finite metrics or no healthy client. One line."""


def _scalars(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def _kept_on_bad_rounds(key: str) -> bool:
  """Round metrics that stay as they are on a bad round: counts (clients, examples) rather than
  averages, and run-level reports such as privacy/epsilon (spent whatever the round gave)."""
  name = key.split("/")[-1]
  return name == "examples" or name.startswith("num_") or key.startswith("privacy/")


def round_problem(train_metrics: dict[str, float], cohort_clients: int) -> str | None:
  """Why a round's training went bad, or None if it did not.

  Args:
    train_metrics: the round's scalar training metrics (``loss``, ``examples``,
      ``num_nonfinite_clients``, ...; each algorithm reports what it has).
    cohort_clients: the real clients sampled this round (all groups together).
  """
  if train_metrics.get("num_nonfinite_clients", 0) >= cohort_clients:
    return "no healthy client (every update non-finite)"
  if "examples" in train_metrics and train_metrics["examples"] == 0:
    return "no healthy client trained on any example"
  bad = sorted(k for k, v in train_metrics.items()
               if not math.isfinite(v) and not k.startswith("privacy/"))
  if bad:
    return f"non-finite {', '.join(bad)}"
  return None


def train(alg: Algorithm, params: PyTree,
          train_data: cohort_lib.FederatedData | cohort_lib.GroupedData, *,
          rounds: int, cohort_size: int | tuple[int, ...], batch_size: int,
          local_steps: int | None = None, local_epochs: int | None = None, seed: int = 0, mesh=None,
          evaluate: Callable[[PyTree, PyTree], dict] | None = None, eval_every: int = 10,
          workdir: str | None = None, checkpoint_every: int = 0, keep_checkpoints: int = 3,
          resume: bool = False, fallback_checkpoint: bool = False,
          client_groups: Sequence[str] | None = None, param_shardings: PyTree | None = None,
          max_bad_rounds: int = 3, run_config: dict | None = None,
          allow_config_change: bool = False, excluded_clients: int = 0,
          samples: Callable[[PyTree, PyTree], list] | None = None,
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
    max_bad_rounds: stop after this many bad rounds in a row (see the module docstring).
    run_config: the resolved config as a JSON dict, saved (and verified) with every checkpoint;
      a resume with a different one is refused unless `allow_config_change` (the keys of
      `fedjax_fm.rundir.RESUMABLE_CHANGES` may always change).
    excluded_clients: clients the data builder left out for having no examples (reported in
      the summary).
    samples: (server params, client states) -> generation samples (`builders.make_sampler`),
      taken at every evaluation and written to ``samples.jsonl`` and TensorBoard text; the last
      ones also go into the summary.
    progress: show a progress bar.

  Raises:
    TrainingDiverged: `max_bad_rounds` bad rounds in a row (after the summary is written).
    fedjax_fm.checkpoint.CheckpointError: `resume` with no intact checkpoint to resume from.
  """
  # ---- arguments: fail before anything is written (the checks `launch` makes too) ----
  check_schedule(rounds=rounds, cohort_size=cohort_size, batch_size=batch_size,
                 local_steps=local_steps, local_epochs=local_epochs, eval_every=eval_every,
                 checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                 max_bad_rounds=max_bad_rounds)
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
  start, history, last_eval, last_samples = 0, [], None, None
  if resume:
    try:
      start, state, meta = ckpt.restore({"server": server, "clients": clients},
                                        fallback=fallback_checkpoint)
      saved_config = meta.get("config")
      if run_config is not None and saved_config is not None and not allow_config_change:
        diff = rundir.config_differences(saved_config, run_config)
        if diff:
          raise ValueError(f"--resume: the config differs from the one saved with the "
                           f"checkpoint of round {start} in {diff}; use the same config, or "
                           "pass --allow_config_change")
    except BaseException:
      ckpt.close()
      raise
    server, clients = state["server"], state["clients"]
    # Exactly the rounds the checkpoint's state has seen: never a round twice in the log.
    history = [h for h in meta["history"] if h["round"] <= start]
    last_eval = meta.get("last_eval")
  log = report.MetricLog(workdir, history) if workdir and main else None
  down, up = alg.bytes_per_client(params)
  base_key = jax.random.key(seed + 1)
  bad_total = sum(report.is_bad_record(h) for h in history)
  bad_streak = 0
  for h in reversed(history):
    if not report.is_bad_record(h):
      break
    bad_streak += 1
  stop = None     # the TrainingDiverged message, once max_bad_rounds bad rounds in a row

  # ---- the loop ----
  bar = tqdm(total=rounds, initial=min(start, rounds), desc="round", unit="round",
             disable=not (progress and main), dynamic_ncols=True)
  t0 = time.perf_counter() - (history[-1]["wall_seconds"] if history else 0.0)

  def finish(r, metrics, eval_metrics, round_samples):
    """Reads round r's metrics back (blocking), judges the round, logs it."""
    nonlocal last_eval, last_samples, bad_streak, bad_total, stop
    train_metrics = _scalars(metrics)
    problem = round_problem(train_metrics, sum(cohort_sizes))
    if problem:  # averages over no healthy client are not 0: NaN
      train_metrics = {k: v if _kept_on_bad_rounds(k) else float("nan")
                       for k, v in train_metrics.items()}
    # Round metrics under train/, except a run-level report such as privacy/epsilon.
    record = {"round": r + 1, **{k if k.startswith("privacy/") else f"train/{k}": v
                                 for k, v in train_metrics.items()},
              "bytes_down": down * sum(cohort_sizes), "bytes_up": up * sum(cohort_sizes)}
    if eval_metrics is not None:
      last_eval = report.jsonable(distributed.fetch(eval_metrics))  # may span hosts
      record.update(_scalars(last_eval))
    record["wall_seconds"] = time.perf_counter() - t0
    history.append(record)
    if log:
      log.write(record)
    if round_samples is not None:
      last_samples = round_samples
      if log:
        log.write_samples(r + 1, round_samples)
    bar.update(1)
    postfix = {k.split("/")[-1] if k.startswith("train") else k: f"{v:.3f}"
               for k, v in record.items()
               if k in ("train/loss", "train/accuracy", "personalized/accuracy",
                        "privacy/epsilon")}
    bad_streak = bad_streak + 1 if problem else 0
    bad_total += bool(problem)
    if bad_total:
      postfix["bad_rounds"] = bad_total
    bar.set_postfix(postfix)
    if problem and progress and main and bad_streak == 1:
      bar.write(f"warning: round {r + 1}: {problem}; its training metrics are NaN "
                f"(the run stops after {max_bad_rounds} such rounds in a row)")
    if bad_streak >= max_bad_rounds:
      if ckpt:
        ckpt.wait()
      good = [s for s in (ckpt.steps() if ckpt else []) if s <= r + 1 - bad_streak]
      kept = (f"the last good checkpoint (round {good[-1]}) is kept" if good
              else "no checkpoint was written")
      stop = (f"training diverged: rounds {r + 2 - bad_streak}-{r + 1} had {problem} "
              f"({bad_streak} in a row, config.max_bad_rounds={max_bad_rounds}); {kept}; "
              "lower the learning rates or check the data")

  def meta():
    return {"history": history, "last_eval": last_eval, "config": run_config}

  # Round r is dispatched before round r-1's metrics are read back: the host builds the next
  # cohort while the device computes (JAX dispatch is asynchronous).
  pending = None
  try:
    for r in range(start, rounds):
      server, clients, metrics = runner(server, clients, round_cohort(r),
                                        jax.random.fold_in(base_key, r))
      eval_metrics = round_samples = None
      if evaluate is not None and ((r + 1) % eval_every == 0 or r + 1 == rounds):
        eval_metrics = evaluate(server.params, clients)
        if samples is not None and main:
          round_samples = samples(server.params, clients)
      if pending:
        finish(*pending)
        if stop:
          pending = None  # round r computed but not logged: the run ends at the streak's end
          break
      pending = (r, metrics, eval_metrics, round_samples)
      if ckpt and ((checkpoint_every and (r + 1) % checkpoint_every == 0) or r + 1 == rounds):
        finish(*pending)  # the checkpoint's history must include this round
        pending = None
        if stop:
          break
        if not report.is_bad_record(history[-1]):  # the kept checkpoints are all good rounds
          # `save` copies the history and hashes the state before returning.
          ckpt.save(r + 1, {"server": server, "clients": clients}, meta())
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
    summary = report.summarize(history, last_eval, client_groups,
                               excluded_clients=excluded_clients, stopped=stop,
                               samples=last_samples)
    text = report.format_summary(summary)
    if progress:
      print(text)
    if workdir:
      report.plot_curves(history, os.path.join(workdir, "curves.png"))
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
      with open(os.path.join(workdir, "summary.txt"), "w") as f:
        f.write(text.lstrip() + "\n")
  if stop:
    raise TrainingDiverged(stop)
  return history
