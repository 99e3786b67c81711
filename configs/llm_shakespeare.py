"""Federated LoRA fine-tuning of a small Llama on Shakespeare: each client is a character.

Clients are the largest (play, speaker) roles of 30 plays; a client's text is its character's
speeches, the last 20% of them held out (`fedjax_fm.data.shakespeare_lm`). The model is a
Llama-shaped character-level decoder pretrained centrally on 7 other plays first
(``model.pretrain``, `fedjax_fm.pretrain`: minutes, once, cached in the asset cache), so
fine-tuning starts from a model that already writes verse; the federation then trains LoRA on
every projection, the backbone frozen. The metric is per-client perplexity (per character) on
the held-out speeches; every evaluation also writes greedy samples of three characters'
personalized and global models to ``samples.jsonl`` and TensorBoard.

  python -m fedjax_fm.pretrain --config configs/llm_shakespeare.py   # the pretraining alone
  python launch.py --config configs/llm_shakespeare.py               # FedAvg-LoRA
  python launch.py --config configs/llm_shakespeare.py:fedper        # FedPer-LoRA (MLP LoRA personal)
  python launch.py --config configs/llm_shakespeare.py:ffgg          # FFGG (MLP LoRA private)
  python launch.py --config configs/llm_shakespeare.py:local         # every client alone
  python launch.py --config configs/llm_shakespeare.py:fedpft        # FedPFT's sub-FM (FedOT-like)
  python launch.py --config configs/llm_shakespeare.py:feddat        # FedDAT's dual LoRA
  python launch.py --config configs/llm_shakespeare.py:tiny          # seconds, for CI

The argument after the colon is ``tiny`` and/or an algorithm (``fedavg``, ``fedper``, ``ffgg``,
``local``, ``fedpft``, ``feddat``).
"""

import ml_collections
from ml_collections import config_dict

from configs import _algorithms
from fedjax_fm.data.text import CHAR_VOCAB_SIZE

# LoRA kept on the client by FedPer-LoRA and FFGG: the SwiGLU MLP's (attention LoRA is shared).
PERSONAL = "/mlp/lora_"
ALGORITHMS = ("fedavg", "fedper", "ffgg", "local", "fedpft", "feddat")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, name = _algorithms.select(arg, "configs/llm_shakespeare.py",
                                     algorithms=ALGORITHMS)
  name = name or "fedavg"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 20
  c.data = ml_collections.ConfigDict(dict(
      # tokenizer: "chars" (the pretrained model's), or "model" with config.model.path set to a
      # downloaded Llama / Qwen folder (and model.pretrain None): its own tokenizer
      name="shakespeare_lm", empty_clients="error", tokenizer="chars", num_clients=24,
      seq_len=128,
      test_fraction=0.2, max_train_windows=256, max_test_windows=8,
      # generation samples at every evaluation: the first sample_clients clients (the largest
      # roles), prompt_chars characters of a held-out speech, sample_tokens new characters
      sample_clients=3, prompt_chars=40, sample_tokens=80))
  # 0.31M parameters: the size a 2-core CPU pretrains in minutes and fine-tunes 15 runs of.
  shape = dict(vocab_size=CHAR_VOCAB_SIZE, hidden_size=96, intermediate_size=256,
               num_layers=3, num_heads=3, num_kv_heads=1, head_dim=32, rope_theta=10000.0,
               rms_norm_eps=1e-5)
  c.model = ml_collections.ConfigDict(dict(
      name="decoder", path=None, shape=None,
      pretrain=dict(corpus="shakespeare", shape=shape, steps=800, batch_size=16, seq_len=128,
                    lr=3e-3, warmup=50, weight_decay=0.01, seed=0),
      lora=dict(rank=8, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down")),
      trainable=("lora",), personal=(), dtype="float32", param_dtype="float32", remat="none",
      loss_chunk=128))
  common = dict(client_lr=3e-3, client_optimizer="adamw")
  if name == "fedpft":
    # FedPFT's sub-FM (half of every layer's SwiGLU neurons, by weight salience) without the
    # alignments, which the decoder does not support yet: the FedOT-like variant.
    c.algorithm = ml_collections.ConfigDict(dict(name="fedpft", hparams=dict(
        variant="fedot", client_lr=3e-3, keep_neurons=128, retained_layers=(),
        layer_align_steps=0, align_every=0, align_steps=0, align_batch_size=16,
        align_retained_ratio=0.5, align_lr=1e-3, alpha=0.01, product_grad=True,
        active_threshold=1e-2, weighted=True, public_examples=0)))
  elif name == "feddat":
    # FedDAT's dual LoRA (client A_c, global A_s, frozen copy) with per-token mutual
    # distillation on the logits (algorithms/feddat_decoder.py); the paper's temperature 3.
    c.algorithm = ml_collections.ConfigDict(dict(name="feddat", hparams=dict(
        client_lr=3e-3, teacher_weights=(0.5, 0.5), temperature=3.0, distill="softmax_tokens",
        mutual_distillation=True, weighted=True)))
  elif name in ("fedper", "ffgg"):
    overrides = dict(personal=PERSONAL)
    if name == "ffgg":  # private MLP LoRA by Adam-free SGD steps, then a shared step
      overrides.update(personal_lr=0.3, personal_steps=4, local_steps=4, local_lr=0.3)
    c.algorithm = _algorithms.algorithm(name, common=common, **overrides)
  else:
    c.algorithm = _algorithms.algorithm(name, common=common)
  c.cohort_size = 8
  c.batch_size = 4
  c.local_steps = 4
  c.local_epochs = config_dict.placeholder(int)
  c.eval_every = 5
  c.checkpoint_every = 20
  c.keep_checkpoints = 2
  c.max_bad_rounds = 3
  c.mesh = (("clients", -1),)
  c.execution = ml_collections.ConfigDict(dict(strategy="vmap", chunk_size=8, scan_unroll=1))
  c.aggregation = _algorithms.aggregation()
  c.privacy = _algorithms.privacy()
  if variant == "tiny":
    c.rounds = 2
    c.eval_every = 2
    c.data.update(num_clients=4, seq_len=32, max_train_windows=16, max_test_windows=2,
                  sample_clients=1, prompt_chars=8, sample_tokens=8)
    c.model.pretrain.update(steps=4, batch_size=4, seq_len=32, warmup=1,
                            shape=dict(shape, hidden_size=32, intermediate_size=64, num_layers=2,
                                       num_heads=2, num_kv_heads=1, head_dim=16))
    c.model.lora.rank = 2
    c.model.loss_chunk = 32
    c.cohort_size = 2
    c.batch_size = 2
    c.local_steps = 2
    if name == "fedpft":
      c.algorithm.hparams.keep_neurons = 32
  return c
