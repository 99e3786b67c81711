"""DecoderLM on its own: config parsing, RoPE scaling, padding, scanned compile, remat, LoRA,
roles, the chunked loss and cached generation. Parity with transformers is in
test_decoder_pretrained.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm.models import decoder as decoder_lib
from fedjax_fm.models.decoder import DecoderConfig, DecoderLM
from fedjax_fm.models.decoder_generate import generate
from fedjax_fm.models.decoder_lora import ATTENTION_TARGETS, DECODER_LORA_TARGETS, decoder_roles
from fedjax_fm.models.decoder_loss import IGNORE_INDEX, causal_lm_loss

TINY = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
ALL_LORA = {"rank": 2, "alpha": 4.0, "targets": DECODER_LORA_TARGETS}


def _build(config, seed=0, **kwargs):
  """A model whose backbone is numpy-random and whose LoRA factors (if any) are the module's
  own initialisation. XLA:CPU takes ~0.3 s to compile each threefry draw, so a full random
  init costs seconds even for a tiny model; the jit below returns only the LoRA leaves, so XLA
  drops the backbone's draws."""
  make = lambda: DecoderLM(config, rngs=nnx.Rngs(seed), **kwargs)
  graphdef, shapes = nnx.split(nnx.eval_shape(make))
  shapes = nnx.to_pure_dict(shapes)
  rng = np.random.RandomState(seed)
  fresh = jax.jit(lambda: {p: x for p, x in _paths(nnx.to_pure_dict(nnx.state(make()))).items()
                           if "/lora_" in p})() if kwargs.get("lora") else {}

  def fill(path, x):
    p = roles_lib.leaf_path(path)
    if p in fresh:
      return fresh[p]
    center = 1.0 if p.endswith("/scale") else 0.0  # norm scales around one
    return jnp.asarray(center + 0.1 * rng.standard_normal(x.shape), x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, shapes))


@pytest.fixture(scope="module")
def model():
  return _build(TINY)


@nnx.jit
def forward(model, ids, mask=None):
  return model(ids, mask)


def _ids(b, t, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, TINY.vocab_size, (b, t)))


def _paths(tree):
  return {roles_lib.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_from_hf_reads_both_rope_formats_and_family_defaults():
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4)
  llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16)
  new = DecoderConfig.from_hf({**base, "model_type": "llama",
                               "rope_parameters": {"rope_theta": 5e5, **llama3}})
  old = DecoderConfig.from_hf({**base, "model_type": "llama", "rope_theta": 5e5,
                               "rope_scaling": llama3})
  assert new == old and new.rope_theta == 5e5 and new.rope_scaling.factor == 8.0
  assert (new.num_kv_heads, new.head_dim) == (4, 8)  # transformers' defaults: MHA, hidden/heads
  qwen2 = DecoderConfig.from_hf({**base, "model_type": "qwen2"})
  assert qwen2.attention_bias and not qwen2.attention_out_bias and qwen2.rope_scaling is None
  qwen3 = DecoderConfig.from_hf({**base, "model_type": "qwen3"})
  assert qwen3.qk_norm and qwen3.head_dim == 128  # Qwen3Config's default head_dim
  mistral = DecoderConfig.from_hf({**base, "model_type": "mistral", "num_attention_heads": 16},
                                  remat="full")
  assert (mistral.num_kv_heads, mistral.sliding_window, mistral.remat) == (8, 4096, "full")
  with pytest.raises(ValueError, match="not a supported decoder"):
    DecoderConfig.from_hf({**base, "model_type": "gpt2"})
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    DecoderConfig.from_hf({**base, "model_type": "llama",
                           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_llama3_rope_scaling_by_band():
  # head_dim 8, theta 10: inv_freq 10^(-i/4), wavelengths 2 pi * 10^(i/4) = 6.3, 11.2, 19.9, 35.3.
  # original 16, low 1, high 4: wavelengths > 16 are divided by 8, < 4 kept, between smoothed.
  plain = dataclasses.replace(TINY, rope_theta=10.0)
  scaled = dataclasses.replace(plain, rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16})
  inv, got = decoder_lib.rope_inv_freq(plain), decoder_lib.rope_inv_freq(scaled)
  np.testing.assert_allclose(inv, 10.0 ** (-np.arange(4) / 4), rtol=1e-6)
  np.testing.assert_allclose(got[2:], inv[2:] / 8, rtol=1e-6)
  for i in (0, 1):  # medium band: (1 - s) inv / 8 + s inv, s = (16 / wavelen - 1) / 3
    s = (16 * inv[i] / (2 * np.pi) - 1) / 3
    np.testing.assert_allclose(got[i], (1 - s) * inv[i] / 8 + s * inv[i], rtol=1e-5)


def test_left_and_right_padding_give_the_unpadded_logits(model):
  ids = _ids(1, 6)
  pad = jnp.zeros((1, 3), jnp.int32)
  ones, zeros = jnp.ones((1, 6), jnp.int32), jnp.zeros((1, 3), jnp.int32)
  alone = forward(model, jnp.concatenate([ids, pad], 1), jnp.concatenate([ones, ones[:, :3]],
                                                                          1))[:, :6]
  left = forward(model, jnp.concatenate([pad, ids], 1), jnp.concatenate([zeros, ones], 1))
  right = forward(model, jnp.concatenate([ids, pad], 1), jnp.concatenate([ones, zeros], 1))
  np.testing.assert_allclose(left[:, 3:], alone, atol=1e-5)
  np.testing.assert_allclose(right[:, :6], alone, atol=1e-5)
  assert left.dtype == jnp.float32 and left.shape == (1, 9, TINY.vocab_size)


def test_causal_future_tokens_do_not_change_the_past(model):
  ids = _ids(1, 9)
  changed = ids.at[0, 5:].set((ids[0, 5:] + 1) % TINY.vocab_size)
  out, out_changed = forward(model, ids), forward(model, changed)
  np.testing.assert_allclose(out[:, :5], out_changed[:, :5], atol=1e-6)
  assert not np.allclose(out[:, 5:], out_changed[:, 5:])


def _program_size(num_layers, scan):
  config = dataclasses.replace(TINY, num_layers=num_layers, scan_layers=scan)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
  fwd = lambda s, ids: nnx.merge(graphdef, s)(ids)
  return len(jax.jit(fwd).lower(state, jax.ShapeDtypeStruct((1, 4), jnp.int32)).as_text())


def test_scanned_layers_compile_to_a_program_flat_in_depth():
  scanned_2, scanned_32 = _program_size(2, True), _program_size(32, True)
  assert abs(scanned_32 - scanned_2) < 0.05 * scanned_2, (scanned_2, scanned_32)
  assert _program_size(8, False) > 1.3 * _program_size(2, False)  # unrolled grows with depth


def test_lora_factors_are_fp32_on_a_bf16_backbone():
  config = dataclasses.replace(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  shapes = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0), lora=ALL_LORA))
  paths = _paths(nnx.to_pure_dict(nnx.state(shapes)))
  lora_paths = sorted(p for p in paths if "/lora_" in p)
  assert len(lora_paths) == 2 * len(DECODER_LORA_TARGETS)
  assert paths["layers/attention/lora_q/a"].shape == (2, 32, 2)  # [layers, in, rank]
  assert paths["layers/mlp/lora_down/b"].shape == (2, 2, 32)
  assert all(paths[p].dtype == jnp.float32 for p in lora_paths)
  assert paths["layers/attention/q/kernel"].dtype == jnp.bfloat16


def test_lora_is_zero_at_init_and_every_target_changes_logits(model):
  lora = _build(TINY, lora=ALL_LORA)
  nnx.update(lora, nnx.state(model))  # the fixture's backbone
  ids = _ids(1, 9)
  base_logits = forward(model, ids)
  np.testing.assert_array_equal(forward(lora, ids), base_logits)
  for target in DECODER_LORA_TARGETS:  # each target alone moves the logits once B != 0
    m = nnx.clone(lora)
    module = getattr(m.layers.attention if target in ATTENTION_TARGETS else m.layers.mlp,
                     f"lora_{target}")
    module.b[...] = jnp.ones_like(module.b[...])
    assert not np.allclose(forward(m, ids), base_logits), target


def test_roles_cover_every_leaf_and_pick_personal_lora_by_target():
  m = nnx.eval_shape(lambda: DecoderLM(TINY, rngs=nnx.Rngs(0),
                                        lora={"rank": 2, "targets": ("q", "v", "down")}))
  params = nnx.to_pure_dict(nnx.state(m))
  roles = _paths(decoder_roles(params, personal=("lora_down",)))
  assert set(roles) == set(_paths(params))
  for path, role in roles.items():
    expected = (roles_lib.PERSONAL if "lora_down" in path else
                roles_lib.SHARED if "/lora_" in path else roles_lib.FROZEN)
    assert role == expected, path
  assert roles["lm_head/kernel"] == roles_lib.FROZEN
  with pytest.raises(ValueError, match="lora_up"):
    decoder_roles(params, personal=("lora_up",))


def _full_logits_loss(logits, labels, mask):
  """The plain cross-entropy on materialised logits [B, T, V], per example."""
  targets = labels[:, 1:]
  w = mask[:, 1:] * mask[:, :-1] * (targets != IGNORE_INDEX)
  logits = logits[:, :-1]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
  acc = jnp.argmax(logits, -1) == targets
  return (nll * w).sum(1) / w.sum(1), (acc * w).sum(1) / w.sum(1)


def test_chunked_loss_equals_full_logits_cross_entropy(model):
  ids = _ids(3, 9, seed=1)
  mask = jnp.asarray([[1] * 9, [0, 0, 0] + [1] * 6, [1] * 7 + [0, 0]])
  labels = ids.at[0, :4].set(IGNORE_INDEX)  # row 0 trains only on its last tokens
  loss, acc = nnx.jit(lambda m: causal_lm_loss(m, ids, mask, labels=labels, chunk_size=3))(model)
  ref_loss, ref_acc = _full_logits_loss(forward(model, ids, mask), labels, mask)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(acc, ref_acc)
  assert loss.shape == (3,) and np.all(loss > 0)


def test_chunked_loss_gradient_with_remat_equals_the_plain_gradient(model):
  # Chunks and layer rematerialisation recompute in the backward pass; the gradient is the same.
  ids = _ids(2, 7, seed=4)
  mask = jnp.asarray([[1] * 7, [0, 0] + [1] * 5])
  graphdef, state = nnx.split(model)

  def chunked(state):
    m = nnx.merge(graphdef, state)
    m.config = dataclasses.replace(m.config, remat="full")
    return causal_lm_loss(m, ids, mask, chunk_size=4)[0].sum()

  def plain(state):
    return _full_logits_loss(nnx.merge(graphdef, state)(ids, mask), ids, mask)[0].sum()

  got, ref = jax.jit(lambda s: (jax.grad(chunked)(s), jax.grad(plain)(s)))(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, ref)
  assert float(jnp.abs(ref["layers"]["mlp"]["down"]["kernel"]).max()) > 0
  policy = jax.make_jaxpr(jax.grad(chunked))(state)
  assert "checkpoint" in str(policy) or "remat" in str(policy)


def test_cached_greedy_generation_equals_recomputing_without_a_cache(model):
  ids = _ids(2, 5, seed=2).at[0, :2].set(0)
  mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  new = generate(model, ids, mask, 6)
  # No cache: the whole sequence again for every token (future slots masked as padding, so
  # one compiled forward serves every step).
  seq = jnp.concatenate([ids, jnp.zeros((2, 6), ids.dtype)], 1)
  m = jnp.concatenate([mask, jnp.zeros((2, 6), mask.dtype)], 1)
  for t in range(5, 11):
    nxt = jnp.argmax(forward(model, seq, m)[:, t - 1], -1)
    seq, m = seq.at[:, t].set(nxt), m.at[:, t].set(1)
  np.testing.assert_array_equal(new, seq[:, 5:])
  assert new.shape == (2, 6) and new.dtype == jnp.int32
  # Top-1 sampling is greedy; an eos pads the rest of its row.
  eos = int(new[0, 1])
  stopped = generate(model, ids, mask, 6, temperature=0.7, top_k=1, rng=jax.random.key(3),
                     eos_token_id=eos, pad_token_id=-1)
  for row in range(2):
    hits = np.flatnonzero(np.asarray(new[row]) == eos)
    end = int(hits[0]) + 1 if hits.size else 6
    np.testing.assert_array_equal(stopped[row, :end], new[row, :end])
    assert np.all(np.asarray(stopped[row, end:]) == -1)
  assert np.any(np.asarray(stopped) == -1)
