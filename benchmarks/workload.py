"""The interface between the round-throughput driver and a workload module."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class Workload:
  """What the driver (`round_throughput.py`) needs to time a workload's runners."""
  name: str
  summary: str                 # the table's header line, before the machine's numbers
  round_flops: float           # analytic FLOPs of one round
  client_steps: int            # local SGD steps of one round, all clients together
  num_clients: int             # clients in the federation (rows of the client state)
  cohorts: list                # pre-built cohorts, one per round (warm-up rounds first)
  loss_fn: Callable
  roles: Any
  params: Any
  client_lr: float
  server_lr: float
  torch_runner: Callable[[], Callable] | None  # () -> step, None without torch
  deterministic: bool          # runners must agree after the first round (no dropout)
  pfl_runner: Callable[[], Callable] | None = None  # () -> step of pfl-research's simulator
  tokens: int | None = None    # tokens one round trains on (language models), for tokens/s
