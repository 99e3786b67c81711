"""Workload W1: FedAvg on pfl-research's CIFAR-10 cross-device setup.

1000 clients x 50 synthetic 32x32x3 images (seeded numpy; CIFAR-10 itself is not downloaded),
cohort 50, one local epoch with batch 10 (5 local SGD steps), client SGD lr 0.1, server SGD lr
1.0, pfl-research's small CIFAR-10 CNN (`fedjax_fm.models.SimpleCNN`, dropout on). Every
parameter is trained and averaged.

FLOPs: forward 2 * (30*30*32*27 + 28*28*64*288 + 12544*128 + 128*10) per image, training
= 3x forward, per example seen.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from fedjax_fm import cohort as cohort_lib
from fedjax_fm import roles as roles_lib
from fedjax_fm.models import SimpleCNN, classification_loss, functional

from measure import torch_sync
from workload import Workload

NAME = "W1"
IMAGE = (32, 32, 3)
NUM_CLASSES = 10
CLIENT_LR, SERVER_LR = 0.1, 1.0
DEFAULTS = {"clients": 1000, "cohort": 50, "examples": 50, "batch": 10}
QUICK_DEFAULTS = {"clients": 100, "cohort": 5, "examples": 20}   # 2 local steps
# The full run's rows: about 4 minutes on 2 CPU cores. `fedjax_fm[default]` is
# `default_execution()`: `sequential5,scan` on CPU, `vmap,scan` on an accelerator. The unrolled
# and chunked rows (1.5-4 minutes each on XLA:CPU, mostly compiling) are left out to keep the run
# short; BENCHMARKS.md runs them with a second command (`--runners`, about 7 minutes).
DEFAULT_RUNNERS = ("fedjax_fm[default]", "fedjax_fm[sequential5]", "fedjax_fm[vmap]",
                   "jax_client_loop", "torch_loop")
QUICK_RUNNERS = ("fedjax_fm[default]", "torch_loop")


def forward_flops_per_image() -> int:
  """Multiply-adds x2 of SimpleCNN on one 32x32x3 image (convs, dense layers; VALID padding)."""
  return 2 * (30 * 30 * 32 * 27 + 28 * 28 * 64 * 288 + 12544 * 128 + 128 * 10)


def round_flops(cohort: int, steps: int, batch: int) -> float:
  """Training FLOPs of one round: forward + backward ~ 3x forward, per example seen."""
  return 3.0 * forward_flops_per_image() * cohort * steps * batch


def make_federation(args) -> cohort_lib.FederatedData:
  """`clients` x `examples` synthetic CIFAR-shaped images with random labels (seeded numpy)."""
  rng = np.random.default_rng(args.seed)
  n = args.clients * args.examples
  x = rng.standard_normal((n,) + IMAGE, dtype=np.float32)
  y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  offsets = np.arange(0, n + 1, args.examples, dtype=np.int64)
  return cohort_lib.FederatedData({"x": x, "y": y}, offsets)


def make_cohorts(fed, args, steps: int, count: int) -> list[cohort_lib.Cohort]:
  """The cohorts of rounds 0..count-1 (the same for every runner; built before timing)."""
  out = []
  for r in range(count):
    ids = cohort_lib.sample_clients(args.seed, r, fed.num_clients, args.cohort)
    out.append(cohort_lib.make_cohort(fed, ids, steps=steps, batch_size=args.batch,
                                      seed=args.seed, round_num=r))
  return out


def torch_cnn(torch_mod):
  """SimpleCNN in torch (NCHW)."""
  nn = torch_mod.nn
  return nn.Sequential(
      nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
      nn.Dropout(0.25), nn.Flatten(), nn.Linear(12544, 128), nn.ReLU(), nn.Dropout(0.5),
      nn.Linear(128, NUM_CLASSES))


def torch_loop_runner(torch_mod, device):
  """Sequential clients; one model reloaded with the global state per client."""
  torch = torch_mod
  torch.manual_seed(0)
  global_model = torch_cnn(torch).to(device)
  model = torch_cnn(torch).to(device)
  model.train()
  loss_fn = torch.nn.CrossEntropyLoss()
  sync = torch_sync(torch, device)

  def to_torch(cohort):
    # NHWC numpy -> NCHW tensors on the device. Part of the timed round, as the engine's
    # device_put of the cohort is (a few ms on CPU).
    x = torch.from_numpy(np.ascontiguousarray(cohort.data["x"].transpose(0, 1, 2, 5, 3, 4)))
    return x.to(device), torch.from_numpy(cohort.data["y"]).long().to(device)

  def step(cohort, r):
    del r
    x, y = to_torch(cohort)
    global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
    total = 0.0
    for k in range(cohort.num_clients):
      model.load_state_dict(global_state)
      opt = torch.optim.SGD(model.parameters(), lr=CLIENT_LR)
      for s in range(x.shape[1]):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[k, s]), y[k, s]).backward()
        opt.step()
      w = float(cohort.weights[k])
      total += w
      with torch.no_grad():
        for name, v in model.state_dict().items():
          acc[name].add_(v - global_state[name], alpha=w)
    with torch.no_grad():
      new = {name: global_state[name] + SERVER_LR * acc[name] / total for name in acc}
    global_model.load_state_dict(new)
    sync()

  step.info = lambda: ""
  return step


def setup(args, torch, tdev, rounds: int) -> Workload:
  """W1's federation, cohorts for `rounds` rounds, model and runners."""
  steps = -(-args.examples // args.batch)  # one local epoch
  fed = make_federation(args)
  graphdef, params = functional(SimpleCNN(IMAGE, NUM_CLASSES, rngs=nnx.Rngs(args.seed)))
  summary = (f"W1: {fed.num_clients} clients x {args.examples} images, cohort {args.cohort}, "
             f"{steps} local steps of batch {args.batch}")
  return Workload(
      name=NAME, summary=summary, round_flops=round_flops(args.cohort, steps, args.batch),
      client_steps=args.cohort * steps, num_clients=fed.num_clients,
      cohorts=make_cohorts(fed, args, steps, rounds), loss_fn=classification_loss(graphdef),
      roles=roles_lib.assign_roles(params), params=params, client_lr=CLIENT_LR,
      server_lr=SERVER_LR,
      torch_runner=None if torch is None else (lambda: torch_loop_runner(torch, tdev)),
      deterministic=False)
