"""Central pretraining of a small decoder on text held out of the federation, cached like an asset.

Federated LoRA fine-tuning should start from a model that already knows the language, as it
would from a downloaded Llama. No decoder LLM ships offline, so a config's ``model.pretrain``
describes one to train first: a Llama-shaped `DecoderLM` (``shape``) trained on a corpus
(``corpus``: ``"shakespeare"``, the plays `fedjax_fm.data.shakespeare_lm.PRETRAIN_PLAYS` that
the federation does not use) by AdamW with linear warm-up and cosine decay on next-token loss,
full-parameter, on random windows of ``seq_len`` tokens. The result is a Hugging Face llama
folder (`save_pretrained_decoder`) in the asset cache, named by a hash of the spec and the
corpus version, with ``pretrain.json`` (the spec, the loss curve and the held-out validation
loss); the run then loads it like any downloaded checkpoint (``model.path``). A later run with
the same spec finds it there.

  python -m fedjax_fm.pretrain --config configs/llm_shakespeare.py        # train or find; print

Example ``model.pretrain``::

    dict(corpus="shakespeare", shape=dict(vocab_size=..., hidden_size=128, ...), steps=600,
         batch_size=32, seq_len=128, lr=3e-3, warmup=50, weight_decay=0.01, seed=0)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from fedjax_fm import assets
from fedjax_fm.data import shakespeare, shakespeare_lm
from fedjax_fm.data import text as text_lib
from fedjax_fm.models.decoder import DecoderConfig, DecoderLM
from fedjax_fm.models.decoder_loss import causal_lm_loss
from fedjax_fm.models.decoder_pretrained import save_pretrained_decoder

SPEC_KEYS = ("corpus", "shape", "steps", "batch_size", "seq_len", "lr", "warmup", "weight_decay",
             "seed")
VALIDATION_WINDOWS = 256  # the validation loss's windows (the first ones of the held-out text)


def _corpora() -> dict[str, tuple[Any, int]]:
  """corpus name -> (a function giving (train text, validation text), vocabulary size)."""
  return {"shakespeare": (shakespeare_lm.pretrain_text, text_lib.CHAR_VOCAB_SIZE)}


def check_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
  """``model.pretrain`` as a plain dict with every key of `SPEC_KEYS`; errors name the key."""
  spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
  missing = [k for k in SPEC_KEYS if k not in spec]
  unknown = sorted(set(spec) - set(SPEC_KEYS))
  if missing or unknown:
    raise ValueError(f"config.model.pretrain must set exactly {list(SPEC_KEYS)}; missing "
                     f"{missing}, unknown {unknown}")
  corpora = _corpora()
  if spec["corpus"] not in corpora:
    raise ValueError(f"unknown config.model.pretrain.corpus {spec['corpus']!r}; use one of "
                     f"{sorted(corpora)}")
  vocab = corpora[spec["corpus"]][1]
  if spec["shape"].get("vocab_size") != vocab:
    raise ValueError(f"config.model.pretrain.shape.vocab_size must be {vocab}, the "
                     f"{spec['corpus']!r} corpus's vocabulary, got {spec['shape'].get('vocab_size')}")
  for key in ("steps", "batch_size", "seq_len"):
    if isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1:
      raise ValueError(f"config.model.pretrain.{key} must be a positive integer, got "
                       f"{spec[key]!r}")
  if not spec["lr"] > 0 or not 0 <= spec["warmup"] < spec["steps"]:
    raise ValueError("config.model.pretrain needs lr > 0 and 0 <= warmup < steps, got lr "
                     f"{spec['lr']} and warmup {spec['warmup']}")
  return spec


def cache_path(spec: Mapping[str, Any]) -> str:
  """The folder of the checkpoint `spec` describes: the cache, the corpus and a hash of the spec
  and of the corpus's version (a parser change trains anew)."""
  spec = check_spec(spec)
  key = json.dumps({"spec": spec, "parser": shakespeare.PARSER_VERSION,
                    "plays": shakespeare_lm.PRETRAIN_PLAYS}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  return os.path.join(assets.cache_dir(), "pretrained", f"{spec['corpus']}-llama-{digest}")


def pretrained_decoder(spec: Mapping[str, Any], *, progress: bool = True) -> str:
  """The cached checkpoint folder of `spec`, pretrained first if the cache does not hold it."""
  path = cache_path(spec)
  if os.path.isfile(os.path.join(path, "pretrain.json")):
    return path
  if progress:
    print(f"pretraining the {spec['corpus']} decoder for {spec['steps']} steps (once; cached in "
          f"{path})", file=sys.stderr)
  model, log = train_decoder(check_spec(spec), progress=progress)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  save_pretrained_decoder(model, tmp)
  with open(os.path.join(tmp, "pretrain.json"), "w") as f:
    json.dump(log, f, indent=1)
  try:
    os.replace(tmp, path)
  except OSError:  # another process cached the same spec first: use theirs
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def train_decoder(spec: Mapping[str, Any], *, progress: bool = True
                  ) -> tuple[DecoderLM, dict[str, Any]]:
  """Trains a fresh `DecoderLM` of ``spec["shape"]`` on the corpus; returns it and its log
  (the spec, the training loss every 10 steps, the validation loss and perplexity, seconds)."""
  train_text, valid_text = _corpora()[spec["corpus"]][0]()
  train_ids = text_lib.char_ids(train_text)
  valid_ids, valid_mask = shakespeare_lm.windows(valid_text, spec["seq_len"])
  valid_ids, valid_mask = valid_ids[:VALIDATION_WINDOWS], valid_mask[:VALIDATION_WINDOWS]
  # N(0, 0.02) matrices and unit norm scales, drawn by numpy (`random_decoder`): a jitted
  # module init compiles every random draw separately, seconds even for a tiny model.
  from fedjax_fm.models.builders import random_decoder  # pylint: disable=import-outside-toplevel
  graphdef, params = nnx.split(random_decoder(DecoderConfig(**spec["shape"]), None,
                                              spec["seed"]))
  schedule = optax.warmup_cosine_decay_schedule(0.0, spec["lr"], max(spec["warmup"], 1),
                                                spec["steps"], spec["lr"] * 0.1)
  # No weight decay on norm scales (vectors), as is usual for transformers.
  decay = jax.tree_util.tree_map(lambda x: x.ndim > 1, params)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, b2=0.95, weight_decay=spec["weight_decay"],
                                      mask=decay))
  opt_state = optimizer.init(params)

  def loss_fn(params, ids, mask):
    loss, _ = causal_lm_loss(nnx.merge(graphdef, params), ids, mask,
                             chunk_size=min(spec["seq_len"], 256))
    return jnp.mean(loss)

  @jax.jit
  def step(params, opt_state, ids):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids, jnp.ones_like(ids))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  valid_loss = jax.jit(loss_fn)
  rng = np.random.default_rng(spec["seed"])
  n = spec["seq_len"]
  curve, t0 = [], time.perf_counter()
  bar = tqdm(range(spec["steps"]), desc="pretrain", unit="step", disable=not progress,
             dynamic_ncols=True)
  for i in bar:
    starts = rng.integers(0, len(train_ids) - n, spec["batch_size"])
    ids = np.stack([train_ids[s:s + n] for s in starts])
    params, opt_state, loss = step(params, opt_state, ids)
    if i % 10 == 0 or i == spec["steps"] - 1:
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f"pretraining diverged at step {i} (loss {loss}); lower "
                                 "config.model.pretrain.lr")
      curve.append((i, loss))
      bar.set_postfix(loss=f"{loss:.3f}")
  bar.close()
  valid = float(valid_loss(params, valid_ids, valid_mask))
  log = {"spec": dict(spec), "train_loss": curve, "validation_loss": valid,
         "validation_perplexity": float(np.exp(valid)), "seconds": time.perf_counter() - t0,
         "train_characters": int(len(train_ids)), "validation_windows": int(len(valid_ids))}
  return nnx.merge(graphdef, params), log


def load_config(spec: str):
  """``path/to/config.py[:arg]`` -> the file's ``get_config(arg)``."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file {path!r}")
  module_spec = importlib.util.spec_from_file_location("pretrain_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True,
                      help="a config file (with :variant) whose model.pretrain to train or find")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  if config.model.get("pretrain") is None:
    print(f"error: {args.config} sets no model.pretrain", file=sys.stderr)
    return 2
  path = pretrained_decoder(config.model.pretrain)
  with open(os.path.join(path, "pretrain.json")) as f:
    log = json.load(f)
  print(f"{path}\nvalidation perplexity {log['validation_perplexity']:.3f} "
        f"(loss {log['validation_loss']:.4f}) after {log['spec']['steps']} steps, "
        f"{log['seconds']:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
