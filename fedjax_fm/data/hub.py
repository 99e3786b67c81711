"""The papers' data sets by name, through Hugging Face `datasets`, normalised to numpy arrays.

`load_hub_dataset("cifar10", "train")` calls `datasets.load_dataset` on the hub repository of
that name; `load_hub_dataset("cifar10", "train", data_files="my.parquet")` reads local files in
the same schema through the same code (parquet, json, csv, or an image folder), which is how
machines without a hub use it and how the tests exercise it.

Every schema becomes plain arrays that a `FederatedData` can hold:

| name        | hub source         | arrays                                                   |
|-------------|--------------------|----------------------------------------------------------|
| "cifar10"   | uoft-cs/cifar10    | x [N,H,W,3] float32 in [0,1], y [N] int32                |
| "glue/sst2" | nyu-mll/glue, sst2 | text [N] str (object), y [N] int32 (-1: unlabelled test) |
| "vqav2"     | lmms-lab/VQAv2     | image [N,H,W,3] float32, question [N] str, answer_scores |
|             |                    | [N,A] float32, y [N] int32 (top answer, -1 if none in    |
|             |                    | the vocabulary), question_type, answer_type [N] str      |

VQA soft scores follow the VQA evaluation (Antol et al. 2015; Goyal et al. 2017 for v2): with
`m` of the `n` human answers equal to `a`, the score of `a` is the mean over the `n`
leave-one-annotator-out subsets of `min(1, matches / 3)`, which is 0.3, 0.6, 0.9, 1.0 for
m = 1, 2, 3, 4+ of 10 (the targets of Anderson et al. 2018). Answers are normalised lightly
(lower case, no final period or articles, number words as digits) before matching.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class HubSource:
  """Where a named data set lives on the hub and which schema it has."""
  path: str
  config: str | None
  schema: str  # "image_classification" | "text_classification" | "vqa"


KNOWN_DATASETS: dict[str, HubSource] = {
    "cifar10": HubSource("uoft-cs/cifar10", None, "image_classification"),
    "glue/sst2": HubSource("nyu-mll/glue", "sst2", "text_classification"),
    "vqav2": HubSource("lmms-lab/VQAv2", None, "vqa"),
}

# Our field -> column names accepted for it, first match wins (hub and local files differ).
_COLUMNS = {
    "image": ("img", "image"),
    "label": ("label", "labels"),
    "text": ("sentence", "text"),
    "question": ("question",),
    "answers": ("answers",),
}
_BUILDER_BY_EXTENSION = {".parquet": "parquet", ".json": "json", ".jsonl": "json",
                         ".csv": "csv", ".png": "imagefolder", ".jpg": "imagefolder",
                         ".jpeg": "imagefolder"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


@dataclasses.dataclass(frozen=True)
class HubData:
  """One split of a named data set as numpy arrays.

  Attributes:
    name: the known name ("cifar10", ...).
    split: the split loaded.
    arrays: the normalised arrays (see the module docstring), all with N rows.
    label_names: class names by label, when the source declares them.
    answer_vocab: VQA answers by index of `answer_scores`' last axis.
  """
  name: str
  split: str
  arrays: Mapping[str, np.ndarray]
  label_names: tuple[str, ...] | None = None
  answer_vocab: tuple[str, ...] | None = None

  @property
  def num_examples(self) -> int:
    return len(next(iter(self.arrays.values())))


def normalize_answer(answer: str) -> str:
  """Light VQA answer normalisation: lower case, no final period, digits, no articles."""
  words = re.sub(r"[.]+$", "", str(answer).strip().lower()).replace(",", "").split()
  return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_score(num_matching: int, num_answers: int) -> float:
  """The VQA accuracy of an answer given by `num_matching` of `num_answers` annotators."""
  if num_answers == 0 or num_matching == 0:
    return 0.0
  m, n = num_matching, num_answers
  # Leaving out one of the m who said it leaves m - 1 matches; one of the others leaves m.
  return (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n


def build_answer_vocab(answer_lists: Sequence[Sequence[str]], max_answers: int,
                       min_count: int = 1) -> tuple[str, ...]:
  """The `max_answers` most frequent normalised answers (ties alphabetical), each given at
  least `min_count` times; the usual VQA classifier vocabulary (Anderson et al. 2018: 3,129)."""
  counts: dict[str, int] = {}
  for answers in answer_lists:
    for a in answers:
      a = normalize_answer(a)
      counts[a] = counts.get(a, 0) + 1
  ranked = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
  return tuple(ranked[:max_answers])


def _find_column(column_names: Sequence[str], field: str, name: str) -> str:
  for candidate in _COLUMNS[field]:
    if candidate in column_names:
      return candidate
  raise ValueError(f"{name} data has no {field} column (looked for {list(_COLUMNS[field])} in "
                   f"{list(column_names)}); rename the column in your files")


def _infer_builder(data_files, data_dir) -> str:
  if data_files is None:
    return "imagefolder"  # a data_dir alone: class-named folders of images
  if isinstance(data_files, Mapping):
    data_files = [f for files in data_files.values()
                  for f in ([files] if isinstance(files, str) else files)]
  files = [data_files] if isinstance(data_files, str) else list(data_files)
  builders = {_BUILDER_BY_EXTENSION.get(os.path.splitext(f)[1].lower()) for f in files}
  if len(builders) != 1 or None in builders:
    raise ValueError(f"cannot tell the format of data_files {files}; use one of "
                     f"{sorted(set(_BUILDER_BY_EXTENSION))} or pass builder=")
  return builders.pop()


def _images_to_array(images, image_size: int | tuple[int, int] | None) -> np.ndarray:
  size = (image_size, image_size) if isinstance(image_size, int) else image_size
  out = []
  for img in images:
    if isinstance(img, dict):  # undecoded {"bytes", "path"} from a plain binary column
      import io  # pylint: disable=import-outside-toplevel
      import PIL.Image  # pylint: disable=import-outside-toplevel
      img = PIL.Image.open(io.BytesIO(img["bytes"]) if img.get("bytes") else img["path"])
    img = img.convert("RGB")
    if size is not None and img.size != (size[1], size[0]):
      img = img.resize((size[1], size[0]), resample=2)  # bilinear
    out.append(np.asarray(img, np.uint8))
  shapes = {a.shape for a in out}
  if len(shapes) > 1:
    raise ValueError(f"images have different sizes {sorted(shapes)[:3]}...; pass image_size= to "
                     "resize them to one")
  if not out:
    return np.zeros((0,) + ((size or (0, 0)) + (3,)), np.float32)
  return np.stack(out).astype(np.float32) / 255.0


def _label_names(dataset, column: str) -> tuple[str, ...] | None:
  feature = dataset.features.get(column)
  names = getattr(feature, "names", None)
  return tuple(names) if names else None


def _answer_strings(answers) -> list[str]:
  if answers is None:
    return []
  return [a["answer"] if isinstance(a, Mapping) else str(a) for a in answers]


def load_hub_dataset(name: str, split: str, *, data_files=None, data_dir: str | None = None,
                     builder: str | None = None, cache_dir: str | None = None,
                     max_examples: int | None = None,
                     image_size: int | tuple[int, int] | None = None,
                     answer_vocab: Sequence[str] | None = None,
                     max_answers: int = 3129) -> HubData:
  """Loads one split of a known data set and normalises it to arrays.

  Args:
    name: one of `KNOWN_DATASETS` ("cifar10", "glue/sst2", "vqav2").
    split: the split ("train", "validation", "test", ...).
    data_files: local files in the data set's schema instead of the hub: a path, a list, or a
      {split: files} dict, in parquet, json(l) or csv (text), or png/jpg images.
    data_dir: a local image folder (`class_name/image.png`) instead of the hub.
    builder: the `datasets` builder for local files, if the extension does not tell it.
    cache_dir: the `datasets` cache (default: its own).
    max_examples: keep only the first `max_examples` rows (before decoding images).
    image_size: resize images to this (height, width) or square size; needed when a split's
      images differ in size (VQA).
    answer_vocab: VQA answers to score over; default the `max_answers` most frequent
      normalised answers of this split (pass the train split's vocabulary to other splits).
    max_answers: size of the default VQA answer vocabulary.

  Returns:
    A `HubData` with the arrays of the module docstring.

  Raises:
    ValueError: unknown name, unknown file format, missing column, ragged images.
  """
  if name not in KNOWN_DATASETS:
    raise ValueError(f"unknown data set {name!r}; known: {sorted(KNOWN_DATASETS)}")
  import datasets  # pylint: disable=import-outside-toplevel
  source = KNOWN_DATASETS[name]
  if data_files is not None or data_dir is not None:
    builder = builder or _infer_builder(data_files, data_dir)
    if data_files is not None and not isinstance(data_files, Mapping):
      data_files = {split: data_files}
    dataset = datasets.load_dataset(builder, data_files=data_files, data_dir=data_dir,
                                    split=split, cache_dir=cache_dir)
  else:
    try:
      dataset = datasets.load_dataset(source.path, source.config, split=split,
                                      cache_dir=cache_dir)
    except (ConnectionError, OSError) as e:
      raise ConnectionError(f"could not load {name!r} ({source.path}) from the hub: {e}; "
                            "without a hub pass local files in the same schema with "
                            "data_files=") from e
  if max_examples is not None:
    dataset = dataset.select(range(min(max_examples, len(dataset))))
  columns = dataset.column_names
  read = lambda column: dataset.data.table.column(column).to_pylist()

  if source.schema == "image_classification":
    image_col, label_col = _find_column(columns, "image", name), _find_column(columns, "label",
                                                                               name)
    return HubData(name, split, {
        "x": _images_to_array((row[image_col] for row in dataset.select_columns([image_col])),
                              image_size),
        "y": np.asarray(read(label_col), np.int32)}, label_names=_label_names(dataset, label_col))

  if source.schema == "text_classification":
    text_col, label_col = _find_column(columns, "text", name), _find_column(columns, "label", name)
    return HubData(name, split, {"text": np.asarray(read(text_col), object),
                                 "y": np.asarray(read(label_col), np.int32)},
                   label_names=_label_names(dataset, label_col))

  image_col = _find_column(columns, "image", name)
  question_col, answers_col = (_find_column(columns, "question", name),
                               _find_column(columns, "answers", name))
  answer_lists = [_answer_strings(a) for a in read(answers_col)]
  vocab = tuple(answer_vocab) if answer_vocab is not None else build_answer_vocab(
      answer_lists, max_answers)
  index = {a: i for i, a in enumerate(vocab)}
  scores = np.zeros((len(answer_lists), len(vocab)), np.float32)
  for row, answers in enumerate(answer_lists):
    normalized = [normalize_answer(a) for a in answers]
    for a in set(normalized):
      if a in index:
        scores[row, index[a]] = vqa_soft_score(normalized.count(a), len(normalized))
  best = np.where(scores.max(axis=1, initial=0.0) > 0, scores.argmax(axis=1) if len(vocab) else 0,
                  -1).astype(np.int32)
  arrays = {
      "image": _images_to_array((row[image_col] for row in dataset.select_columns([image_col])),
                                image_size),
      "question": np.asarray(read(question_col), object),
      "answer_scores": scores,
      "y": best,
  }
  for optional in ("question_type", "answer_type"):
    if optional in columns:
      arrays[optional] = np.asarray(read(optional), object)
  return HubData(name, split, arrays, answer_vocab=vocab)
