"""FedPFT's comparison, ablations and sub-FM size sweep (RESULTS.md, section FedPFT; issue 17).

Runs `configs/fedpft_text.py:small` (the first 4 MiniLM layers, IID speeches, 16 rounds, 100
layer-level and 16-per-alignment neuron-level distillation steps) for every method of `METHODS`
and seeds 0, 1, 2, one `launch.py` process at a time, each in `<scratch>/<method>_s<seed>`; then
copies each finished run's small files (summary.json, metrics.jsonl, config.json; never
checkpoints) to `results/fedpft/<method>_s<seed>/`, from which
`python -m fedjax_fm.results --rebuild` writes the RESULTS.md tables and `results/fedpft_small.png`.

  nice -n 19 python benchmarks/fedpft_experiments.py --scratch /tmp/fedpft_runs
  python benchmarks/fedpft_experiments.py --seeds 0 --methods full fedpft
  python benchmarks/fedpft_experiments.py --sizes     # parameter and byte counts per sub-FM size

Runs already in results/fedpft/ are skipped, so the script resumes where it stopped. Seed-major:
an interrupted sweep still has every method of the seeds it finished. The persistent XLA cache
(`--cache`) lets runs of one method share compiled programs across seeds.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_H = "--config.algorithm.hparams."
# method -> overrides of the `small` variant. The baselines first, then the two ablations, then
# the sub-FM size sweep (384 of 1536 FFN neurons is `fedpft`).
METHODS = {
    "full": [f"{_H}variant=full"],
    "fedpft": [f"{_H}variant=fedpft"],
    "fedot": [f"{_H}variant=fedot"],
    "no_layer_align": [f"{_H}variant=fedpft", f"{_H}layer_align_steps=0"],
    "no_neuron_align": [f"{_H}variant=fedpft", f"{_H}align_every=0"],
    "keep192": [f"{_H}variant=fedpft", f"{_H}keep_neurons=192"],
    "keep768": [f"{_H}variant=fedpft", f"{_H}keep_neurons=768"],
}
SEEDS = (0, 1, 2)
KEPT = ("summary.json", "metrics.jsonl", "config.json")
RESULTS = os.path.join(ROOT, "results", "fedpft")


def launch_and_keep(flags: list[str], out: str, work: str, env: dict) -> float:
  """Runs `launch.py --config configs/fedpft_text.py:small <flags>` in `work` unless `out`
  already holds its summary, then copies the run's small files to `out`. Returns the wall
  seconds (0: skipped)."""
  if os.path.isfile(os.path.join(out, "summary.json")):
    return 0.0
  cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config",
         os.path.join(ROOT, "configs", "fedpft_text.py:small"), *flags, "--workdir", work,
         "--overwrite"]
  start = time.time()
  subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
  os.makedirs(out, exist_ok=True)
  for name in KEPT:
    shutil.copy(os.path.join(work, name), os.path.join(out, name))
  return time.time() - start


def sizes(keep_neurons: int) -> dict:
  """Parameter counts and bytes of the `small` FM and its sub-FM with `keep_neurons` FFN
  neurons per compressed layer, from shapes only."""
  import dataclasses
  from flax import nnx
  from configs import fedpft_text
  from fedjax_fm import assets, models
  from fedjax_fm.algorithms.fedpft import fedpft
  from fedjax_fm.models.sub_fm import size_report
  c = fedpft_text.get_config("small")
  hp = c.algorithm.hparams
  model = models.from_pretrained(
      assets.path("all-minilm-l6-v2"), lora=c.model.lora.to_dict(),
      head={"kind": "classification", "pooling": "mean", "num_classes": c.data.num_plays})
  # the first `model.num_layers` layers, as fedjax_fm.models.builders.pretrained_encoder keeps
  model.encoder.layers = nnx.List(list(model.encoder.layers)[:c.model.num_layers])
  model.config = dataclasses.replace(model.config, num_layers=c.model.num_layers)
  _, params = models.functional(model)
  roles = models.transformer_roles(params, trainable=tuple(c.model.trainable))
  report = size_report(params, roles, keep_neurons, tuple(hp.retained_layers))
  alg = fedpft(lambda *a: None, roles, params, keep_neurons=keep_neurons,
               retained_layers=tuple(hp.retained_layers),
               public={"attention_mask": np.zeros((1, 1))},
               align_every=hp.align_every, align_steps=1, align_batch_size=1,
               align_retained_ratio=hp.align_retained_ratio)
  report["fedpft_bytes_down_up_per_client_round"] = alg.bytes_per_client(params)
  return report


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scratch", default="/tmp/fedpft_runs")
  parser.add_argument("--cache", default="/tmp/fedpft_xla_cache")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
  parser.add_argument("--sizes", action="store_true", help="only print the size report")
  args = parser.parse_args()
  if args.sizes:
    for keep in (192, 384, 768):
      print(keep, sizes(keep))
    return
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": args.cache}
  for seed in args.seeds:
    for method in args.methods:
      name = f"{method}_s{seed}"
      seconds = launch_and_keep(METHODS[method] + [f"--config.seed={seed}"],
                                os.path.join(RESULTS, name), os.path.join(args.scratch, name),
                                env)
      print(f"{method} seed {seed}: {seconds:.0f} s", flush=True)


if __name__ == "__main__":
  main()
