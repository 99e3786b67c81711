"""Token data for decoder LMs: a synthetic federation whose clients speak different "dialects".

Each client's sequences follow its own rule ``x[t + 1] = (x[t] + shift) mod vocab`` from a
random first token, with ``shift`` one of a few values (clients with the same shift share a
dialect), so next-token loss is learnable, differs across clients (a reason for personal LoRA)
and has a known floor of zero. Sequences have random lengths and are right-padded, with
``attention_mask`` 0 on the padding. For tests, CI and the tiny decoder config; a real corpus
enters the same way, as a `FederatedData` of ``input_ids`` and ``attention_mask``.
"""

from __future__ import annotations

import numpy as np

from fedjax_fm.builders import Federation
from fedjax_fm.cohort import FederatedData


def synthetic_dialects(num_clients: int, examples_per_client: int, seq_len: int,
                       vocab_size: int, *, num_dialects: int = 3, min_len: int | None = None,
                       seed: int = 0) -> FederatedData:
  """A `FederatedData` with ``input_ids`` [n, seq_len] int32 and ``attention_mask`` [n, seq_len].

  Args:
    num_clients, examples_per_client: the federation's size.
    seq_len: padded sequence length.
    vocab_size: token ids are in [0, vocab_size).
    num_dialects: client c uses shift ``1 + c % num_dialects``.
    min_len: the shortest real length (default: seq_len // 2); lengths are uniform up to seq_len.
    seed: numpy seed.
  """
  if not 2 <= (min_len or seq_len // 2) <= seq_len:
    raise ValueError(f"min_len must be in [2, seq_len={seq_len}], got {min_len}")
  rng = np.random.RandomState(seed)
  clients = []
  for c in range(num_clients):
    shift = 1 + c % num_dialects
    first = rng.randint(0, vocab_size, (examples_per_client, 1))
    ids = (first + shift * np.arange(seq_len)[None]) % vocab_size
    lengths = rng.randint(min_len or seq_len // 2, seq_len + 1, examples_per_client)
    mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    clients.append({"input_ids": (ids * mask).astype(np.int32), "attention_mask": mask})
  return FederatedData.from_clients(clients)


def synthetic_lm_data(config) -> Federation:
  """``data.name`` ``"synthetic_lm"``: `synthetic_dialects` train and test federations (the
  test clients speak the train clients' dialects) from ``config.data`` (num_clients,
  examples_per_client, test_examples_per_client, seq_len, vocab_size, num_dialects) and
  ``config.seed``."""
  d = config.data
  make = lambda n, seed: synthetic_dialects(d.num_clients, n, d.seq_len, d.vocab_size,
                                            num_dialects=d.num_dialects, seed=seed)
  return Federation(make(d.examples_per_client, config.seed),
                    make(d.test_examples_per_client, config.seed + 1))
