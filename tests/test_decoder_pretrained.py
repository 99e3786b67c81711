"""Decoder checkpoints: logits and greedy generation against transformers' PyTorch models on
tiny random checkpoints built offline, sharded bf16 files, FSDP placement, loader errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

from fedjax_fm import models
from fedjax_fm import roles as roles_lib
from fedjax_fm import sharding
from fedjax_fm.models.decoder_generate import generate
from fedjax_fm.models.decoder_pretrained import from_pretrained_decoder, save_pretrained_decoder

VOCAB = 128
_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    # GQA, untied, Llama 3.1 rope scaling whose bands all matter at head_dim 8.
    "llama": lambda: LlamaConfig(**_SIZES, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "qwen2": lambda: Qwen2Config(**_SIZES, tie_word_embeddings=True),  # q/k/v biases, tied
    "qwen3": lambda: Qwen3Config(**_SIZES, head_dim=16),  # q/k norms, head_dim != hidden/heads
    "mistral": lambda: MistralConfig(**_SIZES, sliding_window=4),  # the window matters at T=12
}


def _torch_model(name):
  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_config(FAMILIES[name]()).eval()
  with torch.no_grad():  # transformers zero-inits biases and one-inits norms: perturb them all
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (torch model, folder), each built and saved once."""
  out = {}
  for name in FAMILIES:
    model, folder = _torch_model(name), str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    out[name] = (model, folder)
  return out


def _batch():
  """Three rows of 12 tokens: unpadded, left-padded by 3, right-padded by 4."""
  ids = np.random.RandomState(0).randint(0, VOCAB, (3, 12))
  mask = np.ones((3, 12), np.int64)
  mask[1, :3] = 0
  mask[2, 8:] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  # transformers' plain forward numbers positions 0..T-1 even for left padding; its generate
  # counts real tokens only, as our model does. Give it those positions explicitly.
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers_with_left_and_right_padding(checkpoints, name):
  torch_model, folder = checkpoints[name]
  ids, mask = _batch()
  got = np.asarray(forward(from_pretrained_decoder(folder), jnp.asarray(ids), jnp.asarray(mask)))
  ref = _torch_logits(torch_model, ids, mask)
  real = mask.astype(bool)
  diff = np.abs(got - ref)[real].max()
  assert diff < 1e-4, f"{name}: max |logits diff| {diff}"
  assert np.abs(ref[real]).max() > 0.1  # the comparison is not of near-zero numbers


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_saved_folder_loads_back_here_and_in_transformers(checkpoints, name, tmp_path):
  """`save_pretrained_decoder` inverts the loader: our reload is bit-identical, and transformers
  reads the folder into a model with the original's logits (the pretrained Shakespeare LM is
  saved this way)."""
  torch_model, folder = checkpoints[name]
  model = from_pretrained_decoder(folder, lora={"rank": 2, "targets": ("q",)})
  save_pretrained_decoder(model, str(tmp_path / "saved"))
  assert sorted(os.listdir(tmp_path)) == ["saved"]  # no temporary folder left behind
  flat = lambda m: {roles_lib.leaf_path(p): np.asarray(x) for p, x in
                    jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m)))
                    if "lora" not in roles_lib.leaf_path(p)}
  back = flat(from_pretrained_decoder(str(tmp_path / "saved")))
  assert back.keys() == flat(model).keys()
  for p, x in flat(model).items():
    np.testing.assert_array_equal(back[p], x, err_msg=p)
  reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
  ids, mask = _batch()
  diff = np.abs(_torch_logits(reloaded, ids, mask) - _torch_logits(torch_model, ids, mask))
  assert diff[mask > 0].max() < 1e-5, diff.max()
  with pytest.raises(FileExistsError, match="exists"):
    save_pretrained_decoder(model, str(tmp_path / "saved"))


def test_from_pretrained_dispatches_decoders_with_lora(checkpoints):
  torch_model, folder = checkpoints["qwen2"]
  model = models.from_pretrained(folder, lora={"rank": 2, "targets": ("q", "down")})
  assert isinstance(model, models.DecoderLM) and model.config.tie_word_embeddings
  params = {roles_lib.leaf_path(p): x for p, x in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))}
  assert "lm_head/kernel" not in params and "layers/mlp/lora_down/b" in params
  np.testing.assert_array_equal(params["layers/mlp/lora_down/b"], 0.0)
  # The backbone is the checkpoint's (the logits are compared in the parity test).
  state = torch_model.state_dict()
  np.testing.assert_array_equal(params["layers/attention/q/bias"][1],
                                state["model.layers.1.self_attn.q_proj.bias"].numpy())
  np.testing.assert_array_equal(params["layers/mlp/down/kernel"][0],
                                state["model.layers.0.mlp.down_proj.weight"].numpy().T)


def test_sharded_bf16_checkpoint_loads(checkpoints, tmp_path):
  torch_model, _ = checkpoints["llama"]
  bf16 = AutoModelForCausalLM.from_config(FAMILIES["llama"]()).eval()
  bf16.load_state_dict(torch_model.state_dict())
  bf16 = bf16.to(torch.bfloat16)
  bf16.save_pretrained(str(tmp_path), max_shard_size="20KB")
  shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert "model.safetensors.index.json" in os.listdir(tmp_path) and len(shards) > 2
  model = from_pretrained_decoder(str(tmp_path), param_dtype=jnp.bfloat16)
  assert model.layers.attention.q.kernel.dtype == jnp.bfloat16
  # The reference: the same bf16 weights computed in float32.
  ref_model = bf16.float()
  ids, mask = _batch()
  got = np.asarray(forward(from_pretrained_decoder(str(tmp_path)), jnp.asarray(ids),
                           jnp.asarray(mask)))
  diff = np.abs(got - _torch_logits(ref_model, ids, mask))[mask > 0].max()
  assert diff < 1e-4, diff


def test_fsdp_mesh_shards_the_backbone_and_keeps_the_logits(checkpoints):
  torch_model, folder = checkpoints["llama"]
  mesh = sharding.make_mesh((("clients", 1), ("fsdp", 8)))
  lora = {"rank": 2, "targets": ("q", "v")}
  sharded = from_pretrained_decoder(folder, mesh=mesh, lora=lora)
  kernel = sharded.layers.mlp.up.kernel[...]  # [layers, 32, 64]: 64 split over 8 devices
  assert kernel.sharding.spec == P(None, None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (2, 32, 8)
  lora_a = sharded.layers.attention.lora_q.a[...]
  assert lora_a.sharding.spec == P() and float(jnp.abs(lora_a).min()) > 0  # replicated, random
  ids, mask = _batch()
  got = np.asarray(forward(sharded, jnp.asarray(ids), jnp.asarray(mask)))
  diff = np.abs(got - _torch_logits(torch_model, ids, mask))[mask > 0].max()
  assert diff < 1e-4, diff  # zero LoRA B: the checkpoint's logits


def test_greedy_generation_matches_transformers_generate(checkpoints):
  torch_model, folder = checkpoints["llama"]
  ids = np.random.RandomState(1).randint(3, VOCAB, (2, 6))
  mask = np.ones((2, 6), np.int64)
  mask[0, :2] = 0
  ids[0, :2] = 0
  torch_model.generation_config.eos_token_id = None
  torch_model.generation_config.pad_token_id = 0
  with torch.no_grad():
    ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                               max_new_tokens=8, do_sample=False).numpy()[:, 6:]
  got = generate(from_pretrained_decoder(folder), jnp.asarray(ids), jnp.asarray(mask), 8)
  np.testing.assert_array_equal(np.asarray(got), ref)


def test_loader_errors_name_the_problem(checkpoints, tmp_path):
  _, folder = checkpoints["qwen3"]
  broken = str(tmp_path / "broken")
  shutil.copytree(folder, broken)
  with open(os.path.join(broken, "config.json")) as f:
    config = json.load(f)
  config["num_hidden_layers"] = 3  # the weights hold 2 layers
  with open(os.path.join(broken, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2."):
    from_pretrained_decoder(broken)
  config.update(num_hidden_layers=2, model_type="qwen2")  # qwen3's q/k norms are unexpected
  with open(os.path.join(broken, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="unexpected tensors.*q_norm"):
    from_pretrained_decoder(broken)
  config["model_type"] = "falcon"
  with open(os.path.join(broken, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="'falcon' is not a supported decoder"):
    from_pretrained_decoder(broken)
