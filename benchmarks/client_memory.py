"""Memory scale: how many clients' personal adapters fit per GiB of device memory (MiniLM).

The personal state of all N clients of a federation is one stacked pytree `[N, ...]` on device,
sharded over the mesh's ``clients`` axis (`fedjax_fm.protocol.stacked_personal`, what
`init_clients` returns); a round gathers its K clients' rows and scatters them back, so the rest of
the round's memory does not grow with N. This script measures, for the real all-MiniLM-L6-v2 with
the adapters of configs/default.py (one bottleneck-32 adapter after every FFN block):

1. the bytes one client's personal state takes, exactly, from the parameter tree
   (`jax.eval_shape` of `stacked_personal(params, roles, n)`, checked linear in n);
2. what is on the device whatever N is: the server state (frozen backbone, shared leaves,
   optimizer state) and the compiled round's working memory for the default cohort (8 clients x
   4 steps x batch 8 x 64 tokens; XLA's `memory_analysis` of the round compiled for this
   backend: temporaries plus the cohort batch);
3. clients per GiB = floor(2^30 / bytes per client), and the implied count for one 80 GB GPU:
   (pool - server state - round workspace) / bytes per client, for JAX's default GPU pool (75%
   of the memory, `XLA_PYTHON_CLIENT_MEM_FRACTION`) and for a 95% pool;
4. verification: allocates the stacked state of the largest N that fits a budget (default 1 GiB)
   sharded over all devices (created in place by a jitted `init_clients` with client
   shardings), checks the bytes on each device against the formula and the process's resident
   memory growth, and runs one FedAvg round on that state (personal adapters: FedPer-style),
   checking that only the cohort's rows changed.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/client_memory.py \\
      --json /tmp/client_memory.json
  python benchmarks/client_memory.py --budget_gib 60     # on one 80 GB GPU (not run here)

Prints a markdown table (BENCHMARKS.md, "Memory scale").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default as default_config  # noqa: E402
from fedjax_fm import algorithms, assets, models, roles as roles_lib, sharding  # noqa: E402
from fedjax_fm.protocol import ClientExecution, stacked_personal  # noqa: E402
from fedjax_fm.cohort import Cohort  # noqa: E402
from fedjax_fm.runner import RoundRunner  # noqa: E402

GIB = 2**30
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# What is personal in each measured setting (components of `models.transformer_roles`).
SETTINGS = {
    "adapters personal": ("adapters",),
    "adapters + head personal": ("adapters", "head"),
}


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_model(config):
  m = config.model
  head = dict(m.head.to_dict(), num_classes=config.data.num_plays)
  model = models.from_pretrained(assets.path("all-minilm-l6-v2", download=True),
                                 adapters=m.adapters.to_dict(), head=head, seed=config.seed)
  return models.functional(model)


def bytes_per_client(params, role_tree) -> int:
  """Exact bytes of one client's row of the stacked personal state (checked linear in n)."""
  per_n = [roles_lib.tree_bytes(jax.eval_shape(lambda p, n=n: stacked_personal(p, role_tree, n),
                                               params)) for n in (1, 1000)]
  assert per_n[1] == 1000 * per_n[0], per_n
  return per_n[0]


def abstract_cohort(config, k):
  """ShapeDtypeStructs of the default config's cohort batch (K clients)."""
  shape = (k, config.local_steps, config.batch_size)
  t = config.data.max_length
  ints = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  return Cohort(data={"input_ids": ints(*shape, t), "attention_mask": ints(*shape, t),
                      "token_type_ids": ints(*shape, t), "y": ints(*shape)},
                mask=jax.ShapeDtypeStruct(shape, jnp.float32),
                weights=jax.ShapeDtypeStruct((k,), jnp.float32), client_ids=ints(k))


def random_cohort(config, k, num_clients, seed=0):
  rng = np.random.default_rng(seed)
  shape = (k, config.local_steps, config.batch_size)
  t = config.data.max_length
  ids = np.sort(rng.choice(num_clients, k, replace=False)).astype(np.int32)
  return Cohort(data={"input_ids": rng.integers(1000, 5000, shape + (t,), dtype=np.int32),
                      "attention_mask": np.ones(shape + (t,), np.int32),
                      "token_type_ids": np.zeros(shape + (t,), np.int32),
                      "y": rng.integers(0, config.data.num_plays, shape, dtype=np.int32)},
                mask=np.ones(shape, np.float32), weights=np.ones(k, np.float32), client_ids=ids)


def measure(name, personal, config, graphdef, params, mesh, args):
  role_tree = models.transformer_roles(params, trainable=tuple(config.model.trainable),
                                       personal=personal)
  per_client = bytes_per_client(params, role_tree)
  alg = algorithms.fedavg(models.classification_loss(graphdef, TEXT_INPUTS), role_tree,
                          client_lr=config.algorithm.hparams.client_lr,
                          execution=ClientExecution("vmap", mesh=mesh))
  server_abstract = jax.eval_shape(alg.init, params, jax.random.key(0))
  server_bytes = roles_lib.tree_bytes(server_abstract)
  k = config.cohort_size
  c = sharding.client_axis_size(mesh)
  n = max(c, int(args.budget_gib * GIB // per_client) // c * c)  # the most rows in the budget
  runner = RoundRunner(alg, mesh)
  clients_abstract = jax.eval_shape(lambda p: alg.init_clients(p, n), params)
  cohort = abstract_cohort(config, k)
  t0 = time.perf_counter()
  round_jit = runner._round  # pylint: disable=protected-access  # to read XLA's memory analysis
  compiled = round_jit.lower(server_abstract, clients_abstract, cohort,
                             jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  workspace = int(mem.temp_size_in_bytes) + roles_lib.tree_bytes(cohort)

  # ---- verification: the stacked state of n clients, created in place, sharded ----
  rss0 = rss_bytes()
  make = jax.jit(lambda p: alg.init_clients(p, n),
                 out_shardings=sharding.client_shardings(clients_abstract, mesh))
  t0 = time.perf_counter()
  clients = jax.block_until_ready(make(params))
  alloc_s = time.perf_counter() - t0
  rss_growth = rss_bytes() - rss0
  per_device = {}
  for leaf in jax.tree_util.tree_leaves(clients):
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  expected_per_device = n // c * per_client
  assert set(per_device.values()) == {expected_per_device}, (per_device, expected_per_device)
  assert sum(per_device.values()) == n * per_client

  # one round on that state: only the cohort's rows may change
  before = jax.tree_util.tree_map(lambda x: np.asarray(x[:64]), clients)
  # The server is placed (copied: the round donates it); the clients are placed already and a
  # copy of them would double the peak.
  server, _ = runner.place(alg.init(params, jax.random.key(0)), {})
  batch = random_cohort(config, k, min(n, 64))
  t0 = time.perf_counter()
  # the executable compiled above (the jitted runner would compile it a second time)
  server, clients, metrics = compiled(server, clients, runner.place_cohort(batch),
                                      jax.random.key(1))
  loss = float(metrics["loss"])
  round_s = time.perf_counter() - t0
  after = jax.tree_util.tree_map(lambda x: np.asarray(x[:64]), clients)
  changed = sorted({int(r) for a, b in zip(jax.tree_util.tree_leaves(before),
                                           jax.tree_util.tree_leaves(after))
                    for r in np.nonzero(np.any((a != b).reshape(len(a), -1), 1))[0]})
  assert changed == sorted(batch.client_ids.tolist()), (changed, batch.client_ids)
  del clients, server

  pools = {"75%": 0.75, "95%": 0.95}
  return {
      "setting": name, "personal": list(personal),
      "params_per_client": sum(int(np.prod(x.shape)) for x in
                               jax.tree_util.tree_leaves(roles_lib.select(params, role_tree,
                                                                          roles_lib.PERSONAL))),
      "bytes_per_client": per_client, "clients_per_gib": GIB // per_client,
      "server_bytes": server_bytes, "round_workspace_bytes": workspace,
      "round_temp_bytes": int(mem.temp_size_in_bytes),
      "gpu80_clients": {p: int((80e9 * f - server_bytes - workspace) // per_client)
                        for p, f in pools.items()},
      "verified_clients": n, "verified_bytes": n * per_client,
      "verified_bytes_per_device": expected_per_device, "devices": c,
      "rss_growth_bytes": rss_growth, "alloc_s": alloc_s, "compile_s": compile_s,
      "round_s": round_s, "round_loss": loss,
  }


def table(rows, meta) -> str:
  lines = [f"MiniLM-L6 + configs/default.py adapters (bottleneck {meta['bottleneck']}, "
           f"{meta['adapters']}); backend {meta['backend']} ({meta['devices']} devices); "
           f"verification budget {meta['budget_gib']} GiB",
           "| personal state | params/client | bytes/client | clients per GiB | server state MB | "
           "round workspace MB | 80 GB GPU, 75% pool | 80 GB GPU, 95% pool | verified: clients "
           "(GiB) allocated | MB/device (formula = shards) | RSS growth GiB | compile s | "
           "round s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['setting']} | {r['params_per_client']:,} | {r['bytes_per_client']:,} | "
        f"{r['clients_per_gib']:,} | {r['server_bytes'] / 1e6:.1f} | "
        f"{r['round_workspace_bytes'] / 1e6:.1f} | {r['gpu80_clients']['75%']:,} | "
        f"{r['gpu80_clients']['95%']:,} | {r['verified_clients']:,} "
        f"({r['verified_bytes'] / GIB:.3f}) | {r['verified_bytes_per_device'] / 1e6:.1f} | "
        f"{r['rss_growth_bytes'] / GIB:.3f} | {r['compile_s']:.1f} | {r['round_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--budget_gib", type=float, default=1.0,
                      help="memory to fill with client state in the verification")
  parser.add_argument("--settings", default=",".join(SETTINGS),
                      help=f"comma-separated subset of {list(SETTINGS)}")
  parser.add_argument("--json", default=None, help="also write the rows here")
  args = parser.parse_args(argv)
  names = [s for s in args.settings.split(",") if s]
  unknown = sorted(set(names) - set(SETTINGS))
  if unknown:
    raise SystemExit(f"error: unknown --settings {unknown}; choose from {list(SETTINGS)}")
  config = default_config.get_config()
  graphdef, params = build_model(config)
  mesh = sharding.make_mesh()
  rows = [measure(name, SETTINGS[name], config, graphdef, params, mesh, args) for name in names]
  meta = {"backend": jax.default_backend(), "devices": len(jax.devices()),
          "budget_gib": args.budget_gib, "bottleneck": config.model.adapters.bottleneck,
          "adapters": f"names {tuple(config.model.adapters.names)}, after every FFN block",
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
  print(table(rows, meta))
  print(f"peak RSS of this process: {meta['peak_rss_gib']:.2f} GiB")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
