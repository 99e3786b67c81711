"""Hub loaders on small local files in each schema (no network), and the hub call itself faked."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import PIL.Image
import pytest

from fedjax_fm.data import hub


def _random_images(n, height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown data set 'mnist'; known: \['cifar10', "
                                       r"'glue/sst2', 'vqav2'\]"):
    hub.load_hub_dataset("mnist", "train")


def test_cifar10_schema_from_parquet(tmp_path):
  images = _random_images(4, 32, 32)
  features = datasets.Features({"img": datasets.Image(),
                                "label": datasets.ClassLabel(names=["airplane", "cat"])})
  datasets.Dataset.from_dict({"img": [PIL.Image.fromarray(i) for i in images],
                              "label": [0, 1, 1, 0]}, features=features).to_parquet(
                                  str(tmp_path / "cifar.parquet"))
  data = hub.load_hub_dataset("cifar10", "test", data_files=str(tmp_path / "cifar.parquet"),
                              cache_dir=str(tmp_path / "hf"))
  assert data.arrays["x"].shape == (4, 32, 32, 3) and data.arrays["x"].dtype == np.float32
  np.testing.assert_allclose(data.arrays["x"], images / 255.0, atol=1e-6)  # PNG is lossless
  assert data.arrays["y"].tolist() == [0, 1, 1, 0] and data.arrays["y"].dtype == np.int32
  assert data.label_names == ("airplane", "cat")
  two = hub.load_hub_dataset("cifar10", "test", data_files=str(tmp_path / "cifar.parquet"),
                             cache_dir=str(tmp_path / "hf"), max_examples=2, image_size=16)
  assert two.arrays["x"].shape == (2, 16, 16, 3)


def test_cifar10_schema_from_an_image_folder_with_a_grayscale_image(tmp_path):
  images = _random_images(3, 8, 8)
  for i, (cls, img) in enumerate(zip(["bird", "bird", "frog"], images)):
    os.makedirs(tmp_path / "imgs" / cls, exist_ok=True)
    pil = PIL.Image.fromarray(img)
    (pil.convert("L") if i == 2 else pil).save(tmp_path / "imgs" / cls / f"{i}.png")
  data = hub.load_hub_dataset("cifar10", "train", data_dir=str(tmp_path / "imgs"),
                              cache_dir=str(tmp_path / "hf"))
  assert data.label_names == ("bird", "frog")
  assert sorted(data.arrays["y"].tolist()) == [0, 0, 1]
  gray = data.arrays["x"][data.arrays["y"] == 1][0]
  assert gray.shape == (8, 8, 3)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # grayscale became RGB


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_sst2_schema_from_csv_and_json(tmp_path, fmt):
  rows = [{"sentence": "a gripping, funny film", "label": 1, "idx": 0},
          {"sentence": "dull, and far too long", "label": 0, "idx": 1}]
  path = tmp_path / f"sst2.{fmt}"
  if fmt == "csv":
    path.write_text("sentence,label,idx\n" + "".join(
        f"\"{r['sentence']}\",{r['label']},{r['idx']}\n" for r in rows))
  else:
    path.write_text("\n".join(json.dumps(r) for r in rows))
  data = hub.load_hub_dataset("glue/sst2", "validation", data_files=str(path),
                              cache_dir=str(tmp_path / "hf"))
  assert data.arrays["text"].tolist() == ["a gripping, funny film", "dull, and far too long"]
  assert data.arrays["y"].tolist() == [1, 0] and data.arrays["y"].dtype == np.int32


def test_vqa_soft_score_by_hand():
  # m of 10 annotators: mean over leave-one-out subsets of min(1, matches / 3).
  assert [round(hub.vqa_soft_score(m, 10), 6) for m in range(6)] == [0, 0.3, 0.6, 0.9, 1, 1]
  assert hub.vqa_soft_score(1, 1) == 0.0  # the only annotator left out: nothing matches
  assert hub.normalize_answer(" Two Dogs. ") == "2 dogs"
  assert hub.normalize_answer("A cat") == "cat"


def test_vqav2_schema_from_parquet_with_soft_targets(tmp_path):
  small, big = _random_images(1, 10, 12), _random_images(1, 20, 16, seed=1)
  answer = lambda a: {"answer": a, "answer_confidence": "yes", "answer_id": 0}
  rows = {
      "question": ["What color is the cat?", "How many dogs?"],
      "image": [PIL.Image.fromarray(small[0]), PIL.Image.fromarray(big[0])],
      "answers": [[answer("white")] * 4 + [answer("gray")] * 2 + [answer("black")] * 4,
                  [answer("2")] * 3 + [answer("two")] * 1 + [answer("3")] * 1
                  + [answer("zebra")] * 5],
      "question_type": ["what color is the", "how many"],
      "answer_type": ["other", "number"],
  }
  features = datasets.Features({
      "question": datasets.Value("string"), "image": datasets.Image(),
      "answers": datasets.List({"answer": datasets.Value("string"),
                                "answer_confidence": datasets.Value("string"),
                                "answer_id": datasets.Value("int64")}),
      "question_type": datasets.Value("string"), "answer_type": datasets.Value("string")})
  datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "vqa.parquet"))
  with pytest.raises(ValueError, match="pass image_size="):
    hub.load_hub_dataset("vqav2", "validation", data_files=str(tmp_path / "vqa.parquet"),
                         cache_dir=str(tmp_path / "hf"))
  vocab = ["white", "black", "gray", "2", "3"]  # no "zebra"
  data = hub.load_hub_dataset("vqav2", "validation", data_files=str(tmp_path / "vqa.parquet"),
                              cache_dir=str(tmp_path / "hf"), image_size=(8, 6),
                              answer_vocab=vocab)
  a = data.arrays
  assert a["image"].shape == (2, 8, 6, 3) and a["image"].dtype == np.float32
  assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
  assert a["question"].tolist() == rows["question"]
  # white 4/10 -> 1.0, black 4/10 -> 1.0, gray 2/10 -> 0.6; "two" counts as "2": 4/10 -> 1.0,
  # 3 once -> 0.3, zebra not in the vocabulary.
  np.testing.assert_allclose(a["answer_scores"], [[1.0, 1.0, 0.6, 0, 0], [0, 0, 0, 1.0, 0.3]],
                             atol=1e-6)
  assert a["y"].tolist() == [0, 3]
  assert a["question_type"].tolist() == ["what color is the", "how many"]
  # Default vocabulary: most frequent normalised answers first (zebra 5, 2 4, ...).
  data = hub.load_hub_dataset("vqav2", "validation", data_files=str(tmp_path / "vqa.parquet"),
                              cache_dir=str(tmp_path / "hf"), image_size=8, max_answers=3)
  assert data.answer_vocab == ("zebra", "2", "black")
  assert data.arrays["answer_scores"].shape == (2, 3)


def test_hub_path_calls_load_dataset_with_the_repository(monkeypatch):
  calls = []

  def fake_load_dataset(path, name=None, **kwargs):
    calls.append((path, name, kwargs["split"]))
    return datasets.Dataset.from_dict({"sentence": ["fine"], "label": [1], "idx": [0]})

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  data = hub.load_hub_dataset("glue/sst2", "train")
  assert calls == [("nyu-mll/glue", "sst2", "train")]
  assert data.arrays["text"].tolist() == ["fine"]


def test_local_files_of_unknown_format_and_missing_columns_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="cannot tell the format"):
    hub.load_hub_dataset("glue/sst2", "train", data_files=str(tmp_path / "x.xlsx"))
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"review": "ok", "label": 1}))
  with pytest.raises(ValueError, match="no text column"):
    hub.load_hub_dataset("glue/sst2", "train", data_files=str(path),
                         cache_dir=str(tmp_path / "hf"))
