"""The heterogeneous federation suite: shapes per group, targets checked by hand, client ids."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_fm import assets
from fedjax_fm.data import digits, partition as partition_lib, suite, text


@pytest.fixture(scope="module")
def plays_cached():
  try:
    assets.path("shakespeare")
  except FileNotFoundError as e:
    pytest.skip(f"real plays not cached: {e}")


@pytest.fixture(scope="module")
def default(plays_cached):
  del plays_cached
  return suite.default_suite(seed=0)


def _digit_of_image():
  arrays = digits.load_digits_arrays()
  return {img.tobytes(): int(d) for img, d in zip(arrays["x"], arrays["y"])}


def test_default_suite_groups_shapes_and_pairs(default):
  expected = {  # name: (modalities, kind, {key: (shape, dtype)})
      "digits_classification": (("image",), "classification",
                                {"x": ((8, 8, 1), "float32"), "y": ((), "int32")}),
      "digits_denoising": (("image",), "dense",
                           {"x": ((8, 8, 1), "float32"), "y": ((8, 8, 1), "float32")}),
      "digits_segmentation": (("image",), "dense",
                              {"x": ((8, 8, 1), "float32"), "y": ((8, 8), "int32")}),
      "shakespeare_next_char": (("text",), "token_prediction",
                                {"x": ((80,), "int32"), "y": ((), "int32")}),
      "shakespeare_classification": (("text",), "classification",
                                     {"input_ids": ((64,), "int32"),
                                      "attention_mask": ((64,), "int32"), "y": ((), "int32")}),
      "digits_vqa": (("image", "text"), "vqa",
                     {"image": ((8, 8, 1), "float32"), "input_ids": ((32,), "int32"),
                      "attention_mask": ((32,), "int32"), "y": ((), "int32")}),
  }
  assert default.names == tuple(expected)
  for group in default.groups:
    modalities, kind, arrays = expected[group.spec.name]
    assert (group.spec.modalities, group.spec.kind) == (modalities, kind)
    assert set(group.spec.input_keys) | {group.spec.target_key} == set(arrays)
    for fed in (group.train, group.test):
      got = {k: (v.shape[1:], v.dtype.name) for k, v in fed.arrays.items()}
      assert got == arrays, group.spec.name
      assert fed.num_clients == group.num_clients == len(group.client_keys)
    assert dict(group.spec.shapes) == {k: s for k, (s, _) in arrays.items()}
    assert group.train.sizes.min() >= 1
  assert default.num_clients == 20 + 10 + 10 + 40 + 20 + 20
  by_pair = default.clients_by_pair()
  assert len(by_pair) == 6
  np.testing.assert_array_equal(by_pair[(("image", "text"), "digit_vqa")], np.arange(100, 120))
  assert default.locate(0) == ("digits_classification", 0)
  assert default.locate(85) == ("shakespeare_classification", 5)
  with pytest.raises(ValueError, match="out of range"):
    default.locate(120)


def test_digits_dense_targets_by_hand():
  clean = digits.load_digits_arrays()["x"]
  group = suite.digits_denoising_group({"kind": "iid", "num_clients": 4}, seed=1, noise_std=0.3)
  x, y = group.train.arrays["x"], group.train.arrays["y"]
  assert 0.0 <= x.min() and x.max() <= 1.0
  assert 0.1 < np.abs(x - y).mean() < 0.3  # noise clipped to [0, 1] is about 0.2 on average
  clean_rows = {img.tobytes() for img in clean}
  assert all(img.tobytes() in clean_rows for img in y)  # targets are the clean digits
  seg = suite.digits_segmentation_group({"kind": "iid", "num_clients": 4}, seed=1)
  x, y = seg.train.arrays["x"], seg.train.arrays["y"]
  np.testing.assert_array_equal(y, (x[..., 0] > 0.5).astype(np.int32))
  assert 0.2 < y.mean() < 0.5  # digits are mostly background, a good share ink
  assert int(seg.train.sizes.sum() + seg.test.sizes.sum()) == 1797


def test_digits_matching_labels_by_hand():
  group = suite.digits_matching_group({"kind": "iid", "num_clients": 3}, seed=2,
                                      tokenizer=text.CharTokenizer(32))
  assert (group.spec.modalities, group.spec.kind, group.spec.output_size) == (
      ("image", "text"), "classification", 2)
  digit_of = _digit_of_image()
  labels = []
  for c in range(group.num_clients):
    data, raw = group.train.client(c), group.train_text.client(c)
    for img, ids, caption, y in zip(data["image"], data["input_ids"], raw["caption"], data["y"]):
      assert text.decode_char_ids(ids) == caption
      named = suite.DIGIT_NAMES.index(caption.rsplit(" ", 1)[1])
      assert y == int(named == digit_of[img.tobytes()])
      labels.append(y)
  assert 0.4 < np.mean(labels) < 0.6      # half the captions match
  assert int(group.train.sizes.sum() + group.test.sizes.sum()) == 1797


def test_digits_vqa_answers_by_hand_and_one_family_per_client():
  group = suite.digits_vqa_group({"kind": "iid", "num_clients": 3}, seed=0,
                                 tokenizer=text.CharTokenizer(32))
  assert group.num_clients == 12
  assert group.client_keys == ("identity",) * 3 + ("parity",) * 3 + (
      "greater_than_five",) * 3 + ("prime",) * 3
  digit_of = _digit_of_image()
  expected_answer = {"identity": str, "parity": lambda d: "yes" if d % 2 == 0 else "no",
                     "greater_than_five": lambda d: "yes" if d > 5 else "no",
                     "prime": lambda d: "yes" if d in (2, 3, 5, 7) else "no"}
  for c, family in enumerate(group.client_keys):
    data, raw = group.train.client(c), group.train_text.client(c)
    assert set(raw["question"].tolist()) == {suite.VQA_FAMILIES[family][0]}
    assert text.decode_char_ids(data["input_ids"][0]) == suite.VQA_FAMILIES[family][0]
    for img, answer in zip(data["image"], data["y"]):
      assert suite.VQA_ANSWERS[answer] == expected_answer[family](digit_of[img.tobytes()])
  assert int(group.train.sizes.sum() + group.test.sizes.sum()) == 4 * 1797


def test_build_suite_is_deterministic_in_the_seed_and_checks_config():
  config = [{"builder": "digits_classification",
             "partition": {"kind": "shards", "num_clients": 10, "shards_per_client": 2}},
            {"builder": "digits_vqa", "name": "vqa_parity", "families": ["parity"]}]
  a, b = suite.build_suite(config, seed=3), suite.build_suite(config, seed=3)
  c = suite.build_suite(config, seed=4)
  np.testing.assert_array_equal(a.groups[0].train.arrays["y"], b.groups[0].train.arrays["y"])
  assert not np.array_equal(a.groups[0].train.arrays["y"], c.groups[0].train.arrays["y"])
  # 20 shards of ~90 examples, smaller than any class (>= 174): at most 2 * 2 labels a client
  # (before the train/test split, which only removes examples).
  train = a.groups[0].train
  assert all(len(np.unique(train.client(i)["y"])) <= 4 for i in range(10))
  assert a.names == ("digits_classification", "vqa_parity") and a.num_clients == 15
  with pytest.raises(ValueError, match="unknown group builder 'mnist'"):
    suite.build_suite([{"builder": "mnist"}])
  with pytest.raises(ValueError, match="bad options for group 'digits_vqa'"):
    suite.build_suite([{"builder": "digits_vqa", "familes": ["parity"]}])
  with pytest.raises(ValueError, match="no natural client key"):
    suite.build_suite([{"builder": "digits_denoising", "partition": {"kind": "natural"}}])
  with pytest.raises(ValueError, match="unknown question families"):
    suite.digits_vqa_group(families=["color"])


def test_shakespeare_groups_natural_and_dealt_speakers(plays_cached):
  del plays_cached
  natural = suite.shakespeare_next_char_group(max_clients=12, max_windows_per_speaker=10)
  assert natural.num_clients == 12 and len(set(natural.client_keys)) == 12
  dealt = suite.shakespeare_next_char_group({"kind": "iid", "num_clients": 4}, max_clients=12,
                                            max_windows_per_speaker=10)
  assert dealt.num_clients == 4
  assert sorted(k for keys in dealt.client_keys for k in keys) == sorted(natural.client_keys)
  assert int(dealt.train.sizes.sum()) == int(natural.train.sizes.sum())

  by_speaker = suite.shakespeare_classification_group(
      {"kind": "natural", "min_size": 30}, target="play", num_classes=4,
      tokenizer=text.CharTokenizer(48))
  for c in range(by_speaker.num_clients):
    labels, raw = by_speaker.train.client(c)["y"], by_speaker.train_text.client(c)["text"]
    assert len(np.unique(labels)) == 1  # one speaker speaks in one play
    ids = by_speaker.train.client(c)["input_ids"][0]
    assert text.decode_char_ids(ids) == "".join(
        ch if ch in text.CHAR_VOCAB else "?" for ch in raw[0][:48])
  assert all("\t" in key for key in by_speaker.client_keys)


def test_hf_tokenizer_matches_transformers_and_minilm_federation(plays_cached):
  del plays_cached
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  folder = assets.path("all-minilm-l6-v2")
  texts = ["To be, or not to be, that is the question:", "O Romeo, Romeo!", ""]
  ours = text.HFTokenizer(folder, max_length=12).encode(texts)
  theirs = AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", truncation=True,
                                                 max_length=12)
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(ours[key], np.asarray(theirs[key]))

  train, test, spec = suite.minilm_play_classification(seed=0, num_clients=16, alpha=0.3,
                                                       examples_per_play=100)
  assert train.num_clients == test.num_clients == 16
  assert set(train.arrays) == {"input_ids", "attention_mask", "token_type_ids", "y"}
  assert train.arrays["input_ids"].shape[1:] == (32,)
  assert np.all(train.arrays["input_ids"][:, 0] == 101)  # [CLS]
  assert spec.output_size == len(spec.output_names) == 8
  assert int(train.sizes.sum() + test.sizes.sum()) == 800
  top_share = [np.bincount(train.client(c)["y"], minlength=8).max() / train.sizes[c]
               for c in range(16)]
  assert np.mean(top_share) > 0.4  # Dirichlet(0.3) skew: far from the IID 1/8
  # any partition recipe replaces the default Dirichlet dealing (launch passes config's)
  iid, _, _ = suite.minilm_play_classification(
      seed=0, examples_per_play=100, partition=partition_lib.PartitionConfig("iid", 8))
  assert iid.num_clients == 8 and np.ptp(iid.sizes) <= 1
  iid_share = [np.bincount(iid.client(c)["y"], minlength=8).max() / iid.sizes[c]
               for c in range(8)]
  assert np.mean(iid_share) < 0.3


def test_missing_minilm_tokenizer_names_the_fetch_command(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_FM_CACHE", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="-m fedjax_fm.assets all-minilm-l6-v2"):
    suite.minilm_play_classification()
