"""TAP's builders (`algorithms/tap_launch.py`): the suite as modality-task pairs, the superset
model, stage 1 and the stage-2 evaluator run end to end; the suite's helpers by hand."""

import os

import numpy as np
import pytest

from tests import tiny
from fedjax_fm import assets
from fedjax_fm.algorithms import tap as tap_lib
from fedjax_fm.algorithms import tap_launch
from fedjax_fm.cohort import FederatedData
from fedjax_fm.data import text as text_lib


def test_tap_suite_tiny_runs_stage_one_and_two(tmp_path):
  config = tiny.config("tap_suite")
  history, _ = tiny.run_two_rounds(config, tmp_path)
  final = history[-1]
  for mode in ("global", "global_ft", "personal_fl", "personalized"):
    assert any(k.startswith(f"{mode}/") for k in final), mode


def test_validation_flags_and_character_table():
  fed = FederatedData.from_clients([{"y": np.zeros(4)}, {"y": np.zeros(1)}, {"y": np.zeros(8)}])
  flagged = tap_launch._flag_validation(fed, 0.25, seed=0)
  flags = flagged.arrays[tap_lib.VALIDATION_KEY]
  # round(0.25 * n) held out, at least one with two or more examples, never all of them.
  assert [int(flags[lo:hi].sum()) for lo, hi in zip(fed.offsets[:-1], fed.offsets[1:])] == \
      [1, 0, 2]
  vocab = os.path.join(assets.path("all-minilm-l6-v2"), "vocab.txt")
  table = tap_launch._char_to_wordpiece(vocab)
  tok = text_lib.minilm_tokenizer(8)
  ids = table[text_lib.char_ids("Ab")]
  # Upper and lower case read as the same uncased wordpiece as the tokenizer gives "a", "b".
  np.testing.assert_array_equal(ids, tok.encode(["a b"])["input_ids"][0, 1:3])
  assert table[text_lib.PAD_ID] == 0


def test_merge_clients_keeps_each_clients_examples_and_tags_their_task():
  a = FederatedData.from_clients([{"y": np.array([1, 2])}, {"y": np.array([3])}])
  b = FederatedData.from_clients([{"y": np.array([7])}, {"y": np.array([8, 9])}])
  merged = tap_launch.merge_clients([a, b])
  assert merged.num_clients == 2
  np.testing.assert_array_equal(merged.client(0)["y"], [1, 2, 7])
  np.testing.assert_array_equal(merged.client(0)[tap_lib.TASK_KEY], [0, 0, 1])
  np.testing.assert_array_equal(merged.client(1)["y"], [3, 8, 9])
  np.testing.assert_array_equal(merged.client(1)[tap_lib.TASK_KEY], [0, 1, 1])
  with pytest.raises(ValueError, match="equal client counts"):
    tap_launch.merge_clients([a, FederatedData.from_clients([{"y": np.array([1])}])])
