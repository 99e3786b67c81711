"""`fedjax_fm.checkpoint.Checkpointer` on a small state: round trip, unfinished saves ignored,
damaged checkpoints reported (with the fallback named) and set aside only when asked."""

import glob
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.checkpoint import CheckpointError, Checkpointer


def _state(value):
  return {"server": {"w": jnp.full((64, 8), value, jnp.float32), "round": jnp.int32(value)},
          "clients": {"head": jnp.arange(24, dtype=jnp.float32).reshape(3, 8) * value}}


def _saved(directory, rounds=(3, 6)):
  ckpt = Checkpointer(str(directory), keep=3)
  for r in rounds:
    ckpt.save(r, _state(r), {"history": [{"round": i} for i in range(1, r + 1)]})
  ckpt.wait()
  ckpt.close()
  return Checkpointer(str(directory), keep=3)


def _assert_state(state, value):
  np.testing.assert_array_equal(state["server"]["w"], np.full((64, 8), value, np.float32))
  np.testing.assert_array_equal(state["clients"]["head"],
                                np.arange(24, dtype=np.float32).reshape(3, 8) * value)


def test_round_trip_of_state_and_history(tmp_path):
  ckpt = _saved(tmp_path)
  assert ckpt.steps() == [3, 6]
  step, state, meta = ckpt.restore(_state(0))
  assert step == 6 and [h["round"] for h in meta["history"]] == list(range(1, 7))
  _assert_state(state, 6)


def test_a_save_killed_midway_is_ignored(tmp_path):
  """An unfinished save is a temporary folder (orbax renames it when complete)."""
  _saved(tmp_path, rounds=(3,)).close()
  partial = tmp_path / "6.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(tmp_path / "3", partial)
  for marker in glob.glob(str(partial / "**" / "*commit*"), recursive=True):
    os.remove(marker)
  ckpt = Checkpointer(str(tmp_path))
  assert ckpt.steps() == [3]
  assert ckpt.restore(_state(0))[0] == 3


def _damage(directory, step):
  for path in glob.glob(os.path.join(str(directory), str(step), "state", "**"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 64:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def test_damaged_checkpoint_is_reported_and_fallback_only_when_asked(tmp_path):
  ckpt = _saved(tmp_path)
  _damage(tmp_path, 6)
  with pytest.raises(CheckpointError, match=r"corrupted or truncated.*--fallback_checkpoint.*"
                                            r"round 3"):
    ckpt.restore(_state(0))
  assert ckpt.steps() == [3, 6]                    # nothing moved without being asked
  step, state, _ = ckpt.restore(_state(0), fallback=True)
  assert step == 3
  _assert_state(state, 3)
  assert ckpt.steps() == [3]
  assert len(os.listdir(str(tmp_path) + "-damaged")) == 1   # set aside, not deleted


def test_no_checkpoint_is_an_error(tmp_path):
  with pytest.raises(CheckpointError, match="no complete checkpoint"):
    Checkpointer(str(tmp_path / "none")).restore(_state(0))
