"""Workload W2: FedAvg fine-tuning of adapters on a frozen MiniLM encoder.

The real all-MiniLM-L6-v2 weights (BERT architecture: 6 layers, hidden 384, 12 heads, FFN
1536), frozen, with a bottleneck adapter (Houlsby et al. 2019; width 32, GELU) after every
layer's FFN block and a mean-pooling classification head (8 classes); only adapters and head
are trained and averaged (~0.15M parameters). 16 clients, all in every round, x 4 local SGD
steps x batch 8 x 32 tokens (random token ids, random lengths 16..32 with padding, random
labels; seeded numpy). Dropout is off in every runner (hidden and attention dropout 0), so the
runners compute the same function and must agree after a round.

With a frozen backbone shared by all clients, `vmap` over clients turns every backbone matmul
into one matmul over all clients' tokens; only the adapters and the head are per-client.

FLOPs are counted analytically (`round_flops`): 2 per multiply-add of every matmul that a
training step must do, with padding tokens counted (every runner computes them):

- forward, per layer and sequence of T tokens: Q, K, V, O projections 8 T d^2, attention
  scores and context 4 T^2 d, FFN 4 T d f, adapter 4 T d r; the head 2 d C per sequence;
- backward through the frozen backbone: activation gradients only (no weight gradients), i.e.
  1x the forward for the projections and the FFN, 2x for the two attention products (both of
  their operands are activations); adapters and head 2x (input and weight gradients);
- nothing below the lowest trainable parameter: in layer 0 only the adapter's weight
  gradients and its up-projection's input gradient (6 T d r), no gradient through layer 0's
  attention and FFN, none into the embeddings.

LayerNorm, softmax, GELU, pooling, the loss and the SGD updates are elementwise work and are
not counted.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm import assets
from fedjax_fm import cohort as cohort_lib
from fedjax_fm import roles as roles_lib
from fedjax_fm.models import (classification_loss, from_pretrained, functional,
                              transformer_roles)
from fedjax_fm.models.pretrained import config_from_hf, read_hf_config

from measure import torch_sync
from workload import Workload

NAME = "W2"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
NUM_CLASSES = 8
ADAPTER_ACTIVATION = "gelu"
CLIENT_LR, SERVER_LR = 0.1, 1.0
DEFAULTS = {"clients": 16, "steps": 4, "batch": 8, "seq_len": 32, "bottleneck": 32}
# --quick: a tiny random-weight BERT saved to a temporary folder (same loading paths), 2
# clients x 1 step x batch 4 x 16 tokens.
QUICK_DEFAULTS = {"clients": 2, "steps": 1, "batch": 4, "seq_len": 16, "bottleneck": 8}
TINY_BERT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=64)
# all-MiniLM-L6-v2's sizes, for random BERTs of other depths (--layers: the cost-growth plot).
MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512)
DEFAULT_RUNNERS = ("fedjax_fm[default]", "fedjax_fm[sequential1,scan]", "fedjax_fm[vmap]",
                   "fedjax_fm[vmap,scan]", "jax_client_loop", "torch_loop",
                   "torch_loop[threads=1]", "pfl", "drjax")
QUICK_RUNNERS = ("fedjax_fm[default]", "jax_client_loop", "torch_loop")


@dataclasses.dataclass(frozen=True)
class Shape:
  """The sizes the FLOP count needs."""
  layers: int
  hidden: int
  ffn: int
  seq_len: int
  bottleneck: int
  classes: int


def flops_per_sequence(s: Shape) -> dict[str, float]:
  """Training FLOPs of one sequence, by part (see the module docstring for what is counted)."""
  t, d, f, r = s.seq_len, s.hidden, s.ffn, s.bottleneck
  proj, attn, ffn, adapter = 8 * t * d * d, 4 * t * t * d, 4 * t * d * f, 4 * t * d * r
  return {
      "forward": s.layers * (proj + attn + ffn + adapter) + 2 * d * s.classes,
      # layers 1..L-1: activation gradients through the frozen parts, both gradients of the
      # adapter; layer 0: the adapter's two weight gradients and one input gradient.
      "backward": ((s.layers - 1) * (proj + 2 * attn + ffn + 2 * adapter)
                   + 1.5 * adapter + 2 * 2 * d * s.classes),
  }


def round_flops(s: Shape, sequences: int) -> float:
  return sequences * sum(flops_per_sequence(s).values())


# --------------------------------------------------------------------------- model and data


def tiny_bert_folder(seed: int, shape: dict | None = None) -> str:
  """A random-weight BERT saved by transformers in a temporary folder (for --quick; with
  `shape`, e.g. MiniLM's sizes with another depth, for --layers)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import BertConfig, BertModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  path = tempfile.mkdtemp(prefix="w2_random_bert_")
  BertModel(BertConfig(**(shape or TINY_BERT))).save_pretrained(path)
  return path


def make_federation(args, vocab_size: int) -> cohort_lib.FederatedData:
  """`clients` x (steps * batch) random token sequences with random lengths and labels."""
  rng = np.random.default_rng(args.seed)
  n, t = args.clients * args.steps * args.batch, args.seq_len
  lengths = rng.integers(t // 2, t + 1, size=n)
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, vocab_size, size=(n, t)).astype(np.int32) * mask  # pad id 0
  arrays = {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": np.zeros((n, t), np.int32),
            "y": rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)}
  per_client = args.steps * args.batch
  return cohort_lib.FederatedData(arrays, np.arange(0, n + 1, per_client, dtype=np.int64))


# --------------------------------------------------------------------------- torch loop


def torch_model(torch, path: str, bottleneck: int, params_by_path: dict[str, np.ndarray]):
  """HF `BertModel` (frozen, dropout 0) with a bottleneck adapter after every layer's FFN
  output and a mean-pooling linear head, adapters and head initialised from the JAX model's
  values. Returns (model, {JAX path: torch parameter} of the trainable parameters)."""
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers import BertModel  # pylint: disable=g-import-not-at-top
  transformers.logging.set_verbosity_error()  # the unused pooler's "unexpected keys" report
  nn, F = torch.nn, torch.nn.functional

  class Adapter(nn.Module):
    """h -> h + up(gelu(down(h)))."""

    def __init__(self, d, r):
      super().__init__()
      self.down, self.up = nn.Linear(d, r), nn.Linear(r, d)

    def forward(self, h):
      return h + self.up(F.gelu(self.down(h)))

  class AdaptedOutput(nn.Module):
    """BertOutput with the adapter on the FFN output before the residual + LayerNorm, where
    `fedjax_fm.models.transformer.EncoderLayer` puts it."""

    def __init__(self, output, adapter):
      super().__init__()
      self.output, self.adapter = output, adapter

    def forward(self, hidden_states, input_tensor):
      h = self.output.dropout(self.output.dense(hidden_states))
      return self.output.LayerNorm(self.adapter(h) + input_tensor)

  class Classifier(nn.Module):

    def __init__(self):
      super().__init__()
      self.bert = BertModel.from_pretrained(path, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0,
                                            add_pooling_layer=False)
      self.bert.requires_grad_(False)
      d = self.bert.config.hidden_size
      for layer in self.bert.encoder.layer:
        layer.output = AdaptedOutput(layer.output, Adapter(d, bottleneck))
      self.head = nn.Linear(d, NUM_CLASSES)

    def forward(self, input_ids, attention_mask, token_type_ids):
      hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
      m = attention_mask[..., None].to(hidden.dtype)
      pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
      return self.head(pooled)

  model = Classifier()
  trainable = {"head/classifier/kernel": model.head.weight, "head/classifier/bias": model.head.bias}
  for i, layer in enumerate(model.bert.encoder.layer):
    for proj in ("down", "up"):
      lin = getattr(layer.output.adapter, proj)
      trainable[f"encoder/layers/{i}/adapters/shared/{proj}/kernel"] = lin.weight
      trainable[f"encoder/layers/{i}/adapters/shared/{proj}/bias"] = lin.bias
  with torch.no_grad():
    for name, p in trainable.items():
      value = params_by_path[name]
      p.copy_(torch.from_numpy(np.array(value.T if name.endswith("kernel") else value)))
  return model, trainable


def torch_loop_runner(torch, device, path: str, bottleneck: int, params_by_path, dtype: str):
  """Sequential clients over one model: per client, the global adapters and head are copied in,
  local SGD runs on them (backbone requires_grad False), the weighted delta is accumulated."""
  model, trainable = torch_model(torch, path, bottleneck, params_by_path)
  model.to(device).train()  # dropout rates are 0: train mode changes nothing else
  params = list(trainable.values())
  sync = torch_sync(torch, device)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
              else torch.autocast(device.type, enabled=False))

  def step(cohort, r):
    del r
    # Part of the timed round, as the engine's device_put of the cohort is.
    data = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in cohort.data.items()}
    data["y"] = data["y"].long()
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
          logits = model(*(data[key][k, s] for key in TEXT_INPUTS))
        torch.nn.functional.cross_entropy(logits.float(), data["y"][k, s]).backward()
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
  step.shared = lambda: {name: (p.detach().float().cpu().numpy().T if name.endswith("kernel")
                                else p.detach().float().cpu().numpy())
                         for name, p in trainable.items()}
  return step


def pfl_runner(torch, device, path: str, bottleneck: int, params_by_path, dtype: str,
               batch_size: int):
  """pfl-research's simulator on the same BERT + adapters + head, initial values and cohorts
  (float32 only: pfl's own mixed precision is not the torch loop's autocast)."""
  import pfl_runner as pfl_lib  # pylint: disable=g-import-not-at-top
  if dtype != "float32":
    raise ValueError("the pfl row of W2 runs in float32 only")
  classifier, trainable = torch_model(torch, path, bottleneck, params_by_path)

  class PflClassifier(torch.nn.Module):
    """The classifier with pfl's `loss(*batch)` and `metrics(*batch)`."""

    def __init__(self):
      super().__init__()
      self.classifier = classifier

    def loss(self, input_ids, attention_mask, token_type_ids, y, eval=False):  # pylint: disable=redefined-builtin
      del eval  # dropout rates are 0: train and eval mode compute the same
      logits = self.classifier(input_ids, attention_mask, token_type_ids)
      return torch.nn.functional.cross_entropy(logits.float(), y)

    @torch.no_grad()
    def metrics(self, input_ids, attention_mask, token_type_ids, y, eval=True):  # pylint: disable=redefined-builtin
      from pfl.metrics import Weighted  # pylint: disable=g-import-not-at-top
      loss = self.loss(input_ids, attention_mask, token_type_ids, y, eval).item()
      return {"loss": Weighted(loss * len(y), len(y))}

  module = PflClassifier().to(device)

  def user_data(cohort):
    data = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in cohort.data.items()}
    data["y"] = data["y"].long()
    k, s, b = cohort.data["y"].shape
    flat = [data[key].reshape((k, s * b) + data[key].shape[3:]) for key in TEXT_INPUTS + ("y",)]
    return [[t[i] for t in flat] for i in range(k)]

  return pfl_lib.pfl_runner(torch, module, trainable, user_data, batch_size=batch_size,
                            client_lr=CLIENT_LR, server_lr=SERVER_LR)


# --------------------------------------------------------------------------- setup


def setup(args, torch, tdev, rounds: int) -> Workload:
  """W2's federation, cohorts for `rounds` rounds (all clients each round), model, runners."""
  if args.model_path:
    path, label = args.model_path, os.path.basename(args.model_path.rstrip("/"))
  elif getattr(args, "layers", None):
    path = tiny_bert_folder(args.seed, dict(MINILM_SHAPE, num_hidden_layers=args.layers))
    label = f"random MiniLM-shaped BERT, {args.layers} layers"
  elif args.quick:
    path, label = tiny_bert_folder(args.seed), "tiny random BERT"
  else:
    path, label = assets.path("all-minilm-l6-v2", download=True), "all-MiniLM-L6-v2"
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  no_dropout = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
  model = from_pretrained(
      path, adapters={"names": ("shared",), "bottleneck": args.bottleneck,
                      "activation": ADAPTER_ACTIVATION},
      head={"kind": "classification", "num_classes": NUM_CLASSES, "pooling": "mean"},
      dtype=dtype, seed=args.seed, config_overrides=no_dropout)
  graphdef, params = functional(model)
  roles = transformer_roles(params)  # backbone frozen; adapters and head shared
  config = config_from_hf(read_hf_config(path), path=path)
  shape = Shape(config.num_layers, config.hidden_size, config.intermediate_size, args.seq_len,
                args.bottleneck, NUM_CLASSES)
  fed = make_federation(args, config.vocab_size)
  ids = np.arange(args.clients, dtype=np.int32)
  cohorts = [cohort_lib.make_cohort(fed, ids, steps=args.steps, batch_size=args.batch,
                                    seed=args.seed, round_num=r) for r in range(rounds)]
  sequences = args.clients * args.steps * args.batch
  n_shared = roles_lib.count(roles, params, roles_lib.SHARED)
  n_frozen = roles_lib.count(roles, params, roles_lib.FROZEN)
  summary = (f"W2: {label} ({config.num_layers} layers x "
             f"{config.hidden_size}, {n_frozen / 1e6:.1f}M frozen, {n_shared / 1e3:.0f}K "
             f"trained: adapters r={args.bottleneck} + head), {args.dtype}; {args.clients} "
             f"clients x {args.steps} local steps x batch {args.batch} x {args.seq_len} tokens")
  params_by_path = {roles_lib.leaf_path(p): np.asarray(x, np.float32)
                    for p, x in jax.tree_util.tree_leaves_with_path(params)}
  torch_runner = pfl = None
  if torch is not None:
    torch_runner = lambda: torch_loop_runner(torch, tdev, path, args.bottleneck,
                                             params_by_path, args.dtype)
    pfl = lambda: pfl_runner(torch, tdev, path, args.bottleneck, params_by_path, args.dtype,
                             args.batch)
  return Workload(
      name=NAME, summary=summary, round_flops=round_flops(shape, sequences),
      client_steps=args.clients * args.steps, num_clients=fed.num_clients, cohorts=cohorts,
      loss_fn=classification_loss(graphdef, TEXT_INPUTS), roles=roles, params=params,
      client_lr=CLIENT_LR, server_lr=SERVER_LR, torch_runner=torch_runner, deterministic=True,
      pfl_runner=pfl)
