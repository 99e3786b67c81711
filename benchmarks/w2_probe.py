r"""Where W2's time goes: one training step on one client's batch against all clients' at once.

The engine's `vmap` over clients makes every frozen-backbone matmul one matmul over all
clients' tokens. This probe asks whether that is worth anything on this machine: it times one
SGD step of W2's model (frozen all-MiniLM-L6-v2 + adapters + head; gradients for adapters and
head only) on a batch of 8 sequences (one client's step) and on 16 x 8 = 128 sequences (all
clients' step as one batch, the best `vmap` could do), in JAX (with the round's XLA options and
with none) and in torch (HF `BertModel`, 1 and 2 threads), and reports GFLOP/s from
`workload_w2.round_flops`. Calls are interleaved and medians taken.

Usage::

  python benchmarks/w2_probe.py
  python benchmarks/w2_probe.py --batches 8,128,256 --torch_threads 1
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from fedjax_fm import assets
from fedjax_fm import client_update
from fedjax_fm import roles as roles_lib
from fedjax_fm import runner as runner_lib
from fedjax_fm.models import classification_loss, from_pretrained, functional, transformer_roles
from fedjax_fm.models.pretrained import config_from_hf, read_hf_config

import workload_w2 as w2
from measure import Noise, interleaved_medians, progress


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batches", type=str, default="8,128", help="sequences per step to time")
  p.add_argument("--seq_len", type=int, default=32)
  p.add_argument("--bottleneck", type=int, default=32)
  p.add_argument("--torch_threads", type=str, default="1,2", help="torch thread counts to time")
  p.add_argument("--reps", type=int, default=3, help="interleaved passes (3 calls each)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(args):
  path = assets.path("all-minilm-l6-v2", download=True)
  model = from_pretrained(
      path, adapters={"names": ("shared",), "bottleneck": args.bottleneck,
                      "activation": w2.ADAPTER_ACTIVATION},
      head={"kind": "classification", "num_classes": w2.NUM_CLASSES, "pooling": "mean"},
      seed=args.seed, config_overrides={"hidden_dropout": 0.0, "attention_dropout": 0.0})
  graphdef, params = functional(model)
  roles = transformer_roles(params)
  loss_fn = classification_loss(graphdef, w2.TEXT_INPUTS)
  shared = roles_lib.select(params, roles, roles_lib.SHARED)
  frozen = roles_lib.select(params, roles, roles_lib.FROZEN)
  config = config_from_hf(read_hf_config(path), path=path)
  shape = w2.Shape(config.num_layers, config.hidden_size, config.intermediate_size,
                   args.seq_len, args.bottleneck, w2.NUM_CLASSES)

  def sgd_step(sh, fr, batch, mask, key):
    objective = lambda p, b, m, k: client_update.masked_loss(loss_fn, roles_lib.merge(p, fr), b, m, k)
    grads, _ = jax.grad(objective, has_aux=True)(sh, batch, mask, key)
    return jax.tree_util.tree_map(lambda p, g: p - w2.CLIENT_LR * g, sh, grads)

  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
  fns, flops = {}, {}
  options = {"round's XLA options": runner_lib.default_compiler_options() or None, "none": None}
  rng = np.random.default_rng(args.seed)
  for b in (int(x) for x in args.batches.split(",")):
    t = args.seq_len
    data = {"input_ids": rng.integers(1, config.vocab_size, (b, t)).astype(np.int32),
            "attention_mask": np.ones((b, t), np.int32),
            "token_type_ids": np.zeros((b, t), np.int32),
            "y": rng.integers(0, w2.NUM_CLASSES, b).astype(np.int32)}
    jdata, mask, key = jax.device_put(data), jax.numpy.ones(b), jax.random.key(0)
    for label, opts in options.items():
      if opts is None and label != "none":
        continue
      fn = jax.jit(sgd_step, compiler_options=opts)
      fns[(b, f"jax, {label}")] = (
          lambda fn=fn, jdata=jdata, mask=mask: jax.block_until_ready(
              fn(shared, frozen, jdata, mask, key)))
    if torch is not None:
      params_by_path = {roles_lib.leaf_path(p): np.asarray(x, np.float32)
                        for p, x in jax.tree_util.tree_leaves_with_path(params)}
      tmodel, trainable = w2.torch_model(torch, path, args.bottleneck, params_by_path)
      opt = torch.optim.SGD(list(trainable.values()), lr=w2.CLIENT_LR)
      tdata = [torch.from_numpy(data[k]) for k in w2.TEXT_INPUTS]
      ty = torch.from_numpy(data["y"]).long()
      for threads in (int(x) for x in args.torch_threads.split(",")):
        def torch_step(tmodel=tmodel, opt=opt, tdata=tdata, ty=ty, threads=threads):
          torch.set_num_threads(threads)
          opt.zero_grad(set_to_none=True)
          torch.nn.functional.cross_entropy(tmodel(*tdata), ty).backward()
          opt.step()
        fns[(b, f"torch, {threads} thread(s)")] = torch_step
    for k in fns:
      flops.setdefault(k, w2.round_flops(shape, k[0]))
  progress(f"timing {len(fns)} step variants")
  with Noise() as noise:
    med = interleaved_medians(fns, reps=args.reps)
  print(f"W2 model, one SGD step (adapters + head trained), {args.seq_len} tokens per sequence; "
        f"median of {3 * args.reps} interleaved calls; {os.cpu_count()} CPU cores, other "
        f"processes {100 * noise.other:.0f}% / steal {100 * noise.steal:.0f}%")
  print("| sequences per step | implementation | ms / step | ms per 8 sequences | GFLOP/s |")
  print("|---|---|---|---|---|")
  for (b, label), s in med.items():
    print(f"| {b} | {label} | {1e3 * s:.1f} | {8e3 * s / b:.1f} | "
          f"{flops[(b, label)] / s / 1e9:.1f} |")


if __name__ == "__main__":
  main(parse_args())
