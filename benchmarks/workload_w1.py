"""Workload W1: FedAvg on pfl-research's CIFAR-10 cross-device setup.

1000 clients x 50 synthetic 32x32x3 images (seeded numpy; CIFAR-10 itself is not downloaded),
cohort 50, one local epoch with batch 10 (5 local SGD steps), client SGD lr 0.1, server SGD lr
1.0, pfl-research's small CIFAR-10 CNN (`fedjax_fm.models.SimpleCNN`, dropout on). Every
parameter is trained and averaged.

FLOPs: forward 2 * (30*30*32*27 + 28*28*64*288 + 12544*128 + 128*10) per image, training
= 3x forward, per example seen.
"""

from __future__ import annotations

import jax
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
                   "jax_client_loop", "torch_loop", "pfl", "drjax")
QUICK_RUNNERS = ("fedjax_fm[default]", "torch_loop")
DROPOUT = (0.25, 0.5)


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


def dropout_rates(args) -> tuple[float, float]:
  return (0.0, 0.0) if args.no_dropout else DROPOUT


def torch_cnn(torch_mod, params_by_path: dict[str, np.ndarray], rates=DROPOUT):
  """SimpleCNN in torch (NCHW convolutions), holding the JAX model's initial values.

  The pooled activations are flattened in NHWC order (as the JAX model does), so dense1's
  kernel is the JAX kernel transposed and the two models compute the same function. Has pfl's
  `loss(x, y)` / `metrics(x, y)` so that the pfl row trains the same module.
  """
  torch = torch_mod
  nn = torch.nn

  class CNN(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1, self.conv2 = nn.Conv2d(3, 32, 3), nn.Conv2d(32, 64, 3)
      self.dense1, self.head = nn.Linear(12544, 128), nn.Linear(128, NUM_CLASSES)
      self.drop1, self.drop2 = nn.Dropout(rates[0]), nn.Dropout(rates[1])

    def forward(self, x):
      x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
      x = self.drop1(torch.nn.functional.max_pool2d(x, 2))
      x = torch.relu(self.dense1(x.permute(0, 2, 3, 1).flatten(1)))
      return self.head(self.drop2(x))

    def loss(self, x, y, eval=False):  # pylint: disable=redefined-builtin  # pfl's signature
      self.train(not eval)
      return torch.nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=True):  # pylint: disable=redefined-builtin
      from pfl.metrics import Weighted  # pylint: disable=g-import-not-at-top
      self.train(not eval)
      loss = torch.nn.functional.cross_entropy(self(x), y, reduction="sum").item()
      return {"loss": Weighted(loss, len(y))}

  model = CNN()
  with torch.no_grad():
    for name, p in trainable_by_path(model).items():
      v = params_by_path[name]
      if name.startswith("conv") and name.endswith("kernel"):
        v = v.transpose(3, 2, 0, 1)  # HWIO -> OIHW
      elif name.endswith("kernel"):
        v = v.T
      p.copy_(torch.from_numpy(np.array(v, np.float32)))
  return model


def trainable_by_path(model) -> dict:
  """{JAX parameter path: torch parameter} of `torch_cnn`'s model."""
  return {f"{layer}/{kind}": getattr(getattr(model, layer), "weight" if kind == "kernel"
                                     else "bias")
          for layer in ("conv1", "conv2", "dense1", "head") for kind in ("kernel", "bias")}


def torch_images(torch_mod, cohort):
  """The cohort's NHWC images as an NCHW tensor [K, steps, batch, 3, 32, 32]."""
  return torch_mod.from_numpy(np.ascontiguousarray(cohort.data["x"].transpose(0, 1, 2, 5, 3, 4)))


def shared_numpy(trainable: dict) -> dict[str, np.ndarray]:
  """The torch parameters in the JAX model's layout (for the rel. diff check)."""
  out = {}
  for name, p in trainable.items():
    v = p.detach().float().cpu().numpy()
    if name.startswith("conv") and name.endswith("kernel"):
      v = v.transpose(2, 3, 1, 0)
    elif name.endswith("kernel"):
      v = v.T
    out[name] = v
  return out


def torch_loop_runner(torch_mod, device, params_by_path, rates):
  """Sequential clients; one model reloaded with the global state per client."""
  torch = torch_mod
  torch.manual_seed(0)
  global_model = torch_cnn(torch, params_by_path, rates).to(device)
  model = torch_cnn(torch, params_by_path, rates).to(device)
  model.train()
  loss_fn = torch.nn.CrossEntropyLoss()
  sync = torch_sync(torch, device)

  def to_torch(cohort):
    # NHWC numpy -> NCHW tensors on the device. Part of the timed round, as the engine's
    # device_put of the cohort is (a few ms on CPU).
    return (torch_images(torch, cohort).to(device),
            torch.from_numpy(cohort.data["y"]).long().to(device))

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
  step.shared = lambda: shared_numpy(trainable_by_path(global_model))
  return step


def pfl_runner(torch_mod, device, params_by_path, rates, batch_size):
  """pfl-research's simulator on the same CNN, initial values and cohorts."""
  import pfl_runner as pfl_lib  # pylint: disable=g-import-not-at-top
  torch = torch_mod
  model = torch_cnn(torch, params_by_path, rates).to(device)

  def user_data(cohort):
    x, y = torch_images(torch, cohort).to(device), torch.from_numpy(cohort.data["y"]).long()
    k, s, b = y.shape
    x, y = x.reshape((k, s * b) + x.shape[3:]), y.reshape(k, s * b).to(device)
    return [[x[i], y[i]] for i in range(k)]

  step = pfl_lib.pfl_runner(torch, model, {}, user_data, batch_size=batch_size,
                            client_lr=CLIENT_LR, server_lr=SERVER_LR)
  step.shared = lambda: shared_numpy(trainable_by_path(model))
  return step


def setup(args, torch, tdev, rounds: int) -> Workload:
  """W1's federation, cohorts for `rounds` rounds, model and runners."""
  steps = -(-args.examples // args.batch)  # one local epoch
  fed = make_federation(args)
  rates = dropout_rates(args)
  graphdef, params = functional(SimpleCNN(IMAGE, NUM_CLASSES, rngs=nnx.Rngs(args.seed),
                                          dropout_rates=rates))
  params_by_path = {roles_lib.leaf_path(p): np.asarray(x, np.float32)
                    for p, x in jax.tree_util.tree_leaves_with_path(params)}
  summary = (f"W1: {fed.num_clients} clients x {args.examples} images, cohort {args.cohort}, "
             f"{steps} local steps of batch {args.batch}"
             + (", dropout off" if args.no_dropout else ""))
  return Workload(
      name=NAME, summary=summary, round_flops=round_flops(args.cohort, steps, args.batch),
      client_steps=args.cohort * steps, num_clients=fed.num_clients,
      cohorts=make_cohorts(fed, args, steps, rounds), loss_fn=classification_loss(graphdef),
      roles=roles_lib.assign_roles(params), params=params, client_lr=CLIENT_LR,
      server_lr=SERVER_LR,
      torch_runner=None if torch is None else (
          lambda: torch_loop_runner(torch, tdev, params_by_path, rates)),
      pfl_runner=None if torch is None else (
          lambda: pfl_runner(torch, tdev, params_by_path, rates, args.batch)),
      deterministic=args.no_dropout)
