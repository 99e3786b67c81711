"""The real all-MiniLM-L6-v2 (a text BERT) as a ViLT-style vision-language model for small images.

`from_pretrained(path, image=...)` keeps MiniLM's text embeddings and encoder and adds new image
tokens (`ImageTokenEmbeddings`, roles component ``image_embeddings``). Checked on digit-VQA
inputs (8x8x1 digits, MiniLM-tokenized questions of length 32): the output layout, that the
checkpoint weights are the text model's, that the roles train the new image tokens and freeze
the backbone, and that a loss reaches every new image parameter through the frozen encoder.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_fm import assets
from fedjax_fm import roles as roles_lib
from fedjax_fm.data import text as text_lib
from fedjax_fm.data.digits import load_digits_arrays
from fedjax_fm.models import from_pretrained, functional, heads, transformer_roles
from fedjax_fm.models.transformer import parameter_component

IMAGE = dict(image_size=8, patch_size=2, num_channels=1)
NUM_ANSWERS = 12  # suite.VQA_ANSWERS: "0".."9", "yes", "no"
QUESTIONS = ["which digit is this?", "is it even?", "is it greater than five?", "is it a prime?"]
HIDDEN = 384


def _paths(params):
  return {roles_lib.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def minilm():
  path = assets.path("all-minilm-l6-v2")
  plain = from_pretrained(path)
  vision = from_pretrained(path, image=IMAGE, head={"kind": "answer_scoring",
                                                    "num_answers": NUM_ANSWERS})
  return path, plain, vision


@pytest.fixture(scope="module")
def batch():
  """Four digit-VQA examples: digits 0..3, one question family each."""
  digits = load_digits_arrays()
  encoded = text_lib.minilm_tokenizer(32).encode(QUESTIONS)
  return {"input_ids": jnp.asarray(encoded["input_ids"]),
          "attention_mask": jnp.asarray(encoded["attention_mask"]),
          "pixel_values": jnp.asarray(digits["x"][:4])}


def test_layout_text_then_image_cls_then_patches(minilm, batch):
  _, _, vision = minilm
  graphdef, params = functional(vision)

  @jax.jit
  def run(p, x):
    model = nnx.merge(graphdef, p)
    return model.features(**x), model(**x)

  (hidden, mask), logits = run(params, batch)
  assert hidden.shape == (4, 32 + 1 + 16, HIDDEN)
  assert logits.shape == (4, NUM_ANSWERS)
  assert np.all(np.isfinite(hidden)) and np.all(np.isfinite(logits))
  np.testing.assert_array_equal(mask[:, :32], batch["attention_mask"])
  np.testing.assert_array_equal(mask[:, 32:], 1)  # every image token is real
  # The text tokens see the image: another digit changes the question's CLS state.
  other = dict(batch, pixel_values=batch["pixel_values"][::-1])
  (hidden_other, _), _ = run(params, other)
  assert np.max(np.abs(hidden_other[:, 0] - hidden[:, 0])) > 1e-3


def test_text_weights_are_the_checkpoints(minilm):
  _, plain, vision = minilm
  ours, text = _paths(functional(vision)[1]), _paths(functional(plain)[1])
  extra = {p for p in ours if p not in text}
  assert {p for p in extra if not p.startswith("head/")} == {
      "image_embeddings/patches/projection/kernel", "image_embeddings/patches/projection/bias",
      "image_embeddings/patches/cls", "image_embeddings/patches/position",
      "image_embeddings/modality/embedding", "image_embeddings/norm/scale",
      "image_embeddings/norm/bias"}
  assert set(text) <= set(ours)  # embeddings/word, ..., encoder/...: the text model's paths
  for path, value in text.items():
    np.testing.assert_array_equal(ours[path], value, err_msg=path)
  assert ours["image_embeddings/patches/projection/kernel"].shape == (2 * 2 * 1, HIDDEN)
  assert ours["image_embeddings/patches/position"].shape == (1 + 16, HIDDEN)


def test_roles_train_the_new_image_tokens_and_freeze_the_backbone(minilm):
  _, plain, vision = minilm
  _, params = functional(vision)
  roles = transformer_roles(params)
  by_component = {}
  for path, role in zip(_paths(params), jax.tree_util.tree_leaves(roles)):
    by_component.setdefault(parameter_component(path), set()).add(role)
  assert by_component == {"backbone": {roles_lib.FROZEN}, "head": {roles_lib.SHARED},
                          "image_embeddings": {roles_lib.SHARED}}
  frozen = roles_lib.count(roles, params, roles_lib.FROZEN)
  assert frozen == sum(x.size for x in jax.tree_util.tree_leaves(functional(plain)[1]))
  # projection 4*384 + 384, cls 384, positions 17*384, modality 2*384, norm 2*384; the head
  # 384*768 + 768 + 2*768 + 768*12 + 12.
  image = (4 + 1 + 1 + 17 + 2 + 2) * HIDDEN
  head = HIDDEN * 768 + 768 + 2 * 768 + 768 * NUM_ANSWERS + NUM_ANSWERS
  assert roles_lib.count(roles, params, roles_lib.SHARED) == image + head
  # Named explicitly it can be personal; an explicit list without it leaves it frozen.
  personal = transformer_roles(params, trainable=("head",), personal=("image_embeddings",))
  assert roles_lib.count(personal, params, roles_lib.PERSONAL) == image


def test_loss_gradient_reaches_every_image_parameter(minilm, batch):
  _, _, vision = minilm
  graphdef, params = functional(vision)
  paths = _paths(params)
  is_image = lambda path, _: parameter_component(roles_lib.leaf_path(path)) == "image_embeddings"
  mask = jax.tree_util.tree_map_with_path(is_image, params)
  targets = jax.nn.one_hot(jnp.array([0, 11, 11, 10]), NUM_ANSWERS)  # "0", no, no, yes

  @jax.jit
  def grads(p):
    def loss(trained):
      merged = jax.tree_util.tree_map(lambda m, t, f: t if m else f, mask, trained, p)
      logits = nnx.merge(graphdef, merged)(**batch)
      return jnp.mean(heads.soft_target_bce(logits, targets))
    return jax.grad(loss)(p)

  g = _paths(grads(params))
  image_paths = [p for p in paths if p.startswith("image_embeddings/")]
  assert len(image_paths) == 7
  for path in image_paths:
    assert np.all(np.isfinite(g[path])), path
    assert np.max(np.abs(g[path])) > 0, path
  # Both rows of the modality table (text and image) get a gradient.
  assert np.all(np.max(np.abs(g["image_embeddings/modality/embedding"]), axis=1) > 0)


def test_image_option_errors(minilm):
  path, _, _ = minilm
  with pytest.raises(ValueError, match="give image_size and patch_size"):
    from_pretrained(path, image={"image_size": 8})
  with pytest.raises(ValueError, match=r"unknown fields \['channels'\]"):
    from_pretrained(path, image=dict(IMAGE, channels=1))
  with pytest.raises(ValueError, match="divisible by patch_size"):
    from_pretrained(path, image=dict(IMAGE, patch_size=3))
