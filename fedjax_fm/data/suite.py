"""A heterogeneous federation from real offline data: client groups differing in modality and task.

The seed algorithms federate clients that do not share a task or even an input modality: TAP
(Task-Aware Personalization) groups clients by modality-task pair, FedDAT splits VQA clients into
domains, FedBone trains multi-task groups, FedPFT fine-tunes text tasks. This module builds such
a federation from data that needs no hub: scikit-learn's digits and the Shakespeare plays.

A suite is a list of named groups. A group is one vmapped cohort: every client in it has the
same array keys and shapes (`GroupSpec` declares them). Groups:

| group                      | modalities      | kind             | arrays (per example)          |
|----------------------------|-----------------|------------------|-------------------------------|
| digits_classification      | image           | classification   | x [8,8,1] f32, y int32 (10)   |
| digits_denoising           | image           | dense            | x [8,8,1] f32 noisy, y [8,8,1] |
|                            |                 |                  | f32 clean                      |
| digits_segmentation        | image           | dense            | x [8,8,1] f32, y [8,8] int32   |
|                            |                 |                  | ink mask (pixel > 0.5), 2 cls  |
| shakespeare_next_char      | text            | token_prediction | x [80] int32, y int32 (vocab)  |
| shakespeare_classification | text            | classification   | input_ids/attention_mask [L]   |
|                            |                 |                  | int32 (+ token_type_ids), y    |
| digits_vqa                 | image, text     | vqa              | image [8,8,1] f32, input_ids/  |
|                            |                 |                  | attention_mask [L] int32, y    |
| digits_matching            | image, text     | classification   | image [8,8,1] f32, a caption's |
|                            |                 |                  | input_ids/attention_mask, y:   |
|                            |                 |                  | does it name the digit (2 cls) |

`shakespeare_classification` also serves speaker classification (`target="speaker"`: task
`speaker_classification`), a second text-classification pair.

Text groups also keep their raw strings (`ClientGroup.train_text`, same CSR rows as `train`) so a
model may tokenize them itself; the integer arrays come from the tokenizer passed in (default a
character tokenizer, `text.CharTokenizer`; `text.HFTokenizer` for a Hugging Face folder).

Every client has a global id (its group's offset plus its index in the group). Everything is a
deterministic function of the seed.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from fedjax_fm.cohort import FederatedData
from fedjax_fm.data import partition as partition_lib
from fedjax_fm.data import shakespeare
from fedjax_fm.data import text as text_lib
from fedjax_fm.data.digits import load_digits_arrays

TASK_KINDS = ("classification", "dense", "token_prediction", "vqa")
INK_THRESHOLD = 0.5
VQA_ANSWERS = tuple(str(d) for d in range(10)) + ("yes", "no")
# Question family -> (question, answer of digit d). Families are FedDAT's domains.
VQA_FAMILIES: dict[str, tuple[str, Callable[[int], str]]] = {
    "identity": ("which digit is this?", str),
    "parity": ("is it even?", lambda d: "yes" if d % 2 == 0 else "no"),
    "greater_than_five": ("is it greater than five?", lambda d: "yes" if d > 5 else "no"),
    "prime": ("is it a prime?", lambda d: "yes" if d in (2, 3, 5, 7) else "no"),
}


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """What a group of clients computes, so a model and a loss can be built for it.

  Attributes:
    name: the group's name in its suite.
    modalities: input modalities, e.g. ("image",), ("text",), ("image", "text").
    task: the task's name, e.g. "digit_classification".
    kind: "classification", "dense", "token_prediction" or "vqa".
    input_keys: array keys a model reads.
    target_key: the array key of the target.
    output_size: classes, answers, vocabulary size, or output channels (dense regression).
    output_names: names of the outputs (class names, answers, vocabulary characters); empty
      for regression.
    shapes: per-example shape of every array key (without the example axis).
    dtypes: numpy dtype name of every array key.
    text_keys: keys of the raw-string arrays in `ClientGroup.train_text` / `test_text`.
  """
  name: str
  modalities: tuple[str, ...]
  task: str
  kind: str
  input_keys: tuple[str, ...]
  target_key: str
  output_size: int
  output_names: tuple[str, ...] = ()
  shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  dtypes: Mapping[str, str] = dataclasses.field(default_factory=dict)
  text_keys: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in TASK_KINDS:
      raise ValueError(f"unknown task kind {self.kind!r}; available: {list(TASK_KINDS)}")

  @property
  def pair(self) -> tuple[tuple[str, ...], str]:
    """The (modalities, task) pair TAP groups clients by."""
    return self.modalities, self.task


@dataclasses.dataclass(frozen=True)
class ClientGroup:
  """One group's clients: its spec, per-client train/test data and raw text.

  Attributes:
    spec: what the group computes.
    train, test: per-client examples (same clients, same order).
    train_text, test_text: raw strings row-aligned with `train` / `test` (same offsets), or
      None for groups without text.
    client_keys: per client, what defines it: its natural key ((play, speaker)), its VQA
      question family (the client's domain), or its index.
  """
  spec: GroupSpec
  train: FederatedData
  test: FederatedData
  train_text: FederatedData | None
  test_text: FederatedData | None
  client_keys: tuple[Hashable, ...]

  @property
  def num_clients(self) -> int:
    return self.train.num_clients


@dataclasses.dataclass(frozen=True)
class FederationSuite:
  """Named client groups; client ids run on across groups in order."""
  groups: tuple[ClientGroup, ...]

  def __post_init__(self):
    names = [g.spec.name for g in self.groups]
    if len(set(names)) != len(names):
      raise ValueError(f"group names must be unique, got {names}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(g.spec.name for g in self.groups)

  @property
  def offsets(self) -> np.ndarray:
    """`[num_groups + 1]`: group g's clients have global ids offsets[g]:offsets[g+1]."""
    return np.concatenate([[0], np.cumsum([g.num_clients for g in self.groups])]).astype(np.int64)

  @property
  def num_clients(self) -> int:
    return int(self.offsets[-1])

  def group(self, name: str) -> ClientGroup:
    if name not in self.names:
      raise ValueError(f"no group {name!r} in the suite; groups: {list(self.names)}")
    return self.groups[self.names.index(name)]

  def global_ids(self, name: str) -> np.ndarray:
    """Global ids of group `name`'s clients, in the group's order."""
    g = self.names.index(self.group(name).spec.name)
    return np.arange(self.offsets[g], self.offsets[g + 1], dtype=np.int64)

  def locate(self, global_id: int) -> tuple[str, int]:
    """(group name, index within the group) of a global client id."""
    if not 0 <= global_id < self.num_clients:
      raise ValueError(f"client id {global_id} out of range [0, {self.num_clients})")
    g = int(np.searchsorted(self.offsets, global_id, side="right")) - 1
    return self.names[g], int(global_id - self.offsets[g])

  def clients_by_pair(self) -> dict[tuple[tuple[str, ...], str], np.ndarray]:
    """Global ids of all clients per (modalities, task) pair (TAP's grouping)."""
    out: dict[tuple[tuple[str, ...], str], list[np.ndarray]] = {}
    for group in self.groups:
      out.setdefault(group.spec.pair, []).append(self.global_ids(group.spec.name))
    return {pair: np.concatenate(ids) for pair, ids in out.items()}


def _make_group(spec: GroupSpec, arrays: Mapping[str, np.ndarray],
                raw_text: Mapping[str, np.ndarray] | None, parts: Sequence[np.ndarray],
                test_fraction: float, seed: int,
                client_keys: Sequence[Hashable] | None = None) -> ClientGroup:
  train_idx, test_idx = partition_lib.train_test_indices(parts, test_fraction, seed)
  spec = dataclasses.replace(spec, shapes={k: tuple(v.shape[1:]) for k, v in arrays.items()},
                             dtypes={k: v.dtype.name for k, v in arrays.items()},
                             text_keys=tuple(raw_text or ()))
  text = lambda idx: partition_lib.federate(raw_text, idx) if raw_text else None
  keys = tuple(client_keys) if client_keys is not None else tuple(range(len(parts)))
  return ClientGroup(spec, partition_lib.federate(arrays, train_idx),
                     partition_lib.federate(arrays, test_idx), text(train_idx), text(test_idx),
                     keys)


def _as_config(config, default: partition_lib.PartitionConfig) -> partition_lib.PartitionConfig:
  if config is None:
    return default
  if isinstance(config, partition_lib.PartitionConfig):
    return config
  return partition_lib.PartitionConfig.from_mapping(config)


def _partition(config: partition_lib.PartitionConfig, seed: int, *, labels: np.ndarray,
               keys: Sequence[Hashable] | None = None) -> list[np.ndarray]:
  if config.kind == "natural" and keys is None:
    raise ValueError("this group has no natural client key; use iid, dirichlet, shards or "
                     "quantity")
  return partition_lib.make_partition(config, seed, labels=labels, keys=keys)


# --- image groups on digits ----------------------------------------------------------------------

def digits_classification_group(partition=None, *, seed: int = 0, test_fraction: float = 0.2,
                                name: str = "digits_classification") -> ClientGroup:
  """Digit classification: `x` [8,8,1] float32 in [0,1] -> `y` int32 in 0..9."""
  arrays = load_digits_arrays()
  config = _as_config(partition, partition_lib.PartitionConfig("dirichlet", 20, alpha=0.5))
  parts = _partition(config, seed, labels=arrays["y"])
  spec = GroupSpec(name, ("image",), "digit_classification", "classification", ("x",), "y", 10,
                   tuple(str(d) for d in range(10)))
  return _make_group(spec, arrays, None, parts, test_fraction, seed)


def digits_denoising_group(partition=None, *, seed: int = 0, test_fraction: float = 0.2,
                           noise_std: float = 0.3,
                           name: str = "digits_denoising") -> ClientGroup:
  """Denoising: `x` = clip(clean + N(0, noise_std^2), 0, 1) -> `y` the clean image, both
  [8,8,1] float32 (a dense regression; the noise is drawn once, from the seed)."""
  digits = load_digits_arrays()
  noise = np.random.default_rng([seed, 0xD0]).normal(0.0, noise_std, digits["x"].shape)
  arrays = {"x": np.clip(digits["x"] + noise, 0.0, 1.0).astype(np.float32), "y": digits["x"]}
  parts = _partition(_as_config(partition, partition_lib.PartitionConfig("iid", 10)), seed,
                     labels=digits["y"])
  spec = GroupSpec(name, ("image",), "digit_denoising", "dense", ("x",), "y", 1)
  return _make_group(spec, arrays, None, parts, test_fraction, seed)


def digits_segmentation_group(partition=None, *, seed: int = 0, test_fraction: float = 0.2,
                              threshold: float = INK_THRESHOLD,
                              name: str = "digits_segmentation") -> ClientGroup:
  """Ink segmentation: `x` [8,8,1] float32 -> `y` [8,8] int32, 1 where the pixel's intensity
  (in [0, 1]) exceeds `threshold` (ink), else 0 (a per-pixel 2-class task)."""
  digits = load_digits_arrays()
  arrays = {"x": digits["x"], "y": (digits["x"][..., 0] > threshold).astype(np.int32)}
  parts = _partition(_as_config(partition, partition_lib.PartitionConfig("iid", 10)), seed,
                     labels=digits["y"])
  spec = GroupSpec(name, ("image",), "ink_segmentation", "dense", ("x",), "y", 2,
                   ("background", "ink"))
  return _make_group(spec, arrays, None, parts, test_fraction, seed)


# --- text groups on Shakespeare ------------------------------------------------------------------

def shakespeare_next_char_group(partition=None, *, seed: int = 0, test_fraction: float = 0.2,
                                seq_length: int = shakespeare.SEQ_LENGTH, stride: int = 1,
                                max_windows_per_speaker: int | None = 64,
                                max_clients: int | None = None,
                                name: str = "shakespeare_next_char") -> ClientGroup:
  """LEAF next-character prediction: `x` [seq_length] int32 char ids -> `y` int32 next char.

  The unit of partitioning is a (play, speaker) text, each split in time order into train and
  test windows (`shakespeare.next_char_federation`). "natural" (the default) makes one client
  per speaker, as LEAF does; the other kinds deal speakers to `num_clients` clients, with the
  speaker's play as the label ("dirichlet" then skews clients' plays).
  """
  train_fed, test_fed, keys = shakespeare.next_char_federation(
      seq_length=seq_length, stride=stride, test_fraction=test_fraction,
      max_windows_per_client=max_windows_per_speaker, max_clients=max_clients, seed=seed)
  plays = sorted({play for play, _ in keys})
  play_labels = np.asarray([plays.index(play) for play, _ in keys], np.int32)
  speaker_groups = _partition(_as_config(partition, partition_lib.PartitionConfig("natural")),
                              seed, labels=play_labels, keys=keys)
  spec = GroupSpec(name, ("text",), "next_char", "token_prediction", ("x",), "y",
                   text_lib.CHAR_VOCAB_SIZE, ("<pad>", "<unk>") + tuple(text_lib.CHAR_VOCAB),
                   shapes={k: tuple(v.shape[1:]) for k, v in train_fed.arrays.items()},
                   dtypes={k: v.dtype.name for k, v in train_fed.arrays.items()})

  def regroup(fed: FederatedData) -> FederatedData:
    rows = [np.concatenate([np.arange(fed.offsets[s], fed.offsets[s + 1]) for s in speakers])
            for speakers in speaker_groups]
    return partition_lib.federate(fed.arrays, rows)

  client_keys = [tuple(keys[s] for s in speakers) if len(speakers) > 1 else keys[speakers[0]]
                 for speakers in speaker_groups]
  return ClientGroup(spec, regroup(train_fed), regroup(test_fed), None, None, tuple(client_keys))


def shakespeare_classification_group(partition=None, *, seed: int = 0, test_fraction: float = 0.2,
                                     tokenizer: text_lib.TextTokenizer | None = None,
                                     target: str = "play", unit: str = "line",
                                     num_classes: int = 8, min_chars: int = 20,
                                     examples_per_class: int | None = None,
                                     name: str = "shakespeare_classification") -> ClientGroup:
  """Which play (or speaker) says this line/speech: token arrays -> `y` int32 class.

  Args:
    partition: a `PartitionConfig` (or mapping); default Dirichlet(0.5) label skew over 20
      clients. "natural" makes one client per (play, speaker).
    seed: seeds subsampling, partition and split.
    test_fraction: per-client held-out share.
    tokenizer: turns texts into fixed-length arrays; default `CharTokenizer(64)`.
    target, unit, num_classes, min_chars: see `shakespeare.classification_examples`.
    examples_per_class: if set, keep this many random examples of each class (balanced).
    name: the group's name.
  """
  tokenizer = tokenizer or text_lib.CharTokenizer(64)
  texts, labels, speaker_keys, class_names = shakespeare.classification_examples(
      shakespeare.load_records(), target=target, unit=unit, num_classes=num_classes,
      min_chars=min_chars)
  if examples_per_class is not None:
    rng = np.random.default_rng([seed, 0xC1])
    keep = np.concatenate([rng.choice(np.flatnonzero(labels == c),
                                      min(examples_per_class, int(np.sum(labels == c))),
                                      replace=False) for c in range(len(class_names))])
    keep = np.sort(keep)
    texts, labels, speaker_keys = texts[keep], labels[keep], speaker_keys[keep]
  arrays = dict(tokenizer.encode(texts.tolist()))
  arrays["y"] = labels
  config = _as_config(partition, partition_lib.PartitionConfig("dirichlet", 20, alpha=0.5))
  parts = _partition(config, seed, labels=labels, keys=speaker_keys.tolist())
  # A natural client is a speaker ("play\tspeaker"); other partitions' clients are numbered.
  client_keys = ([speaker_keys[p[0]] for p in parts] if config.kind == "natural"
                 else list(range(len(parts))))
  spec = GroupSpec(name, ("text",), f"{target}_classification", "classification",
                   tuple(k for k in arrays if k != "y"), "y", len(class_names),
                   tuple(class_names))
  return _make_group(spec, arrays, {"text": texts}, parts, test_fraction, seed, client_keys)


# --- image + text question answering -------------------------------------------------------------

def digits_vqa_group(partition=None, *, seed: int = 0, test_fraction: float = 0.2,
                     tokenizer: text_lib.TextTokenizer | None = None,
                     families: Sequence[str] = tuple(VQA_FAMILIES),
                     name: str = "digits_vqa") -> ClientGroup:
  """Visual question answering on digits, with question families as domains (FedDAT).

  Every digit image is asked one question of every family ("which digit is this?", "is it
  even?", "is it greater than five?", "is it a prime?"), answered from `VQA_ANSWERS` ("0".."9",
  "yes", "no"). The partition config is applied within each family, so every client holds
  questions of one family only; its `client_keys` entry is that family (its domain).

  Arrays: `image` [8,8,1] float32, the tokenizer's arrays of the question (default
  `CharTokenizer(32)`: `input_ids`, `attention_mask` [32] int32), `y` int32 answer index.

  Args:
    partition: applied per family (`num_clients` clients per family); default IID, 5 per family.
    seed, test_fraction, name: as in the other groups.
    tokenizer: encodes the questions.
    families: which of `VQA_FAMILIES` to ask.
  """
  unknown = sorted(set(families) - set(VQA_FAMILIES))
  if unknown or not families:
    raise ValueError(f"unknown question families {unknown or list(families)}; available: "
                     f"{list(VQA_FAMILIES)}")
  tokenizer = tokenizer or text_lib.CharTokenizer(32)
  digits = load_digits_arrays()
  n = len(digits["y"])
  images, questions, answers, digit_labels, family_of = [], [], [], [], []
  for f, family in enumerate(families):
    question, answer_of = VQA_FAMILIES[family]
    images.append(digits["x"])
    questions += [question] * n
    answers += [VQA_ANSWERS.index(answer_of(int(d))) for d in digits["y"]]
    digit_labels.append(digits["y"])
    family_of += [f] * n
  answers = np.asarray(answers, np.int32)
  family_of = np.asarray(family_of)
  arrays = {"image": np.concatenate(images), **tokenizer.encode(questions), "y": answers}
  parts, client_keys = [], []
  for f, family in enumerate(families):
    rows = np.flatnonzero(family_of == f)
    config = _as_config(partition, partition_lib.PartitionConfig("iid", 5))
    for part in _partition(config, seed + f, labels=answers[rows]):
      parts.append(rows[part])
      client_keys.append(family)
  spec = GroupSpec(name, ("image", "text"), "digit_vqa", "vqa",
                   tuple(k for k in arrays if k != "y"), "y", len(VQA_ANSWERS), VQA_ANSWERS)
  return _make_group(spec, arrays, {"question": np.asarray(questions, object)}, parts,
                     test_fraction, seed, client_keys)


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits_matching_group(partition=None, *, seed: int = 0, test_fraction: float = 0.2,
                          tokenizer: text_lib.TextTokenizer | None = None,
                          name: str = "digits_matching") -> ClientGroup:
  """Image-text matching on digits: does the caption name the digit in the image?

  Every digit image gets one caption, "a handwritten <digit name>": its own digit with
  probability 1/2, else another digit drawn uniformly (both from the seed). `y` is 1 for a match,
  0 otherwise (classes ("mismatch", "match")). A classification task over image and text, the
  binary image-text matching objective of vision-language pretraining.

  Arrays: `image` [8,8,1] float32, the tokenizer's arrays of the caption (default
  `CharTokenizer(32)`), `y` int32.

  Args:
    partition: default IID over 5 clients.
    seed, test_fraction, tokenizer, name: as in the other groups.
  """
  tokenizer = tokenizer or text_lib.CharTokenizer(32)
  digits = load_digits_arrays()
  rng = np.random.default_rng([seed, 0x1A7C])
  n = len(digits["y"])
  match = rng.random(n) < 0.5
  other = (digits["y"] + rng.integers(1, 10, n)) % 10      # uniform over the other nine
  named = np.where(match, digits["y"], other)
  captions = [f"a handwritten {DIGIT_NAMES[d]}" for d in named]
  arrays = {"image": digits["x"], **tokenizer.encode(captions), "y": match.astype(np.int32)}
  parts = _partition(_as_config(partition, partition_lib.PartitionConfig("iid", 5)), seed,
                     labels=arrays["y"])
  spec = GroupSpec(name, ("image", "text"), "image_text_matching", "classification",
                   tuple(k for k in arrays if k != "y"), "y", 2, ("mismatch", "match"))
  return _make_group(spec, arrays, {"caption": np.asarray(captions, object)}, parts,
                     test_fraction, seed)


# --- suites --------------------------------------------------------------------------------------

GROUP_BUILDERS: dict[str, Callable[..., ClientGroup]] = {
    "digits_classification": digits_classification_group,
    "digits_denoising": digits_denoising_group,
    "digits_segmentation": digits_segmentation_group,
    "shakespeare_next_char": shakespeare_next_char_group,
    "shakespeare_classification": shakespeare_classification_group,
    "digits_vqa": digits_vqa_group,
    "digits_matching": digits_matching_group,
}


def build_suite(groups: Sequence[Mapping[str, object]], *, seed: int = 0,
                tokenizer: text_lib.TextTokenizer | None = None) -> FederationSuite:
  """Builds a suite from config: one mapping per group.

  Each mapping has `builder` (a key of `GROUP_BUILDERS`), optionally `name` (default the
  builder), `partition` (a `PartitionConfig` mapping) and any keyword of that builder
  (`test_fraction`, `num_classes`, ...). `seed` seeds every group; `tokenizer`, if given, is
  used by every text group that takes one.

  Example:
    build_suite([{"builder": "digits_classification",
                  "partition": {"kind": "shards", "num_clients": 10}},
                 {"builder": "digits_vqa", "families": ["parity", "prime"]}], seed=0)
  """
  built = []
  for entry in groups:
    entry = dict(entry)
    builder_name = entry.pop("builder", None)
    if builder_name not in GROUP_BUILDERS:
      raise ValueError(f"unknown group builder {builder_name!r}; available: "
                       f"{sorted(GROUP_BUILDERS)}")
    builder = GROUP_BUILDERS[builder_name]
    if tokenizer is not None and "tokenizer" in inspect.signature(builder).parameters:
      entry.setdefault("tokenizer", tokenizer)
    entry.setdefault("name", builder_name)
    try:
      built.append(builder(entry.pop("partition", None), seed=seed, **entry))
    except TypeError as e:  # a misspelt option: say which group and what it accepts
      raise ValueError(f"bad options for group {entry['name']!r}: {e}") from e
  return FederationSuite(tuple(built))


def default_suite(seed: int = 0,
                  tokenizer: text_lib.TextTokenizer | None = None) -> FederationSuite:
  """All six groups at modest sizes (about 120 clients; builds in a few seconds on a CPU)."""
  return build_suite([
      {"builder": "digits_classification",
       "partition": {"kind": "dirichlet", "num_clients": 20, "alpha": 0.5}},
      {"builder": "digits_denoising", "partition": {"kind": "iid", "num_clients": 10}},
      {"builder": "digits_segmentation", "partition": {"kind": "iid", "num_clients": 10}},
      {"builder": "shakespeare_next_char", "max_clients": 40, "max_windows_per_speaker": 64},
      {"builder": "shakespeare_classification", "examples_per_class": 300,
       "partition": {"kind": "dirichlet", "num_clients": 20, "alpha": 0.5}},
      {"builder": "digits_vqa", "partition": {"kind": "iid", "num_clients": 5}},
  ], seed=seed, tokenizer=tokenizer)


def minilm_play_classification(seed: int = 0, *, num_clients: int = 32, alpha: float = 0.5,
                               num_plays: int = 8, max_length: int = 32,
                               examples_per_play: int | None = 400, test_fraction: float = 0.2,
                               tokenizer: text_lib.TextTokenizer | None = None,
                               unit: str = "line",
                               partition: partition_lib.PartitionConfig | None = None,
                               ) -> tuple[FederatedData, FederatedData, GroupSpec]:
  """A text-classification federation for a quick MiniLM adapter fine-tuning run on a CPU.

  Shakespeare lines or whole speeches (`unit`; at least 20 characters) labelled with their play
  among the `num_plays`
  plays with the most lines, `examples_per_play` of each, tokenised with the all-MiniLM-L6-v2
  tokenizer at `max_length`, dealt to `num_clients` clients with Dirichlet(`alpha`) label skew
  (Hsu et al. 2019), each with its own train/test split; `partition` replaces that dealing by
  any recipe (IID, shards, quantity skew; it overrides `num_clients` and `alpha`).

  Returns:
    `(train, test, spec)`: arrays `input_ids`, `attention_mask`, `token_type_ids`
    `[n, max_length]` int32 and `y` `[n]` int32; the spec names the plays.

  Raises:
    FileNotFoundError: if the plays or the tokenizer are not cached (names the fetch command).
  """
  tokenizer = tokenizer or text_lib.minilm_tokenizer(max_length)
  group = shakespeare_classification_group(
      partition or partition_lib.PartitionConfig("dirichlet", num_clients, alpha=alpha), seed=seed,
      test_fraction=test_fraction, tokenizer=tokenizer, target="play", unit=unit,
      num_classes=num_plays, examples_per_class=examples_per_play,
      name="shakespeare_play_classification")
  return group.train, group.test, group.spec
