"""Hugging Face checkpoints: parity with transformers' PyTorch models (torch CPU, eval mode).

Tiny random BERT, RoBERTa, ViT and ViLT models are saved with save_pretrained and loaded with
`from_pretrained`; their last hidden states must agree to 1e-5. The real all-MiniLM-L6-v2
(sentence-transformers) is checked on English sentences with its own tokenizer. Broken
checkpoints must fail with the missing / unexpected / mismatched keys named.
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from fedjax_fm import assets
from fedjax_fm import roles as roles_lib
from fedjax_fm.models import from_pretrained, functional, heads, transformer_roles

TOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
TEXT_TINY = dict(TINY, vocab_size=99, max_position_embeddings=24)
IMAGE_TINY = dict(TINY, image_size=8, patch_size=4, num_channels=3)


def _save(model, path):
  """Saves `model` with every weight redrawn at std 0.2: with BERT's 0.02 init the sublayers
  barely move the residual stream, and a wrong attention or FFN could hide behind LayerNorm."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.eval().save_pretrained(path)
  return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """name -> (folder, the PyTorch reference model) for tiny random BERT, RoBERTa, ViT, ViLT."""
  root = tmp_path_factory.mktemp("hf")
  configs = {
      "bert": transformers.BertConfig(**TEXT_TINY),
      "roberta": transformers.RobertaConfig(**TEXT_TINY, pad_token_id=1),
      "vit": transformers.ViTConfig(**IMAGE_TINY),
      "vilt": transformers.ViltConfig(**{**TEXT_TINY, **IMAGE_TINY}, max_image_length=-1),
  }
  out = {}
  for name, config in configs.items():
    torch.manual_seed(0)
    path = str(root / name)
    out[name] = (path, _save(transformers.AutoModel.from_config(config), path))
  return out


def _text_batch(pad_id):
  """Three sequences of lengths 7, 5 and 2, padded to 7 with `pad_id`."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, (3, 7))
  mask = np.ones((3, 7), np.int64)
  mask[1, 5:] = 0
  mask[2, 2:] = 0
  ids[mask == 0] = pad_id
  token_types = rng.integers(0, 2, (3, 7))
  token_types[mask == 0] = 0
  return ids, mask, token_types


def _images(n):
  return np.random.default_rng(1).normal(size=(n, 3, 8, 8)).astype(np.float32)  # NCHW, as HF


def _ours(model, **inputs):
  graphdef, params = functional(model)
  inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
  return np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(**x))(params, inputs))


@pytest.mark.parametrize("name,pad_id", [("bert", 0), ("roberta", 1)])
def test_text_parity_with_padding(tiny, name, pad_id):
  path, reference = tiny[name]
  ids, mask, token_types = _text_batch(pad_id)
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(token_types)).last_hidden_state.numpy()
  got = _ours(from_pretrained(path), input_ids=ids, attention_mask=mask,
              token_type_ids=token_types)
  assert got.shape == expected.shape == (3, 7, 32)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_vit_parity_nhwc(tiny):
  path, reference = tiny["vit"]
  pixels = _images(2)
  with torch.no_grad():
    expected = reference(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
  got = _ours(from_pretrained(path), pixel_values=pixels.transpose(0, 2, 3, 1))  # NCHW -> NHWC
  assert got.shape == expected.shape == (2, 1 + 4, 32)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_vilt_parity(tiny, monkeypatch):
  path, reference = tiny["vilt"]
  # ViLT samples which image patches to keep with torch.multinomial, even in eval mode; keeping
  # all of them it only permutes their order. Fix that order to the patch grid's, ours.
  monkeypatch.setattr(torch, "multinomial",
                      lambda weights, n, replacement=False: torch.arange(n))
  ids, mask, token_types = _text_batch(0)
  pixels = _images(3)
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(token_types),
                         pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
  got = _ours(from_pretrained(path), input_ids=ids, attention_mask=mask,
              token_type_ids=token_types, pixel_values=pixels.transpose(0, 2, 3, 1))
  assert got.shape == expected.shape == (3, 7 + 1 + 4, 32)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_task_checkpoint_loads_its_encoder(tmp_path):
  # BertForSequenceClassification nests the encoder under 'bert.' next to its classifier.
  torch.manual_seed(0)
  config = transformers.BertConfig(**TEXT_TINY, num_labels=3)
  reference = _save(transformers.BertForSequenceClassification(config), str(tmp_path))
  ids, mask, token_types = _text_batch(0)
  with torch.no_grad():
    expected = reference.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                              token_type_ids=torch.tensor(token_types)).last_hidden_state.numpy()
  got = _ours(from_pretrained(str(tmp_path)), input_ids=ids, attention_mask=mask,
              token_type_ids=token_types)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_bfloat16_checkpoint(tiny, tmp_path):
  # Stored in bf16 (numpy's safetensors API cannot read it); computed in float32 by both sides.
  _, reference = tiny["bert"]
  copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(str(tmp_path))  # fixture unchanged
  rounded = transformers.AutoModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  ids, mask, token_types = _text_batch(0)
  with torch.no_grad():
    expected = rounded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(token_types)).last_hidden_state.numpy()
  got = _ours(from_pretrained(str(tmp_path)), input_ids=ids, attention_mask=mask,
              token_type_ids=token_types)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Federated learning trains a shared model without collecting the data.",
    "Hello!",
    "A man is playing a guitar on a small stage while the audience sings along loudly.",
    "Paris is the capital of France.",
]


def test_real_minilm_parity_and_sentence_embeddings():
  path = assets.path("all-minilm-l6-v2", download=True)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # real padding
  reference = transformers.AutoModel.from_pretrained(path).eval()
  with torch.no_grad():
    expected = reference(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
  expected = expected.numpy()
  got = _ours(from_pretrained(path), **batch)
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(got[real], expected[real], atol=TOL, rtol=0)
  # Padded positions (outputs nobody uses) carry more float32 rounding in *both* libraries:
  # measured against transformers in float64 there, torch float32 is off by 3.2e-5 and we are off
  # by 1.6e-5, so the two float32 results differ by up to ~2.3e-5. Real tokens: ~2.4e-6.
  np.testing.assert_allclose(got[~real], expected[~real], atol=1e-4, rtol=0)
  # sentence-transformers' embedding: attention-mask-weighted mean of the last hidden state.
  mask = jnp.asarray(batch["attention_mask"])
  ours = np.asarray(heads.pool(jnp.asarray(got), mask, "mean"), np.float64)
  theirs = np.asarray(heads.pool(jnp.asarray(expected), mask, "mean"), np.float64)
  cos = np.sum(ours * theirs, 1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
  assert np.all(1.0 - cos <= 1e-6), 1.0 - cos
  # And the embeddings mean something: the two unrelated short sentences are not near-duplicates.
  unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
  assert unit[0] @ unit[4] < 0.5


def test_adapters_lora_and_head_on_top_start_as_the_backbone(tiny):
  path, reference = tiny["bert"]
  ids, mask, token_types = _text_batch(0)
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(token_types)).last_hidden_state.numpy()
  plain = from_pretrained(path)
  adapted = from_pretrained(path, adapters={"names": ("personal", "shared"), "bottleneck": 8},
                            lora={"rank": 2, "alpha": 4.0, "targets": ("q", "v")},
                            head={"kind": "classification", "num_classes": 3, "pooling": "mean"})
  graphdef, params = functional(adapted)

  @jax.jit
  def hidden_and_logits(p):
    model = nnx.merge(graphdef, p)
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(token_types))
    return model.features(*args)[0], model(*args)

  hidden, logits = hidden_and_logits(params)
  np.testing.assert_allclose(hidden, expected, atol=TOL, rtol=0)
  assert logits.shape == (3, 3)
  roles = transformer_roles(params, personal=("adapters/personal",))
  by_role = {r: roles_lib.count(roles, params, r) for r in roles_lib.ROLES}
  # The backbone (all of it) is frozen: exactly the plain model's parameter count.
  assert by_role[roles_lib.FROZEN] == sum(x.size for x in jax.tree_util.tree_leaves(
      functional(plain)[1]))
  # Per layer: 2 adapters x (32*8 + 8 + 8*32 + 32) = 1104, LoRA q,v: 2 x (32*2 + 2*32) = 256;
  # 2 layers; head 32*3 + 3 = 99. Personal = one adapter: 2 layers x 552.
  assert by_role[roles_lib.PERSONAL] == 2 * 552
  assert by_role[roles_lib.SHARED] == 2 * (552 + 256) + 99


def _broken_copy(tiny, tmp_path, edit_tensors=None, edit_config=None):
  src, _ = tiny["bert"]
  dst = str(tmp_path / "broken")
  shutil.copytree(src, dst)
  if edit_tensors:
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit_tensors(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
  if edit_config:
    with open(os.path.join(dst, "config.json")) as f:
      config = json.load(f)
    edit_config(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(config, f)
  return dst


def test_missing_and_unexpected_keys_are_named(tiny, tmp_path):
  def edit(tensors):
    del tensors["encoder.layer.1.output.dense.bias"]
    tensors["encoder.layer.1.output.extra.weight"] = np.zeros((2, 2), np.float32)

  path = _broken_copy(tiny, tmp_path, edit_tensors=edit)
  with pytest.raises(ValueError) as err:
    from_pretrained(path)
  message = str(err.value)
  assert "missing keys [encoder.layer.1.output.dense.bias]" in message
  assert "unexpected keys [encoder.layer.1.output.extra.weight]" in message
  assert "shape mismatches []" in message


def test_shape_mismatches_are_named(tiny, tmp_path):
  path = _broken_copy(tiny, tmp_path, edit_config=lambda c: c.update(intermediate_size=40))
  with pytest.raises(ValueError, match=r"intermediate\.dense\.weight \(37, 32\) vs model "
                                       r"encoder/layers/0/mlp/fc_in/kernel \(32, 40\)"):
    from_pretrained(path)


def test_missing_files_and_unsupported_models(tiny, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_pretrained(str(tmp_path))
  path = _broken_copy(tiny, tmp_path)
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    from_pretrained(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "gpt2"}, f)
  with pytest.raises(ValueError, match="model_type 'gpt2'.*not supported"):
    from_pretrained(path)
