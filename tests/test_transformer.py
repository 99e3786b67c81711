"""The NNX transformer: masks, dropout, adapters (mixed), LoRA, heads, roles, and vmap over
clients' trainable parameters with one closed-over frozen backbone. Tiny configs, CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_fm import roles as roles_lib
from fedjax_fm.models import activations, adapters, embedders, heads, transformer
from fedjax_fm.models import (AdapterConfig, LoRAConfig, TransformerConfig, TransformerModel,
                              functional, transformer_roles)

# One layer keeps XLA:CPU compile times (the bulk of this file's run time) small; the layer loop
# itself is covered by the two-layer parity tests in test_pretrained.py.
TEXT = TransformerConfig(hidden_size=16, num_layers=1, num_heads=4, intermediate_size=24,
                         vocab_size=40, max_position_embeddings=16, hidden_dropout=0.1,
                         attention_dropout=0.1)
IMAGE = TransformerConfig(hidden_size=16, num_layers=1, num_heads=4, intermediate_size=24,
                          modality="image", image_size=8, patch_size=4, num_channels=3,
                          pre_norm=True)
VILT = TransformerConfig(hidden_size=16, num_layers=1, num_heads=4, intermediate_size=24,
                         modality="vision_text", vocab_size=40, image_size=8, patch_size=4,
                         pre_norm=True)
FEDDAT = AdapterConfig(names=("personal", "shared", "frozen"), bottleneck=4)

IDS = jnp.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
MASK = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _jit(model):
  """model's call, jitted once per model (eager op-by-op dispatch is slower on XLA:CPU)."""
  graphdef, params = functional(model)
  call = jax.jit(lambda p, args, kwargs: nnx.merge(graphdef, p)(*args, **kwargs))
  return lambda *args, **kwargs: call(params, args, kwargs)


def _paths(params):
  return [roles_lib.leaf_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def _randomize(params, pattern, seed=1, scale=0.3):
  """Gives every leaf whose path contains `pattern` random values (e.g. zero-init up-projs).

  numpy, not jax.random: eager jax ops compile once per new shape, which costs seconds here.
  """
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype)
      if pattern in roles_lib.leaf_path(path) else x, params)


def _drop_subtrees(tree, name):
  """The pure dict without any sub-dict keyed `name` (to compare a model with and without)."""
  if not isinstance(tree, dict):
    return tree
  return {k: _drop_subtrees(v, name) for k, v in tree.items() if k != name}


# --- core ----------------------------------------------------------------------------------


def test_activations_by_hf_name():
  # Exact GELU(1) = Phi(1) = 0.8413447; the tanh form gives 0.8411920: they must differ.
  np.testing.assert_allclose(activations.activation("gelu")(jnp.array(1.0)), 0.8413447,
                             rtol=1e-6)
  np.testing.assert_allclose(activations.activation("gelu_new")(jnp.array(1.0)), 0.8411920,
                             rtol=1e-6)
  np.testing.assert_allclose(activations.activation("quick_gelu")(jnp.array(1.0)),
                             1.0 / (1.0 + np.exp(-1.702)), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown activation"):
    activations.activation("gelu_banana")


def test_padding_bias_is_additive_and_finite():
  bias = transformer.padding_bias(jnp.array([[1, 0]]))
  assert bias.shape == (1, 1, 1, 2)
  assert bias[0, 0, 0, 0] == 0.0 and bias[0, 0, 0, 1] == jnp.finfo(jnp.float32).min
  # A row whose keys are all padding stays finite (uniform) rather than NaN.
  probs = jax.nn.softmax(jnp.zeros((2,)) + transformer.padding_bias(jnp.array([[0, 0]]))[0, 0, 0])
  np.testing.assert_allclose(probs, [0.5, 0.5])


def test_padding_does_not_leak_into_real_tokens():
  model = _jit(TransformerModel(TEXT, rngs=nnx.Rngs(0)))
  # One batch (rows are independent): the original, other ids in the padded slots, no mask.
  ids = jnp.concatenate([IDS, IDS.at[1, 3:].set(33), IDS])
  mask = jnp.concatenate([MASK, MASK, jnp.ones_like(MASK)])
  out = model(ids, mask)
  assert out.shape == (6, 5, 16)
  np.testing.assert_allclose(out[3, :3], out[1, :3], atol=1e-6)
  # Without the mask the padded tokens are attended to, so the real tokens' outputs change.
  assert np.abs(np.asarray(out[5, :3] - out[1, :3])).max() > 1e-3


def _reference_layer(p, x, mask, pre_norm, heads=4, eps=1e-12):
  """One encoder layer in numpy, written from the BERT / ViT papers' equations."""
  from scipy.special import erf
  ln = lambda y, q: (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + eps) \
      * q["scale"] + q["bias"]
  dense = lambda y, q: y @ q["kernel"] + q["bias"]
  gelu = lambda y: 0.5 * y * (1.0 + erf(y / np.sqrt(2.0)))

  def attention(y):
    b, t, d = y.shape
    split = lambda z: z.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)
    q, k, v = (split(dense(y, p["attention"][n])) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    scores = np.where(mask[:, None, None, :] > 0, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return dense(ctx, p["attention"]["out"])

  ffn = lambda y: dense(gelu(dense(y, p["mlp"]["fc_in"])), p["mlp"]["fc_out"])
  if pre_norm:
    x = x + attention(ln(x, p["attention_norm"]))
    return x + ffn(ln(x, p["mlp_norm"]))
  x = ln(x + attention(x), p["attention_norm"])
  return ln(x + ffn(x), p["mlp_norm"])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_layer_matches_the_equations(pre_norm):
  config = dataclasses.replace(TEXT, pre_norm=pre_norm)
  layer = transformer.EncoderLayer(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  # Large random values everywhere (fresh LayerNorms are the identity affine; test them too).
  params = _randomize(nnx.to_pure_dict(state), "", scale=0.5)
  layer = nnx.merge(graphdef, params)
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 16)))
  mask = np.asarray(MASK)
  expected = _reference_layer(jax.tree_util.tree_map(np.asarray, params), x, mask, pre_norm)
  got = layer(jnp.asarray(x), transformer.padding_bias(jnp.asarray(mask)))
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_pre_ln_adds_a_final_layer_norm():
  post = TransformerModel(TEXT, rngs=nnx.Rngs(0))
  pre = TransformerModel(dataclasses.replace(TEXT, pre_norm=True), rngs=nnx.Rngs(0))
  assert _paths(functional(pre)[1]) == sorted(
      _paths(functional(post)[1]) + ["encoder/final_norm/bias", "encoder/final_norm/scale"])


def test_dropout_only_with_an_rng():
  model = _jit(TransformerModel(TEXT, rngs=nnx.Rngs(0)))
  eval_a, eval_b = model(IDS, MASK), model(IDS, MASK)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model(IDS, MASK, rng=jax.random.key(1))
  train_b = model(IDS, MASK, rng=jax.random.key(1))
  train_c = model(IDS, MASK, rng=jax.random.key(2))
  np.testing.assert_array_equal(train_a, train_b)
  assert np.abs(np.asarray(train_a - eval_a)).max() > 1e-3
  assert np.abs(np.asarray(train_a - train_c)).max() > 1e-3
  no_dropout = _jit(TransformerModel(dataclasses.replace(TEXT, hidden_dropout=0.0,
                                                         attention_dropout=0.0),
                                     rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(no_dropout(IDS, MASK, rng=jax.random.key(1)), eval_a, atol=1e-6)


def test_roberta_position_ids_skip_padding():
  # pad id 1: real tokens count 2, 3, ...; padding keeps 1 (fairseq's make_positions).
  ids = jnp.array([[0, 5, 6, 2, 1, 1]])
  np.testing.assert_array_equal(embedders.roberta_position_ids(ids, 1), [[2, 3, 4, 5, 1, 1]])


def test_image_and_vision_text_shapes_and_layout_error():
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  vit = _jit(TransformerModel(IMAGE, rngs=nnx.Rngs(0)))
  assert vit(pixel_values=images).shape == (2, 1 + 4, 16)
  with pytest.raises(ValueError, match="NHWC"):
    vit(pixel_values=images.transpose(0, 3, 1, 2))
  with pytest.raises(ValueError, match="pixel_values only"):
    vit(IDS, pixel_values=images)
  vilt = TransformerModel(VILT, rngs=nnx.Rngs(0))
  graphdef, params = functional(vilt)
  hidden, mask = jax.jit(lambda p: nnx.merge(graphdef, p).features(
      IDS, MASK, pixel_values=images))(params)
  assert hidden.shape == (2, 5 + 1 + 4, 16)
  np.testing.assert_array_equal(mask[:, :5], MASK)
  np.testing.assert_array_equal(mask[:, 5:], 1)
  with pytest.raises(ValueError, match="needs pixel_values"):
    vilt(IDS, MASK)


def test_patch_projection_is_a_strided_convolution():
  patches = embedders.PatchEmbeddings(8, 4, 3, 16, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  kernel = patches.projection.kernel[...].reshape(4, 4, 3, 16)  # (row, col, channel) -> HWIO
  conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  expected = conv.reshape(2, 4, 16) + patches.projection.bias[...]
  np.testing.assert_allclose(patches.projection(patches.patches(images)), expected, atol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match="divisible by num_heads"):
    TransformerConfig(hidden_size=10, num_layers=1, num_heads=4, intermediate_size=8,
                      vocab_size=5)
  with pytest.raises(ValueError, match="image_size"):
    TransformerConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                      modality="image", image_size=10, patch_size=4)
  with pytest.raises(ValueError, match="unknown modality"):
    TransformerConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                      modality="audio", vocab_size=5)


# --- adapters -------------------------------------------------------------------------------


def _hand_adapter(down, up):
  adapter = adapters.BottleneckAdapter(2, 1, jax.nn.relu, rngs=nnx.Rngs(0))
  adapter.down.kernel[...] = jnp.array(down, jnp.float32)
  adapter.up.kernel[...] = jnp.array(up, jnp.float32)
  return adapter


def test_mix_adapters_by_hand():
  # a: down [[1],[1]], up [[2,-1]]: h = [1,2] -> 3 -> relu 3 -> delta [6,-3] -> out [7,-1]
  # b: down [[1],[0]], up [[1, 1]]: h = [1,2] -> 1 -> delta [1, 1] -> out [2, 3]
  bank = {"a": _hand_adapter([[1.0], [1.0]], [[2.0, -1.0]]),
          "b": _hand_adapter([[1.0], [0.0]], [[1.0, 1.0]])}
  h = jnp.array([[1.0, 2.0]])
  mix = lambda w: adapters.mix_adapters(bank, h, w)
  np.testing.assert_allclose(bank["a"](h), [[7.0, -1.0]])
  np.testing.assert_allclose(mix({"a": 0.5, "b": 0.5}), [[4.5, 1.0]])  # 0.5*[7,-1]+0.5*[2,3]
  np.testing.assert_allclose(mix({"a": 0.0, "b": 1.0}), [[2.0, 3.0]])
  np.testing.assert_allclose(mix({"b": 1.0}), [[2.0, 3.0]])               # left out = 0
  np.testing.assert_allclose(mix({"a": 0.0, "b": 0.0}), h)                 # all off = identity
  np.testing.assert_allclose(mix(None), [[4.5, 1.0]])                      # uniform
  with pytest.raises(ValueError, match="does not have"):
    mix({"c": 1.0})


def test_fresh_adapters_are_the_identity():
  with_adapters = TransformerModel(TEXT, rngs=nnx.Rngs(0), adapters=FEDDAT)
  plain = TransformerModel(TEXT, rngs=nnx.Rngs(0))
  g_plain, _ = functional(plain)
  _, params = functional(with_adapters)
  plain = _jit(nnx.merge(g_plain, _drop_subtrees(params, "adapters")))
  with_adapters = _jit(with_adapters)
  # Same keys every time, so the jitted call compiles once.
  for weights in ({"personal": 1 / 3, "shared": 1 / 3, "frozen": 1 / 3},
                  {"personal": 0.5, "shared": 0.5, "frozen": 0.0},
                  {"personal": 0.0, "shared": 0.0, "frozen": 1.0}):
    np.testing.assert_allclose(with_adapters(IDS, MASK, adapter_weights=weights),
                               plain(IDS, MASK), atol=1e-6)


def test_adapter_weights_change_per_call_without_recompiling():
  model = TransformerModel(TEXT, rngs=nnx.Rngs(0), adapters=FEDDAT)
  graphdef, params = functional(model)
  params = _randomize(params, "/adapters/")

  @jax.jit
  def forward(params, weights):
    return nnx.merge(graphdef, params)(IDS, MASK, adapter_weights=weights)

  w = lambda p, s, f: {"personal": jnp.float32(p), "shared": jnp.float32(s),
                       "frozen": jnp.float32(f)}
  half, shared_only, frozen_only = (forward(params, w(0.5, 0.5, 0.0)),
                                    forward(params, w(0.0, 1.0, 0.0)),
                                    forward(params, w(0.0, 0.0, 1.0)))
  assert forward._cache_size() == 1
  assert np.abs(np.asarray(half - shared_only)).max() > 1e-3
  assert np.abs(np.asarray(shared_only - frozen_only)).max() > 1e-3
  # Python weights give the same function (a 0 skips the adapter entirely).
  eager = nnx.merge(graphdef, params)(IDS, MASK,
                                      adapter_weights={"shared": 1.0, "personal": 0, "frozen": 0})
  np.testing.assert_allclose(eager, shared_only, atol=1e-5)
  with pytest.raises(ValueError, match="does not have"):
    model(IDS, MASK, adapter_weights={"global": 1.0})
  with pytest.raises(ValueError, match="no adapters"):
    TransformerModel(TEXT, rngs=nnx.Rngs(0))(IDS, MASK, adapter_weights={"shared": 1.0})


# --- LoRA -----------------------------------------------------------------------------------


def test_lora_branch_by_hand():
  # in 2, out 2, r 1, alpha 2 -> scale 2; a = [[1],[1]], b = [[1, 1]]; x = [1, 2]:
  # x a = 3, (x a) b = [3, 3], times 2 = [6, 6].
  lora = adapters.LoRA(2, 2, 1, 2.0, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(lora.b[...], 0.0)
  lora.a[...] = jnp.ones((2, 1))
  lora.b[...] = jnp.ones((1, 2))
  np.testing.assert_allclose(lora(jnp.array([1.0, 2.0])), [6.0, 6.0])


def test_lora_on_every_target_starts_at_identity_and_trains_b():
  config = LoRAConfig(rank=2, alpha=4.0, targets=adapters.LORA_TARGETS)
  model = TransformerModel(TEXT, rngs=nnx.Rngs(0), lora=config)
  graphdef, params = functional(model)
  lora_paths = [p for p in _paths(params) if "/lora_" in p]
  for target in adapters.LORA_TARGETS:
    assert f"encoder/layers/0/{'mlp' if 'ffn' in target else 'attention'}/lora_{target}/b" \
        in lora_paths
  plain = TransformerModel(TEXT, rngs=nnx.Rngs(0))
  g_plain, _ = functional(plain)
  strip = lambda t: {k: strip(v) for k, v in t.items() if not str(k).startswith("lora_")} \
      if isinstance(t, dict) else t
  roles = transformer_roles(params, trainable=("lora",))
  trainable = roles_lib.select(params, roles, roles_lib.SHARED)
  frozen = roles_lib.select(params, roles, roles_lib.FROZEN)
  loss = lambda t: jnp.sum(nnx.merge(graphdef, roles_lib.merge(t, frozen))(IDS, MASK) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
  # B = 0: the adapted model computes what the plain backbone computes.
  np.testing.assert_allclose(value, jnp.sum(_jit(nnx.merge(g_plain, strip(params)))(IDS, MASK)
                                            ** 2), rtol=1e-5)
  grads = _flat(grads)
  # B = 0 at init: dL/dB = (x A)^T dL/dy is non-zero, dL/dA = x^T dL/dy B^T is exactly zero.
  assert all(np.abs(g).max() > 0 for p, g in grads.items() if p.endswith("/b"))
  assert all(np.abs(g).max() == 0 for p, g in grads.items() if p.endswith("/a"))
  with pytest.raises(ValueError, match="subset"):
    LoRAConfig(targets=("q", "gate"))


def _flat(tree):
  return {roles_lib.leaf_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# --- heads ----------------------------------------------------------------------------------


def test_pooling_by_hand():
  hidden = jnp.array([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
  mask = jnp.array([[1, 1, 0]])
  np.testing.assert_allclose(heads.pool(hidden, mask, "cls"), [[1.0, 0.0]])
  np.testing.assert_allclose(heads.pool(hidden, mask, "mean"), [[2.0, 1.0]])  # padding ignored
  with pytest.raises(ValueError, match="unknown pooling"):
    heads.pool(hidden, mask, "max")


def test_heads_shapes_and_token_layout():
  hidden = jax.random.normal(jax.random.key(0), (2, 5, 16))  # CLS + 2x2 patches of an 8x8 image
  for config, spec, shape in (
      (IMAGE, {"kind": "classification", "num_classes": 3, "pooling": "mean"}, (2, 3)),
      (IMAGE, {"kind": "dense", "out_channels": 5}, (2, 8, 8, 5)),
      (IMAGE, {"kind": "reconstruction"}, (2, 8, 8, 3)),
      (VILT, {"kind": "answer_scoring", "num_answers": 7}, (2, 7)),
      (TEXT, {"kind": "token"}, (2, 5, 40))):
    head = heads.build_head(spec, config, rngs=nnx.Rngs(0))
    assert _jit(head)(hidden, MASK).shape == shape
  # In a model, the head's parameters live under head/ (end-to-end calls: test_pretrained.py).
  vilt = TransformerModel(VILT, rngs=nnx.Rngs(0), head={"kind": "answer_scoring",
                                                        "num_answers": 7})
  assert {p.split("/")[0] for p in _paths(functional(vilt)[1])} == {"embeddings", "encoder",
                                                                     "head"}
  with pytest.raises(ValueError, match="needs an image model"):
    TransformerModel(TEXT, rngs=nnx.Rngs(0), head={"kind": "dense", "out_channels": 2})
  with pytest.raises(ValueError, match="unknown head kind"):
    TransformerModel(TEXT, rngs=nnx.Rngs(0), head={"kind": "regression"})
  # Dense head: token k of the 2x2 patch grid fills patch (k // 2, k % 2) of the output.
  head = heads.DensePredictionHead(4, 4, 2, 1, rngs=nnx.Rngs(0))
  head.projection.kernel[...] = jnp.eye(4)
  head.projection.bias[...] = jnp.zeros(4)
  tokens = jnp.arange(20.0).reshape(1, 5, 4)  # CLS + 4 patches, each [p*p] = 4 values
  out = head(tokens)[0, :, :, 0]
  np.testing.assert_array_equal(out[:2, 2:], [[8.0, 9.0], [10.0, 11.0]])  # token 2 = patch (0,1)
  np.testing.assert_array_equal(out[2:, :2], [[12.0, 13.0], [14.0, 15.0]])  # token 3 = (1,0)


def test_answer_losses_by_hand():
  # Logit 0 on every answer: BCE = log 2 each; summed over 4 answers = 4 log 2.
  targets = jnp.array([[0.0, 0.3, 1.0, 0.6]])
  np.testing.assert_allclose(heads.soft_target_bce(jnp.zeros((1, 4)), targets),
                             [4 * np.log(2.0)], rtol=1e-6)
  np.testing.assert_allclose(heads.vqa_score(jnp.array([[0.0, 0.0, 0.0, 5.0]]), targets), [0.6])
  # pixel_mse with weights only counts the weighted pixels: errors 1 and 3, weights 1 and 0.
  pred = jnp.zeros((1, 1, 2, 1))
  target = jnp.array([[[[1.0], [3.0]]]])
  np.testing.assert_allclose(heads.pixel_mse(pred, target), [5.0])
  np.testing.assert_allclose(heads.pixel_mse(pred, target, jnp.array([[[1.0, 0.0]]])), [1.0])


# --- roles ----------------------------------------------------------------------------------


def test_roles_default_feddat_and_errors():
  model = TransformerModel(TEXT, rngs=nnx.Rngs(0), adapters=FEDDAT, lora=LoRAConfig(rank=2),
                           head={"kind": "classification", "num_classes": 2})
  _, params = functional(model)
  by_role = lambda roles: {r: {transformer.parameter_component(p) for p, rr in
                               zip(_paths(params), jax.tree_util.tree_leaves(roles)) if rr == r}
                           for r in roles_lib.ROLES}
  default = by_role(transformer_roles(params))
  assert default[roles_lib.FROZEN] == {"backbone"}
  assert default[roles_lib.SHARED] == {"head", "lora", "adapters/personal", "adapters/shared",
                                       "adapters/frozen"}
  feddat = by_role(transformer_roles(
      params, trainable=("adapters/personal", "adapters/shared", "head"),
      personal=("adapters/personal",)))
  assert feddat == {roles_lib.FROZEN: {"backbone", "lora", "adapters/frozen"},
                    roles_lib.SHARED: {"adapters/shared", "head"},
                    roles_lib.PERSONAL: {"adapters/personal"}}
  personal_head = by_role(transformer_roles(params, personal=("head",)))
  assert personal_head[roles_lib.PERSONAL] == {"head"}
  # The backbone regex gives assign_roles the same frozen set as the default roles.
  by_regex = roles_lib.assign_roles(params, frozen=transformer.BACKBONE_PATTERN)
  assert jax.tree_util.tree_leaves(by_regex) == jax.tree_util.tree_leaves(
      transformer_roles(params))
  with pytest.raises(ValueError, match="matches no parameter"):
    transformer_roles(params, personal=("adapters/local",))
  with pytest.raises(ValueError, match="is not one of"):
    transformer_roles(params, trainable=("classifier",))


# --- the engine's functional boundary -----------------------------------------------------


def test_vmap_over_client_adapters_with_shared_frozen_backbone():
  """4 clients' adapter+head params under vmap, the backbone closed over once: grads are finite
  and equal a per-client loop. Evaluation mode: dropout's threefry bits would cost XLA:CPU
  ~10 s of compile here (dropout itself is tested above)."""
  model = TransformerModel(TEXT, rngs=nnx.Rngs(0), adapters=AdapterConfig(bottleneck=4),
                           head={"kind": "classification", "num_classes": 3})
  graphdef, params = functional(model)
  roles = transformer_roles(params)
  frozen = roles_lib.select(params, roles, roles_lib.FROZEN)
  trainable = roles_lib.select(params, roles, roles_lib.SHARED)
  k = 4
  rng = np.random.default_rng(0)
  # Distinct rows per client, and up-projections away from zero so every grad is non-trivial.
  stacked = jax.tree_util.tree_map(
      lambda x: jnp.asarray(x[None] + 0.1 * rng.normal(size=(k,) + x.shape), x.dtype), trainable)
  ids = jnp.asarray(rng.integers(1, 40, (k, 2, 5)))
  mask = jnp.broadcast_to(MASK, (k, 2, 5))
  labels = jnp.array([[0, 1], [2, 0], [1, 1], [2, 2]])

  def loss(trainable_k, ids_k, mask_k, labels_k):
    net = nnx.merge(graphdef, roles_lib.merge(trainable_k, frozen))
    logits = net(ids_k, mask_k)
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(2), labels_k])

  grad_fn = jax.jit(jax.vmap(jax.grad(loss)))
  grads = grad_fn(stacked, ids, mask, labels)
  one = jax.jit(jax.grad(loss))
  for c in range(k):
    row = jax.tree_util.tree_map(lambda x: x[c], stacked)
    expected = one(row, ids[c], mask[c], labels[c])
    got = jax.tree_util.tree_map(lambda x: x[c], grads)
    for (path, e), g in zip(_flat(expected).items(), _flat(got).values()):
      assert np.all(np.isfinite(g)), path
      np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-4, err_msg=path)
  # Only the trainable leaves carry the client axis; the up-projections get non-zero grads.
  flat = _flat(grads)
  assert all(path.startswith("head/") or "/adapters/" in path for path in flat)
  assert all(g.shape[0] == k for g in flat.values())
  assert np.abs(flat["encoder/layers/0/adapters/shared/up/kernel"]).max() > 0
