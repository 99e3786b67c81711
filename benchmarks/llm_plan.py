"""Plan a federated LoRA round of a decoder LLM at pod scale by compiling it (no weights, no chip).

For a model shape by name, a LoRA rank, a cohort (K clients x local steps x batch x sequence)
and a mesh of N devices (axes ``clients`` x ``fsdp``), this script builds everything abstractly
and AOT-compiles the one jitted FedAvg round for N fake CPU devices
(``--xla_force_host_platform_device_count=N``, set here before jax is imported):

- the model: ``nnx.eval_shape`` of a `DecoderLM` (bf16 backbone by default, fp32 LoRA on all of
  q,k,v,o,gate,up,down by default), layers scanned and rematerialised (``--remat``);
- the round: ``fedavg(lm_loss_fn(graphdef, chunk_size=...), decoder_roles(...),
  execution=ClientExecution("vmap", mesh=mesh))``, jitted exactly as `fedjax_fm.runner.RoundRunner`
  jits it (the runner's own `jax.jit` object: server state in, backbone over ``fsdp`` via
  `param_shardings`, client-stacked state and cohort over ``clients``, state donated);
- the arguments: `jax.ShapeDtypeStruct`s of the server state, the (empty, FedAvg) client state,
  a cohort ``[K, steps, batch, seq]`` of token ids and masks, and the round key.

It prints, per device, the bytes of `compiled.memory_analysis()` (arguments, outputs, aliased =
donated, temporaries, generated code; total = arguments + outputs - aliased + temporaries + code,
the peak XLA plans for), the FLOPs of `compiled.cost_analysis()`, the round's analytic FLOPs, the
compile time, and whether the total fits an 80 GB H100, a 141 GB H200, a 16 GB TPU v5e and a 95 GB
TPU v5p chip (fits = total <= 90% of the chip's HBM, leaving room for the runtime, library
workspaces and fragmentation; on a GPU, run with ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.9`` or more).

FLOPs. XLA's cost analysis counts a while loop's body once, and the layers, the local steps and
the vocabulary chunks are all loops, so its number is a large undercount (reported as is, and
labelled). The analytic count, per token of the cohort (T = seq, L layers, tokens = K * steps *
batch * seq):

  model FLOPs    = 4 * N_mm + 6 * N_lora + 3 * A          (forward 2 N_mm + backward input
                                                          gradients 2 N_mm; no weight gradients
                                                          for the frozen backbone)
  hardware FLOPs = model + (2 * N_mm - 2 * V * D) + 2 * N_lora + A + 2 * V * D
                 = model FLOPs + 2 * N_mm + 2 * N_lora + A  (remat="full" recomputes each layer's
                                                          forward; the chunked cross-entropy
                                                          always recomputes its logits)

with N_mm the backbone's matmul weights (every projection of every layer plus the output head
V x D; not the embedding lookup), N_lora the LoRA factors (2 r (in + out) per adapted projection
per layer; forward 2 N_lora, backward 4 N_lora), and A = 4 * T * L * heads * head_dim the
attention scores and weighted sum per token (the full T x T square: this implementation does not
skip the causal upper triangle). Without remat the hardware count drops the layer recompute.

Example::

  python benchmarks/llm_plan.py --model llama-3.1-8b --lora_rank 16 --cohort 32 --devices 64
  python benchmarks/llm_plan.py --model llama-3.2-1b --cohort 8 --devices 8 --mesh clients=1,fsdp=8
  python benchmarks/llm_plan.py --model llama-3.1-8b --cohort 32 --devices 8 --bisect_cohort h100
  python benchmarks/llm_plan.py --model tiny --cohort 4 --devices 4 --check_allocation

Prints a markdown table (BENCHMARKS.md, "LLM scale"); ``--json out.json`` appends records.
"""

from __future__ import annotations

import os
import sys


def _argv_devices(argv) -> int | None:
  for i, a in enumerate(argv):
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
  return None


if __name__ == "__main__":
  # XLA reads the fake device count once, when jax initialises its backend: set it before import.
  _n = _argv_devices(sys.argv) or 8
  _flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm import sharding
from fedjax_fm.algorithms.fedavg import fedavg
from fedjax_fm.cohort import Cohort
from fedjax_fm.models.decoder import DecoderConfig, DecoderLM
from fedjax_fm.models.decoder_loss import lm_loss_fn
from fedjax_fm.models.decoder_lora import DECODER_LORA_TARGETS, decoder_roles
from fedjax_fm.models.partitioning import param_shardings
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.runner import RoundRunner

GiB = 1024 ** 3

# transformers config.json values (the fields DecoderConfig.from_hf reads) of the real releases.
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(  # meta-llama/Llama-3.2-1B
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(  # meta-llama/Llama-3.1-8B
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen2.5-7b": dict(  # Qwen/Qwen2.5-7B (q/k/v biases: model_type qwen2)
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
        use_sliding_window=False),
    # A ~100M Llama-style shape (not a release): 12 x 768, GQA 12/4, 32k vocab, tied.
    "llama-100m": dict(
        model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
        num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu"),
    "tiny": dict(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu"),
}
MODELS = tuple(HF_CONFIGS)

# HBM per chip (bytes) and the fraction a plan may use.
CHIPS = {"H100-80GB": 80 * 10 ** 9, "H200-141GB": 141 * 10 ** 9, "v5e-16GB": 16 * GiB,
         "v5p-95GB": 95 * GiB}
FIT_FRACTION = 0.9
DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32,
          "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  model: str = "tiny"
  lora_rank: int = 16
  lora_targets: tuple[str, ...] = DECODER_LORA_TARGETS
  cohort: int = 8
  batch: int = 4
  seq: int = 512
  local_steps: int = 1
  dtype: str = "bf16"          # backbone storage and compute dtype; LoRA + optimizer fp32
  devices: int = 8
  mesh: tuple[tuple[str, int], ...] | None = None   # None: default_mesh_axes
  remat: str = "full"
  loss_chunk: int = 256
  client_optimizer: str = "adamw"
  fast_compile: bool = True    # LLVM at -O0: same buffer assignment, half the compile time
  batch_over_fsdp: bool = False  # also split each client's batch over fsdp (see build)


# XLA:CPU options for planning: they only change LLVM's code generation, after buffer assignment,
# so memory_analysis is unchanged (checked on tiny: identical temp/argument bytes) while the
# compile takes about half as long.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}

def decoder_config(name: str, dtype: str = "bf16", remat: str = "full") -> DecoderConfig:
  if name not in HF_CONFIGS:
    raise ValueError(f"unknown model {name!r}; use one of {MODELS}")
  dt = DTYPES[dtype]
  return DecoderConfig.from_hf(HF_CONFIGS[name], dtype=dt, param_dtype=dt, remat=remat)


def default_mesh_axes(devices: int, cohort: int) -> tuple[tuple[str, int], ...]:
  """fsdp = the devices of one 8-accelerator host (fast links for the backbone gathers), at most
  all devices; clients = the rest (the cohort is padded up to a multiple of it)."""
  fsdp = math.gcd(devices, 8)
  return (("clients", devices // fsdp), ("fsdp", fsdp))


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  axes = []
  for part in text.split(","):
    name, size = part.split("=")
    axes.append((name.strip(), int(size)))
  return tuple(axes)


def _sds_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def analytic_flops(cfg: DecoderConfig, rank: int, targets, tokens: int, seq: int,
                   remat: bool) -> dict[str, float]:
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f),
            "down": (f, d)}
  head = d * cfg.vocab_size
  n_mm = cfg.num_layers * sum(a * b for a, b in shapes.values()) + head
  n_lora = cfg.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
  attn = 4 * seq * cfg.num_layers * cfg.num_heads * hd
  model = tokens * (4 * n_mm + 6 * n_lora + 3 * attn)
  hardware = model + tokens * 2 * head  # the loss chunks always recompute their logits
  if remat:
    hardware += tokens * (2 * (n_mm - head) + 2 * n_lora + attn)
  return {"n_matmul_params": n_mm, "n_lora_params": n_lora, "model_flops": float(model),
          "hardware_flops": float(hardware)}


def build(spec: PlanSpec, devices=None):
  """The abstract pieces of a plan: (runner, abstract args, info)."""
  devices = list(jax.devices() if devices is None else devices)[:spec.devices]
  if len(devices) < spec.devices:
    raise ValueError(f"{spec.devices} devices requested but jax has {len(devices)}; set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={spec.devices}")
  axes = spec.mesh or default_mesh_axes(spec.devices, spec.cohort)
  mesh = sharding.make_mesh(axes, devices)
  cfg = decoder_config(spec.model, spec.dtype, spec.remat)
  lora = {"rank": spec.lora_rank, "alpha": 2.0 * spec.lora_rank, "targets": spec.lora_targets}
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0), lora=lora)))
  params = nnx.to_pure_dict(state)
  roles = decoder_roles(params)
  loss = lm_loss_fn(graphdef, chunk_size=spec.loss_chunk)
  alg = fedavg(loss, roles, client_lr=1e-4, client_optimizer=spec.client_optimizer,
               execution=ClientExecution("vmap", mesh=mesh))
  shardings = param_shardings(params, mesh, roles)
  cohort_sharding = None
  if spec.batch_over_fsdp:
    # RoundRunner shards a cohort over ``clients`` only, so the devices of one fsdp group all
    # hold (and compute) the same clients' activations. Here each client's batch axis is also
    # split over ``fsdp`` (FSDP proper: fsdp is a data-parallel axis too).
    fsdp = int(mesh.shape.get("fsdp", 1))
    if spec.batch % fsdp:
      raise ValueError(f"batch_over_fsdp: batch {spec.batch} is not divisible by fsdp {fsdp}")
    cs = sharding.client_sharding(mesh)
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients", None, "fsdp"))
    cohort_sharding = Cohort(data={"input_ids": data, "attention_mask": data}, mask=data,
                             weights=cs, client_ids=cs)
  runner = RoundRunner(alg, mesh, param_shardings=shardings, cohort_sharding=cohort_sharding)

  k = -(-spec.cohort // sharding.client_axis_size(mesh)) * sharding.client_axis_size(mesh)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  server = jax.eval_shape(alg.init, params, key)
  clients = jax.eval_shape(lambda p: alg.init_clients(p, k), params)
  tok = jax.ShapeDtypeStruct((k, spec.local_steps, spec.batch, spec.seq), jnp.int32)
  cohort = Cohort(data={"input_ids": tok, "attention_mask": tok},
                  mask=jax.ShapeDtypeStruct((k, spec.local_steps, spec.batch), jnp.float32),
                  weights=jax.ShapeDtypeStruct((k,), jnp.float32),
                  client_ids=jax.ShapeDtypeStruct((k,), jnp.int32))

  frozen = roles_lib.select(params, roles, roles_lib.FROZEN)
  trainable = roles_lib.select(params, roles, roles_lib.SHARED, roles_lib.PERSONAL)
  tokens = k * spec.local_steps * spec.batch * spec.seq
  info = {
      "mesh": dict(mesh.shape), "padded_cohort": k, "tokens_per_round": tokens,
      "backbone_params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(frozen)),
      "backbone_bytes": _sds_bytes(frozen),
      "lora_params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainable)),
      "lora_bytes": _sds_bytes(trainable),
      "server_state_bytes": _sds_bytes(server),
      "cohort_bytes": _sds_bytes(cohort),
      **analytic_flops(cfg, spec.lora_rank, spec.lora_targets, tokens, spec.seq,
                       spec.remat != "none"),
  }
  return runner, (server, clients, cohort, key), params, info, mesh


def _cost(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def plan(spec: PlanSpec, devices=None) -> dict[str, Any]:
  """Compiles the round of `spec` and returns its record (bytes are per device)."""
  t0 = time.perf_counter()
  runner, args, _, info, _ = build(spec, devices)
  t1 = time.perf_counter()
  lowered = runner.lower(*args)
  t2 = time.perf_counter()
  compiled = lowered.compile(FAST_COMPILE_OPTIONS if spec.fast_compile else None)
  t3 = time.perf_counter()
  mem = compiled.memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  code = mem.generated_code_size_in_bytes
  total = arg + out - alias + temp + code
  rec = {**dataclasses.asdict(spec), **info,
         "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
         "code_bytes": code, "total_bytes": total,
         "xla_flops_loop_bodies_once": _cost(compiled),
         "build_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2,
         "fits": {chip: bool(total <= FIT_FRACTION * hbm) for chip, hbm in CHIPS.items()},
         "backend": jax.default_backend(), "jax": jax.__version__}
  rec["mesh_axes"] = rec.pop("mesh")
  rec["lora_targets"] = list(spec.lora_targets)
  rec["mesh"] = [list(a) for a in spec.mesh] if spec.mesh else None
  return rec, compiled, runner, args


def plan_record(spec: PlanSpec, devices=None) -> dict[str, Any]:
  return plan(spec, devices)[0]


def _gib(n: float) -> str:
  return f"{n / GiB:.2f}"


def table(records) -> str:
  head = ("| model | mesh c x f | K | steps x batch x seq | args GiB | out GiB | alias GiB | "
          "temp GiB | code MiB | total GiB | XLA TFLOP (loops once) | model TFLOP | "
          "hw TFLOP | compile s | H100 | H200 | v5e | v5p |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in records:
    m = r["mesh_axes"]
    f = r["fits"]
    yes = lambda b: "yes" if b else "no"
    lines.append(
        f"| {r['model']} | {m.get('clients', 1)} x {m.get('fsdp', 1)}"
        f"{' (batch/fsdp)' if r.get('batch_over_fsdp') else ''} | {r['cohort']}"
        f"{'' if r['padded_cohort'] == r['cohort'] else ' (' + str(r['padded_cohort']) + ')'} | "
        f"{r['local_steps']} x {r['batch']} x {r['seq']} | {_gib(r['argument_bytes'])} | "
        f"{_gib(r['output_bytes'])} | {_gib(r['alias_bytes'])} | {_gib(r['temp_bytes'])} | "
        f"{r['code_bytes'] / 2**20:.1f} | {_gib(r['total_bytes'])} | "
        f"{r['xla_flops_loop_bodies_once'] / 1e12:.2f} | {r['model_flops'] / 1e12:.1f} | "
        f"{r['hardware_flops'] / 1e12:.1f} | {r['compile_s']:.1f} | "
        f"{yes(f['H100-80GB'])} | {yes(f['H200-141GB'])} | {yes(f['v5e-16GB'])} | "
        f"{yes(f['v5p-95GB'])} |")
  return "\n".join(lines)


# --- allocation check ---------------------------------------------------------------------------

def _rss_kib() -> tuple[int, int]:
  with open("/proc/self/status") as fh:
    fields = dict(line.split(":", 1) for line in fh)
  return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as fh:
      fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return True
  except OSError:
    return False


def check_allocation(spec: PlanSpec, devices=None, repeats: int = 2) -> dict[str, Any]:
  """Runs the compiled round once on real (constant) arrays on this CPU and compares the plan's
  bytes with what is allocated: the live arrays on each device before and after (arguments,
  outputs) and the process's peak resident memory during the call (temporaries, all devices)."""
  rec, compiled, runner, args = plan(spec, devices)
  server_sds, clients_sds, cohort_sds, _ = args
  mesh = runner.mesh
  in_sh = compiled.input_shardings[0]

  def materialise(sds_tree, sh_tree):
    make = jax.jit(lambda: jax.tree_util.tree_map(
        lambda s: jnp.ones(s.shape, s.dtype) if jnp.issubdtype(s.dtype, jnp.floating)
        else jnp.zeros(s.shape, s.dtype), sds_tree), out_shardings=sh_tree)
    return make()

  server = materialise(server_sds, in_sh[0])
  clients = materialise(clients_sds, in_sh[1])
  cohort = materialise(cohort_sds, in_sh[2])
  key = jax.device_put(jax.random.PRNGKey(0), in_sh[3])
  jax.block_until_ready((server, clients, cohort, key))
  dev0 = mesh.devices.flat[0]

  def dev_bytes(d):
    n = 0
    for a in jax.live_arrays():
      for s in a.addressable_shards:
        if s.device == d:
          n += s.data.nbytes
    return n

  stats0 = dev0.memory_stats()
  args_live = dev_bytes(dev0)
  peaks = []
  for _ in range(repeats):
    rss0, _ = _rss_kib()
    reset = _reset_peak()
    server, clients, metrics = compiled(server, clients, cohort, key)
    jax.block_until_ready((server, clients, metrics))
    rss1, hwm = _rss_kib()
    peaks.append(((hwm - rss0) * 1024, reset))
  del metrics
  live_after = dev_bytes(dev0)
  n = len(mesh.devices.flat)
  planned_args = rec["argument_bytes"]
  planned_run = rec["temp_bytes"] + rec["output_bytes"] - rec["alias_bytes"]
  # The first call's growth is the one to compare: its temporaries land on fresh pages. Later
  # calls reuse the pages malloc kept from the first (freed, not returned to the OS), so their
  # RSS barely grows (reported, not compared).
  peak = peaks[0][0]
  out = {
      "devices": n, "memory_stats_available": stats0 is not None,
      "planned_argument_bytes_per_device": planned_args,
      "live_argument_bytes_device0": args_live,
      "argument_ratio": args_live / planned_args if planned_args else float("nan"),
      "live_bytes_device0_after_round": live_after,
      "planned_temp_plus_new_output_bytes_all_devices": planned_run * n,
      "peak_rss_growth_bytes": peak, "peak_rss_growth_per_call": [p for p, _ in peaks],
      "peak_reset_worked": all(r for _, r in peaks),
      "run_ratio": peak / (planned_run * n) if planned_run else float("nan"),
  }
  rec["allocation_check"] = out
  return rec


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama-3.1-8b", choices=MODELS)
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--lora_targets", default=",".join(DECODER_LORA_TARGETS))
  p.add_argument("--cohort", type=int, nargs="+", default=[32],
                 help="K; several values plan several rounds (one compile each)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--local_steps", type=int, default=1)
  p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--mesh", default=None, help="e.g. clients=8,fsdp=8 (default: fsdp = "
                 "gcd(devices, 8), clients = the rest)")
  p.add_argument("--remat", default="full")
  p.add_argument("--loss_chunk", type=int, default=256)
  p.add_argument("--client_optimizer", default="adamw", choices=("sgd", "adamw"))
  p.add_argument("--bisect_cohort", default=None, choices=sorted(CHIPS),
                 help="find the largest K (multiple of the clients axis) that fits this chip")
  p.add_argument("--check_allocation", action="store_true",
                 help="also run the compiled round on this CPU and compare allocated bytes")
  p.add_argument("--batch_over_fsdp", action="store_true",
                 help="also split each client's batch over fsdp (RoundRunner splits the cohort "
                 "over clients only)")
  p.add_argument("--full_compile", action="store_true",
                 help="compile with XLA:CPU's default LLVM optimisation (slower, same bytes)")
  p.add_argument("--json", default=None, help="append the records (JSON lines) to this file")
  a = p.parse_args(argv)

  def spec_for(k):
    return PlanSpec(model=a.model, lora_rank=a.lora_rank,
                    lora_targets=tuple(t for t in a.lora_targets.split(",") if t), cohort=k,
                    batch=a.batch, seq=a.seq, local_steps=a.local_steps, dtype=a.dtype,
                    devices=a.devices, mesh=parse_mesh(a.mesh) if a.mesh else None,
                    remat=a.remat, loss_chunk=a.loss_chunk, client_optimizer=a.client_optimizer,
                    fast_compile=not a.full_compile, batch_over_fsdp=a.batch_over_fsdp)

  print(f"jax {jax.__version__} on {jax.default_backend()}, {len(jax.devices())} devices; "
        f"model {a.model}: {json.dumps(HF_CONFIGS[a.model])}", flush=True)
  records = []

  def emit(rec):
    records.append(rec)
    print(f"  K={rec['cohort']} mesh={rec['mesh_axes']} tokens/round={rec['tokens_per_round']} "
          f"backbone {rec['backbone_params'] / 1e9:.3f} B params = "
          f"{_gib(rec['backbone_bytes'])} GiB, LoRA {rec['lora_params'] / 1e6:.2f} M params = "
          f"{rec['lora_bytes'] / 2**20:.1f} MiB; compile {rec['compile_s']:.1f} s "
          f"(lower {rec['lower_s']:.1f} s)", flush=True)
    if a.json:
      with open(a.json, "a") as fh:
        fh.write(json.dumps(rec) + "\n")

  if a.bisect_cohort:
    chip = a.bisect_cohort
    c = dict(spec_for(1).mesh or default_mesh_axes(a.devices, 1))["clients"]
    fits = lambda r: r["fits"][chip]
    lo, hi = 0, c  # lo: largest known fit (0 = none), hi: smallest known miss or candidate
    while True:
      r = plan_record(spec_for(hi)); emit(r)
      if not fits(r):
        break
      lo, hi = hi, hi * 2
    while hi - lo > c:
      mid = (lo + hi) // 2 // c * c
      r = plan_record(spec_for(mid)); emit(r)
      lo, hi = (mid, hi) if fits(r) else (lo, mid)
    print(f"\nlargest cohort that fits {chip} ({FIT_FRACTION:.0%} of HBM): K = {lo}")
  else:
    for k in a.cohort:
      if a.check_allocation:
        rec = check_allocation(spec_for(k))
        emit(rec)
        c = rec["allocation_check"]
        print(f"  allocation check ({c['devices']} devices, memory_stats "
              f"{'available' if c['memory_stats_available'] else 'unavailable on this backend'}):"
              f"\n    arguments, device 0: live {c['live_argument_bytes_device0'] / 2**20:.2f} "
              f"MiB vs planned {c['planned_argument_bytes_per_device'] / 2**20:.2f} MiB "
              f"(ratio {c['argument_ratio']:.3f})"
              f"\n    the call: peak RSS growth {c['peak_rss_growth_bytes'] / 2**20:.1f} MiB vs "
              f"planned (temp + new outputs) x devices "
              f"{c['planned_temp_plus_new_output_bytes_all_devices'] / 2**20:.1f} MiB "
              f"(ratio {c['run_ratio']:.3f}, first call; growth per call "
              f"{[round(x / 2**20, 1) for x in c['peak_rss_growth_per_call']]} MiB)", flush=True)
      else:
        emit(plan_record(spec_for(k)))
  print()
  print(table(records))
  return records


if __name__ == "__main__":
  main()
