"""Workload W3: federated LoRA fine-tuning of a Llama-shaped decoder of about 100M parameters.

A numpy-random `DecoderLM` (`fedjax_fm.models.builders.random_decoder`) of the Llama shape
``llama-100m`` (12 layers x 768, GQA 12/4 heads of 64, SwiGLU FFN 2048, 32k vocabulary, tied
embeddings: 0.100 B parameters), frozen, with LoRA rank 16 (alpha 32) on q, k, v, o, gate, up
and down of every layer (float32). 16 clients, all in every round, x 4 local SGD steps x batch 4
x 128 tokens (random token ids, every token real); next-token cross-entropy
(`decoder_loss.lm_loss_fn`); client SGD lr 0.05, server SGD lr 1.0. The decoder has no dropout,
so every runner computes the same round and the table checks it.

Runners: the engine's round and `jax_client_loop` as in W1/W2, and `torch_loop`: transformers'
`LlamaForCausalLM` (sdpa attention) holding the same backbone values, wrapped by peft's LoRA
(`LoraConfig(r=16, lora_alpha=32, lora_dropout=0)` on the same seven projections, A and B set
to the JAX factors), local `torch.optim.SGD` on the LoRA parameters, weighted FedAvg.

FLOPs (`round_flops`), per token: 4 N_mm (forward 2, backward activation gradients 2; the frozen
backbone gets no weight gradients) + 6 N_lora (forward, input and weight gradients) + 3 A with
A = 4 T L H d_head (attention scores and context over the full T x T, forward 2 x, backward
2 x); N_mm counts the backbone's matmul weights including the tied output projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm import cohort as cohort_lib
from fedjax_fm import roles as roles_lib
from fedjax_fm.models import functional
from fedjax_fm.models.builders import random_decoder
from fedjax_fm.models.decoder import DecoderConfig
from fedjax_fm.models.decoder_lora import DecoderLoRAConfig, decoder_roles
from fedjax_fm.models.decoder_loss import lm_loss_fn
from fedjax_fm.models.decoder_pretrained import PARAMETER_MAP

from llm_plan import HF_CONFIGS
from measure import torch_sync
from workload import Workload

NAME = "W3"
CLIENT_LR, SERVER_LR = 0.05, 1.0
LORA_RANK, LORA_ALPHA = 16, 32.0
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
TORCH_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}
# transformers config.json values (llama model_type), read by `DecoderConfig.from_hf` for JAX
# and by `LlamaConfig` for torch: the planner's shapes (`llm_plan.HF_CONFIGS`), tied embeddings.
SHAPES = {"llama-100m": HF_CONFIGS["llama-100m"],
          "tiny": dict(HF_CONFIGS["tiny"], tie_word_embeddings=True)}
DEFAULTS = {"clients": 16, "steps": 4, "batch": 4, "seq_len": 128, "shape": "llama-100m"}
QUICK_DEFAULTS = {"clients": 2, "steps": 1, "batch": 2, "seq_len": 16, "shape": "tiny"}
DEFAULT_RUNNERS = ("fedjax_fm[default]", "jax_client_loop", "torch_loop")
QUICK_RUNNERS = ("fedjax_fm[default]", "jax_client_loop", "torch_loop")


def matmul_params(hf: dict) -> tuple[int, int]:
  """(N_mm, N_lora): backbone matmul weights (with the output projection) and LoRA factors."""
  d, f, L = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
  q = hf["num_attention_heads"] * hf["head_dim"]
  kv = hf["num_key_value_heads"] * hf["head_dim"]
  dims = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f),
          "down": (f, d)}
  n_mm = L * sum(a * b for a, b in dims.values()) + hf["vocab_size"] * d
  n_lora = L * sum(LORA_RANK * (a + b) for a, b in dims.values())
  return n_mm, n_lora


def round_flops(hf: dict, tokens: int, seq_len: int) -> float:
  n_mm, n_lora = matmul_params(hf)
  attention = 4 * seq_len * hf["num_hidden_layers"] * hf["num_attention_heads"] * hf["head_dim"]
  return tokens * (4 * n_mm + 6 * n_lora + 3 * attention)


def make_federation(args, vocab_size: int) -> cohort_lib.FederatedData:
  """`clients` x (steps * batch) random token sequences, every token real."""
  rng = np.random.default_rng(args.seed)
  n = args.clients * args.steps * args.batch
  ids = rng.integers(0, vocab_size, size=(n, args.seq_len)).astype(np.int32)
  arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  per_client = args.steps * args.batch
  return cohort_lib.FederatedData(arrays, np.arange(0, n + 1, per_client, dtype=np.int64))


# --------------------------------------------------------------------------- torch loop


def torch_model(torch, hf: dict, params_by_path: dict[str, np.ndarray]):
  """transformers' `LlamaForCausalLM` with the JAX backbone's values and peft LoRA on the
  seven projections holding the JAX factors. Returns (model, {JAX path: [per-layer (param,
  transpose)]}) of the LoRA parameters."""
  # pylint: disable=g-import-not-at-top
  import peft
  import transformers
  from transformers import LlamaConfig, LlamaForCausalLM
  transformers.logging.set_verbosity_error()
  config = LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"},
                       attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                       max_position_embeddings=4096)
  model = LlamaForCausalLM(config)
  layers = hf["num_hidden_layers"]
  state = {}
  for path, (name, convert) in PARAMETER_MAP.items():
    if path not in params_by_path:
      continue
    value = params_by_path[path]
    if path.startswith("layers/"):
      for i in range(layers):
        state[f"model.layers.{i}.{name}"] = convert(value[i])
    else:
      state[name if name.startswith("lm_head") else name] = convert(value)
  if hf["tie_word_embeddings"]:
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
  missing = [m for m in missing if "rotary_emb" not in m]
  if missing or unexpected:
    raise ValueError(f"torch Llama does not match the JAX decoder: missing {missing}, "
                     f"unexpected {unexpected}")
  model.requires_grad_(False)
  lora = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                         target_modules=[TORCH_MODULE[t].split(".")[-1] for t in TARGETS])
  model = peft.get_peft_model(model, lora)
  trainable = {}
  with torch.no_grad():
    for t in TARGETS:
      group = "attention" if t in ("q", "k", "v", "o") else "mlp"
      for factor, torch_name in (("a", "lora_A"), ("b", "lora_B")):
        path = f"layers/{group}/lora_{t}/{factor}"
        params = []
        for i in range(layers):
          module = model.get_submodule(f"base_model.model.model.layers.{i}.{TORCH_MODULE[t]}")
          p = getattr(module, torch_name)["default"].weight  # [r, in] / [out, r]
          p.copy_(torch.from_numpy(np.ascontiguousarray(params_by_path[path][i].T)))
          params.append(p)
        trainable[path] = params
  return model, trainable


def torch_loop_runner(torch, device, hf: dict, params_by_path, dtype: str = "float32"):
  """Sequential clients over one peft model: per client the global LoRA factors are copied in,
  local SGD runs on them, the weighted delta is accumulated."""
  model, trainable = torch_model(torch, hf, params_by_path)
  model.to(device).train()
  params = [p for ps in trainable.values() for p in ps]
  sync = torch_sync(torch, device)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
              else torch.autocast(device.type, enabled=False))

  def step(cohort, r):
    del r
    ids = torch.from_numpy(np.asarray(cohort.data["input_ids"])).long().to(device)
    mask = torch.from_numpy(np.asarray(cohort.data["attention_mask"])).long().to(device)
    global_values = [p.detach().clone() for p in params]
    acc = [torch.zeros_like(p) for p in params]
    total = 0.0
    for k in range(cohort.num_clients):
      with torch.no_grad():
        for p, g in zip(params, global_values):
          p.copy_(g)
      opt = torch.optim.SGD(params, lr=CLIENT_LR)
      for s in range(cohort.num_steps):
        opt.zero_grad(set_to_none=True)
        with autocast:
          loss = model(input_ids=ids[k, s], attention_mask=mask[k, s], labels=ids[k, s]).loss
        loss.backward()
        opt.step()
      w = float(cohort.weights[k])
      total += w
      with torch.no_grad():
        for a, p, g in zip(acc, params, global_values):
          a.add_(p - g, alpha=w)
    with torch.no_grad():
      for p, g, a in zip(params, global_values, acc):
        p.copy_(g + SERVER_LR * a / total)
    sync()

  step.info = lambda: ""
  step.shared = lambda: {path: np.stack([p.detach().float().cpu().numpy().T for p in ps])
                         for path, ps in trainable.items()}
  return step


# --------------------------------------------------------------------------- setup


def setup(args, torch, tdev, rounds: int) -> Workload:
  """W3's federation, cohorts for `rounds` rounds (all clients each round), model, runners."""
  hf = SHAPES[args.shape]
  # bfloat16: backbone stored and computed in bf16 (LoRA factors stay float32), the torch loop
  # under autocast.
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  config = DecoderConfig.from_hf(hf, dtype=dtype, param_dtype=dtype)
  lora = DecoderLoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA, targets=TARGETS)
  graphdef, params = functional(random_decoder(config, lora, args.seed))
  roles = decoder_roles(params, trainable=("lora",))
  fed = make_federation(args, config.vocab_size)
  ids = np.arange(args.clients, dtype=np.int32)
  cohorts = [cohort_lib.make_cohort(fed, ids, steps=args.steps, batch_size=args.batch,
                                    seed=args.seed, round_num=r) for r in range(rounds)]
  tokens = args.clients * args.steps * args.batch * args.seq_len
  n_shared = roles_lib.count(roles, params, roles_lib.SHARED)
  n_frozen = roles_lib.count(roles, params, roles_lib.FROZEN)
  summary = (f"W3: {args.shape} decoder ({config.num_layers} layers x {config.hidden_size}, "
             f"{n_frozen / 1e6:.1f}M frozen, {n_shared / 1e6:.2f}M trained: LoRA r={LORA_RANK} "
             f"on {','.join(TARGETS)}), {args.dtype}; {args.clients} clients x {args.steps} local "
             f"steps x batch {args.batch} x {args.seq_len} tokens")
  params_by_path = {roles_lib.leaf_path(p): np.asarray(x, np.float32)
                    for p, x in jax.tree_util.tree_leaves_with_path(params)}
  torch_runner = None
  if torch is not None:
    torch_runner = lambda: torch_loop_runner(torch, tdev, hf, params_by_path, args.dtype)
  return Workload(
      name=NAME, summary=summary, round_flops=round_flops(hf, tokens, args.seq_len),
      client_steps=args.clients * args.steps, num_clients=fed.num_clients, cohorts=cohorts,
      loss_fn=lm_loss_fn(graphdef, chunk_size=min(128, args.seq_len)), roles=roles,
      params=params, client_lr=CLIENT_LR, server_lr=SERVER_LR, torch_runner=torch_runner,
      deterministic=True, tokens=tokens)
