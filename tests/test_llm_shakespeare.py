"""The Shakespeare LLM experiment (issue 16): the role federation, the cached central
pretraining, and the tiny config's launch with perplexity and generation samples; FedPFT's
sub-FM on it through the launcher.

One tiny pretraining (4 steps, in the asset cache, shared with the README's LLM command) and
one tiny run of 2 rounds."""

import json
import math
import os

import numpy as np
import pytest

from fedjax_fm import assets, experiment, pretrain, sharding
from fedjax_fm import roles as roles_lib
from fedjax_fm.data import shakespeare_lm
from tests import tiny


def test_roles_are_the_largest_their_held_out_speeches_come_last_pretraining_plays_apart():
  fed = shakespeare_lm.role_federation(num_clients=3, seq_len=64, max_train_windows=8,
                                       max_test_windows=2)
  keys, speeches = shakespeare_lm.role_texts()
  size = {k: sum(map(len, s)) for k, s in zip(keys, speeches)}
  assert [size[r] for r in fed.roles] == sorted(size.values(), reverse=True)[:3]
  assert not {play for play, _ in keys} & set(shakespeare_lm.PRETRAIN_PLAYS)
  for c, role in enumerate(fed.roles):
    own = speeches[keys.index(role)]
    # The held-out text is the role's last speeches, and its first windows are its windows.
    assert fed.test_texts[c] == "\n".join(own[-len(fed.test_texts[c].split("\n")) + 1:]) + "\n"
    ids, mask = shakespeare_lm.windows(fed.test_texts[c], 64)
    np.testing.assert_array_equal(fed.test.client(c)["input_ids"], ids[:2])
    assert fed.train.client(c)["input_ids"].shape == (8, 64)
  # A downloaded model's own tokenizer (here MiniLM's WordPiece): the same split, its ids.
  wordpiece = shakespeare_lm.lm_tokenizer("model", assets.path("all-minilm-l6-v2"))
  fed_wp = shakespeare_lm.role_federation(num_clients=1, seq_len=16, max_test_windows=1,
                                          tokenizer=wordpiece)
  assert fed_wp.test_texts[0] == fed.test_texts[0]
  first = fed_wp.test.client(0)["input_ids"][0]
  assert first.max() >= shakespeare_lm.VOCAB_SIZE
  squeeze = lambda t: "".join(t.lower().split())  # WordPiece lowercases, drops newlines
  assert squeeze(fed.test_texts[0]).startswith(squeeze(wordpiece.decode(first)))
  ids, mask = shakespeare_lm.windows("abc", 2)  # the last window right-padded
  np.testing.assert_array_equal(mask, [[1, 1]])  # "c" alone has no target: dropped
  train, valid = shakespeare_lm.pretrain_text()
  assert len(train) > 10 * len(valid) > 0


def test_tiny_run_pretrains_once_reports_perplexity_and_writes_samples(tmp_path):
  config = tiny.config("llm_shakespeare")
  history, summary = tiny.run_two_rounds(config, tmp_path)
  folder = pretrain.cache_path(config.model.pretrain)
  log = json.load(open(os.path.join(folder, "pretrain.json")))
  assert len(log["train_loss"]) == 2 and math.isfinite(log["validation_loss"])
  # The second build finds the checkpoint: same folder, not retrained.
  stamp = os.path.getmtime(os.path.join(folder, "pretrain.json"))
  assert pretrain.pretrained_decoder(config.model.pretrain) == folder
  assert os.path.getmtime(os.path.join(folder, "pretrain.json")) == stamp
  last = history[-1]
  for mode in ("personalized", "global"):
    assert last[f"{mode}/perplexity"] == pytest.approx(math.exp(last[f"{mode}/loss"]), rel=1e-5)
    assert 1.0 < last[f"{mode}/perplexity"] < config.model.pretrain.shape.vocab_size * 1.5
  assert summary["per_client"]["personalized/per_client_perplexity"]["clients"] == 4
  samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
  assert [s["round"] for s in samples] == [2]   # one prompt, one evaluation
  s = samples[0]
  assert s["client"] == 0 and len(s["prompt"]) == config.data.prompt_chars
  assert all(isinstance(s[m], str) and len(s[m]) <= config.data.sample_tokens
             for m in ("personalized", "global"))
  assert summary["samples"] == [{k: v for k, v in s.items() if k != "round"}]
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


def test_fedpft_builds_its_sub_fm_on_the_decoder_and_alignment_is_refused(tmp_path):
  """The launcher's FedPFT builder on the decoder (its rounds: tests/test_fedpft_decoder.py)."""
  config = tiny.config("llm_shakespeare", "tiny,fedpft")
  data = experiment.build_data(config)
  model = experiment.build_model(config, data)
  mesh = sharding.make_mesh()
  built = experiment.build_algorithm(config, model, data, experiment.build_execution(config, mesh))
  shared = roles_lib.tree_bytes(roles_lib.select(model.params, model.roles, roles_lib.SHARED))
  down, up = built.algorithm.bytes_per_client(model.params)
  assert down == up < shared          # clients get the sub-FM's narrower MLP LoRA
  assert built.samples is not None
  config.data.tokenizer = assets.path("all-minilm-l6-v2")   # ids beyond the model's 84
  with pytest.raises(ValueError, match="beyond the model's vocabulary"):
    experiment.run(config, str(tmp_path / "vocab"), progress=False)
  config.data.tokenizer = "chars"
  config.algorithm.hparams.variant = "fedpft"
  with pytest.raises(ValueError, match="variant='fedot'"):
    experiment.run(config, str(tmp_path / "aligned"), progress=False)
  assert not (tmp_path / "aligned").exists()  # refused before anything was written
