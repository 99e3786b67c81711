"""TAP on the federation suite, from a config: the builders of the launcher's tables
(`fedjax_fm.experiment`) for ``data.name="tap_suite"``, ``model.name="tap"`` and
``algorithm.name="tap"``.

- `suite_data`: the suite's groups (`fedjax_fm.data.suite`) as one `PairedData` group per
  modality-task pair, under the superset model's input keys, text tokenised for
  all-MiniLM-L6-v2, a share of every client's training examples flagged as held out for the
  replacement rule (`tap.VALIDATION_KEY`).
- `build_model`: the superset model (`fedjax_fm.models.tap`) over those pairs, its text
  embeddings and first fusion layers from the real checkpoint.
- `groups_from_model` / `build`: one `tap.TAPGroup` per pair of the model, the stage-1
  algorithm (`tap.tap`) and the stage-2 evaluator (`tap_post_fl.make_evaluator`) from
  ``config.algorithm.hparams``.
- Multi-task clients (``config.data.multitask``: lists of suite group names): client c of such a
  merged group holds client c of every listed group, each example flagged with its task's index
  (`tap.TASK_KEY`); its `TAPGroup` (`multitask_group`) answers each example with its own pair's
  head, and replacement swaps each task's paths separately.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_fm import assets
from fedjax_fm.algorithms import tap as tap_lib
from fedjax_fm.algorithms import tap_post_fl
from fedjax_fm.algorithms.tap import OutputFn, PyTree, TAPGroup, TASK_KEY, VALIDATION_KEY
from fedjax_fm.builders import Built, Federation, ModelBundle, chain_config, read_hparams
from fedjax_fm.cohort import FederatedData, GroupedData
from fedjax_fm.data import suite as suite_lib
from fedjax_fm.data import text as text_lib
from fedjax_fm.models import tap as model_lib


def model_output_fn(graphdef, pair_name: str) -> OutputFn:
  """``output_fn`` of one pair of a TAP superset model (`fedjax_fm.models.tap.TAPModel`)."""
  def output_fn(params, batch, rng):
    return nnx.merge(graphdef, params)(pair_name, batch, rng=rng)

  return output_fn


def groups_from_model(graphdef, params: PyTree, config, *,
                      deltas: Mapping[str, float] | float = 0.01,
                      distill_weights: Mapping[str, float] | float = 2e-3,
                      pairs: Sequence[str] | None = None) -> tuple[TAPGroup, ...]:
  """One `TAPGroup` per modality-task pair of a `TAPConfig` (or of `pairs`, in that order).

  Args:
    graphdef, params: the superset model (`fedjax_fm.models.functional`).
    config: its `fedjax_fm.models.tap.TAPConfig`.
    deltas: replacement margin per task name (or one for all).
    distill_weights: stage 2's lambda per task name (or one for all).
    pairs: which pairs, in the order of the grouped data (default: the config's).
  """
  def per_task(value, task, what):
    if isinstance(value, Mapping):
      if task not in value:
        raise ValueError(f"{what} has no entry for task {task!r}; give one per task "
                         f"({[t.name for t in config.tasks]})")
      return float(value[task])
    return float(value)

  out = []
  for name in (pairs or [p.name for p in config.pairs]):
    pair = config.pair(name)
    out.append(TAPGroup(name=name, output_fn=model_output_fn(graphdef, name),
                        kind=config.task(pair.task).head,
                        view=model_lib.view_mask(params, config, name),
                        delta=per_task(deltas, pair.task, "deltas"),
                        distill_weight=per_task(distill_weights, pair.task, "distill_weights")))
  return tuple(out)


def multitask_group(name: str, members: Sequence[TAPGroup]) -> TAPGroup:
  """One group of multi-task clients from the one-task groups of its tasks (same head kind and
  output shape): each example's output is its own task's (`TASK_KEY`), the view is the union
  of the members' views, each member's view is its task's paths, margins and distillation
  weights are the members'."""
  members = tuple(members)
  if len(members) < 2:
    raise ValueError(f"multi-task group {name!r} needs two or more tasks, got {len(members)}")
  kinds = {m.kind for m in members}
  if len(kinds) != 1:
    raise ValueError(f"multi-task group {name!r}: its tasks have head kinds {sorted(kinds)}; "
                     "they must share one (each example's output is selected from theirs)")
  fns = tuple(m.output_fn for m in members)

  def output_fn(params, batch, rng):
    outs = [fn(params, batch, rng) for fn in fns]
    if len({o.shape for o in outs}) != 1:
      raise ValueError(f"multi-task group {name!r}: its tasks' outputs have shapes "
                       f"{[o.shape for o in outs]}; they must be equal")
    task = batch[TASK_KEY]
    out = outs[0]
    for t, o in enumerate(outs[1:], 1):
      out = jnp.where((task == t).reshape(task.shape + (1,) * (o.ndim - task.ndim)), o, out)
    return out

  union = jax.tree_util.tree_map(lambda *v: any(bool(x) for x in v), *(m.view for m in members))
  return TAPGroup(name=name, output_fn=output_fn, kind=members[0].kind, view=union,
                  delta=tuple(float(m.delta) for m in members),
                  distill_weight=tuple(float(m.distill_weight) for m in members),
                  task_names=tuple(m.name for m in members),
                  task_views=tuple(m.view for m in members))


def merge_clients(feds: Sequence[FederatedData]) -> FederatedData:
  """Client c of the result holds client c of every federation in `feds` (same client count,
  same array keys and example shapes), examples flagged with their federation's index under
  `TASK_KEY`."""
  feds = tuple(feds)
  counts = {f.num_clients for f in feds}
  keys = {frozenset(f.arrays) for f in feds}
  if len(counts) != 1 or len(keys) != 1:
    raise ValueError(f"multi-task clients need groups with equal client counts and array keys; "
                     f"got {[f.num_clients for f in feds]} clients, keys "
                     f"{[sorted(f.arrays) for f in feds]}")
  for key in next(iter(keys)):
    shapes = {f.arrays[key].shape[1:] for f in feds}
    if len(shapes) != 1:
      raise ValueError(f"multi-task clients: array {key!r} has example shapes {sorted(shapes)}")
  clients = []
  for c in range(counts.pop()):
    parts = [f.client(c) for f in feds]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    merged[TASK_KEY] = np.concatenate([np.full(len(p["y"]), t, np.int32)
                                       for t, p in enumerate(parts)])
    clients.append(merged)
  return FederatedData.from_clients(clients)


# The suite's task kinds -> the TAP head that serves them.
_HEAD_OF_KIND = {"classification": "classification", "token_prediction": "next_token",
                 "vqa": "answer_scoring"}
HPARAMS = ("peak_lr", "min_lr", "warmup_rounds", "weight_decay", "clip_norm", "replacement",
           "deltas", "distill_weights", "temperature", "post_steps", "post_lr",
           "post_batch_size", "distill_sweep")


@dataclasses.dataclass(frozen=True)
class PairedData(GroupedData):
  """A `GroupedData` that knows its groups' modality-task pairs (TAP's model is built from
  them), and, for a test federation, the training federations stage 2 fine-tunes on.

  Attributes:
    pairs, tasks: every `fedjax_fm.models.tap.PairSpec` of the model (one per suite group) and
      the `TaskSpec`s they name.
    stage2: the training federations (test data only; None for training data).
    group_pairs: per group, the names of its pairs (several: multi-task clients); empty: one
      pair per group, named as the group.
  """
  pairs: tuple = ()
  tasks: tuple = ()
  stage2: tuple | None = None
  group_pairs: tuple = ()

  def pairs_of_groups(self) -> tuple[tuple[str, ...], ...]:
    return self.group_pairs or tuple((name,) for name in self.names)


def _char_to_wordpiece(vocab_file: str) -> np.ndarray:
  """[CHAR_VOCAB_SIZE] table: character id (`text.CharTokenizer`) -> the uncased wordpiece id
  of that character, so char-level text reads through the pretrained text embeddings.
  Padding -> [PAD]; newline -> [SEP]; space (no wordpiece of its own) -> "_"; others -> [UNK]."""
  with open(vocab_file) as f:
    vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
  table = np.full(text_lib.CHAR_VOCAB_SIZE, vocab["[UNK]"], np.int32)
  table[text_lib.PAD_ID] = vocab["[PAD]"]
  for i, ch in enumerate(text_lib.CHAR_VOCAB):
    key = {"\n": "[SEP]", " ": "_"}.get(ch, ch.lower())
    table[i + 2] = vocab.get(key, vocab["[UNK]"])
  return table


def _canonical(spec, fed: FederatedData, char_table: np.ndarray) -> FederatedData:
  """A suite group's arrays under the model's input keys (``image``, ``input_ids``,
  ``attention_mask``, ``token_type_ids``) plus ``y``."""
  a = dict(fed.arrays)
  out = {"y": a["y"]}
  if spec.kind == "token_prediction":   # char ids -> wordpieces, every position real
    out["input_ids"] = char_table[a["x"]]
    out["attention_mask"] = (a["x"] != text_lib.PAD_ID).astype(np.int32)
  else:
    for key in ("input_ids", "attention_mask", "token_type_ids"):
      if key in a:
        out[key] = a[key]
    if "image" in spec.modalities:
      out["image"] = a["image"] if "image" in a else a["x"]
  return FederatedData(out, fed.offsets)


def _flag_validation(fed: FederatedData, fraction: float, seed: int) -> FederatedData:
  """Adds `VALIDATION_KEY`: `round(fraction * n)` random examples of each client (at least one
  when it has two or more) are held out of local training for the replacement decision."""
  flag = np.zeros(int(fed.offsets[-1]), np.float32)
  for c, n in enumerate(fed.sizes):
    n = int(n)
    k = min(n - 1, max(1 if n >= 2 else 0, int(round(fraction * n))))
    if k > 0:
      rng = np.random.default_rng([seed, c, 0x7A9])
      flag[fed.offsets[c] + rng.choice(n, k, replace=False)] = 1.0
  return FederatedData({**fed.arrays, VALIDATION_KEY: flag}, fed.offsets)


def suite_data(config) -> Federation:
  """Train and test `PairedData` of the federation suite `config.data.groups`
  (`fedjax_fm.data.suite`), one group per modality-task pair, text tokenised for
  all-MiniLM-L6-v2 at `config.data.max_length` (next-character windows mapped to the
  checkpoint's character wordpieces); a `config.data.validation_fraction` of each client's
  training examples is flagged as held out. The suite groups named together in an entry of
  `config.data.multitask` become one group of multi-task clients (`merge_clients`), named
  ``"+".join(names)``, in the place of the first.
  """
  d = config.data
  if not 0.0 <= d.validation_fraction < 1.0:
    raise ValueError(f"config.data.validation_fraction must be in [0, 1), got "
                     f"{d.validation_fraction}")
  folder = assets.path("all-minilm-l6-v2", download=True)
  suite = suite_lib.build_suite([dict(g) for g in d.groups], seed=config.seed,
                                tokenizer=text_lib.HFTokenizer(folder, d.max_length))
  table = _char_to_wordpiece(os.path.join(folder, "vocab.txt"))
  tasks, pairs, train, test = {}, [], [], []
  for group in suite.groups:
    spec = group.spec
    if spec.kind == "dense":
      head = "dense_classification" if spec.output_names else "dense_regression"
    else:
      head = _HEAD_OF_KIND[spec.kind]
    tasks[spec.task] = model_lib.TaskSpec(spec.task, head, spec.output_size)
    pairs.append(model_lib.PairSpec(spec.name, tuple(sorted(spec.modalities, reverse=True)),
                                    spec.task))
    train.append(_flag_validation(_canonical(spec, group.train, table), d.validation_fraction,
                                  config.seed))
    test.append(_canonical(spec, group.test, table))
  names, tasks = list(suite.names), tuple(tasks.values())
  merged = [tuple(m) for m in d.multitask]
  listed = [n for m in merged for n in m]
  if len(set(listed)) != len(listed) or set(listed) - set(names):
    raise ValueError(f"config.data.multitask {merged} must name suite groups of {names}, each "
                     "at most once")
  group_pairs, group_names, group_train, group_test = [], [], [], []
  for i, name in enumerate(names):
    members = next((m for m in merged if name in m), (name,))
    if name != members[0]:
      continue                                   # merged into its first member's place
    idx = [names.index(n) for n in members]
    group_pairs.append(members)
    group_names.append("+".join(members))
    if len(members) == 1:
      group_train.append(train[i])
      group_test.append(test[i])
    else:
      group_train.append(merge_clients([train[j] for j in idx]))
      group_test.append(merge_clients([test[j] for j in idx]))
  names, group_pairs = tuple(group_names), tuple(group_pairs) if merged else ()
  return Federation(PairedData(names, tuple(group_train), tuple(pairs), tasks,
                               group_pairs=group_pairs),
                    PairedData(names, tuple(group_test), tuple(pairs), tasks,
                               stage2=tuple(group_train), group_pairs=group_pairs))


def build_model(config, data: Federation) -> ModelBundle:
  """The TAP superset model over the training data's pairs, its text embeddings and first
  `config.model.fusion_layers` layers from all-MiniLM-L6-v2."""
  train_data = data.train
  if not isinstance(train_data, PairedData):
    raise ValueError("model 'tap' needs the data set 'tap_suite' (groups with modality-task "
                     "pairs); set config.data.name='tap_suite'")
  m = config.model
  _, graphdef, params = model_lib.tap_from_pretrained(
      assets.path("all-minilm-l6-v2", download=True), tasks=train_data.tasks,
      pairs=train_data.pairs, num_layers=m.fusion_layers, image_size=m.image_size,
      patch_size=m.patch_size, num_channels=m.num_channels, lora=dict(m.lora),
      expert_bottleneck=m.expert_bottleneck, dropout=m.dropout, seed=config.seed)
  return ModelBundle(params=params, roles=model_lib.tap_roles(params), graphdef=graphdef)


def build(config, model: ModelBundle, data: Federation, execution) -> Built:
  """`fedjax_fm.builders.AlgorithmBuilder` of TAP: the stage-1 algorithm from
  ``config.algorithm.hparams`` (`HPARAMS`) and an evaluator that runs stage 2
  (`fedjax_fm.algorithms.tap_post_fl`) on the test data's `PairedData.stage2`."""
  hp = read_hparams(config, HPARAMS)
  pair_groups = groups_from_model(model.graphdef, model.params,
                                  nnx.merge(model.graphdef, model.params).config,
                                  deltas=hp["deltas"], distill_weights=hp["distill_weights"])
  by_name = {g.name: g for g in pair_groups}
  test_data = data.test
  if not isinstance(test_data, PairedData) or test_data.stage2 is None:
    raise ValueError("TAP's evaluator needs the test data of `suite_data` (it carries the "
                     "training data stage 2 fine-tunes on); set config.data.name='tap_suite'")
  groups = tuple(by_name[members[0]] if len(members) == 1
                 else multitask_group(name, [by_name[m] for m in members])
                 for name, members in zip(test_data.names, test_data.pairs_of_groups()))
  alg = tap_lib.tap(groups, model.roles, peak_lr=hp["peak_lr"], min_lr=hp["min_lr"],
                    warmup_rounds=hp["warmup_rounds"], weight_decay=hp["weight_decay"],
                    clip_norm=hp["clip_norm"], replacement=hp["replacement"],
                    aggregation=chain_config(config, data.train.num_clients),
                    execution=execution)
  order = [g.name for g in groups]
  if list(test_data.names) != order:
    raise ValueError(f"test groups {test_data.names} do not match the model's pairs {order}")
  evaluate = tap_post_fl.make_evaluator(groups, model.roles, test_data.stage2, test_data.groups,
                                        post_steps=hp["post_steps"],
                                        batch_size=hp["post_batch_size"],
                                        post_lr=hp["post_lr"], temperature=hp["temperature"],
                                        distill_sweep=tuple(hp["distill_sweep"]),
                                        seed=config.seed)
  return Built(alg, evaluate)


build.hparams = HPARAMS
