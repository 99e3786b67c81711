"""`fedjax_fm.checkpoint.Checkpointer` on a small state: round trip, unfinished saves ignored,
damaged checkpoints (truncated, flipped bytes in any file, deleted files) reported in one line
naming the newest intact round and set aside only when asked, and a history that an
asynchronous save never takes from the future."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
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
  with pytest.raises(CheckpointError, match=r"^checkpoint of round 6 in .* is damaged \(.*\); "
                                            r"pass --fallback_checkpoint to resume from round 3"):
    ckpt.restore(_state(0))
  assert ckpt.steps() == [3, 6]                    # nothing moved without being asked
  step, state, _ = ckpt.restore(_state(0), fallback=True)
  assert step == 3
  _assert_state(state, 3)
  assert ckpt.steps() == [3]
  assert len(os.listdir(str(tmp_path) + "-damaged")) == 1   # set aside, not deleted


def test_no_checkpoint_is_an_error(tmp_path):
  with pytest.raises(CheckpointError, match="no complete checkpoint .*--overwrite"):
    Checkpointer(str(tmp_path / "none")).restore(_state(0))



def _files(directory, step):
  root = os.path.join(str(directory), str(step))
  return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**"),
                                                           recursive=True) if os.path.isfile(p))


def _flip(path, count=4):
  """Inverts `count` bytes in the middle of a file (its size unchanged)."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = max(0, len(data) // 2 - count // 2)
    for i in range(mid, min(mid + count, len(data))):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def test_flipped_bytes_in_any_file_are_detected(tmp_path):
  """Every file of a checkpoint, 4 bytes inverted (the values a restore reads, and the files it
  does not: commit markers, orbax's metadata, per-process copies): the checkpoint is reported
  damaged in one line, and falls back to round 3 when asked."""
  _saved(tmp_path / "ref").close()
  names = _files(tmp_path / "ref", 6)
  assert {"files.sha256.json", "commit_success.txt", "state/manifest.ocdbt", "digest/metadata",
          "meta/metadata"} <= set(names), names
  assert any(n.startswith("state/ocdbt.process_0/d/") for n in names), names
  for i, name in enumerate(names):
    directory = tmp_path / f"case{i}"
    shutil.copytree(tmp_path / "ref", directory)
    _flip(os.path.join(str(directory), "6", name))
    ckpt = Checkpointer(str(directory), keep=3)
    with pytest.raises(CheckpointError) as e:
      ckpt.restore(_state(0))
    msg = str(e.value)
    assert msg.startswith("checkpoint of round 6 in ") and "\n" not in msg, (name, msg)
    assert "--fallback_checkpoint to resume from round 3" in msg, (name, msg)
    step, state, _ = ckpt.restore(_state(0), fallback=True)
    assert step == 3, name
    _assert_state(state, 3)
    ckpt.close()


def test_an_unsealed_checkpoint_is_verified_by_its_value_digests(tmp_path):
  """Killed between a save's completion and its seal: the values are still checked."""
  _saved(tmp_path).close()
  os.remove(os.path.join(str(tmp_path), "6", "files.sha256.json"))
  ckpt = Checkpointer(str(tmp_path), keep=3)
  assert ckpt.restore(_state(0))[0] == 6
  _flip(os.path.join(str(tmp_path), "6", "meta", "metadata"))
  with pytest.raises(CheckpointError, match=r"round 6 .*damaged.*resume from round 3"):
    ckpt.restore(_state(0))


def test_flipped_array_bytes_that_still_decode_are_caught_by_the_digest(tmp_path, monkeypatch):
  """The data file decodes (no read error) but holds other numbers: only the digest sees it."""
  _saved(tmp_path).close()
  ckpt = Checkpointer(str(tmp_path), keep=3)
  real = ckpt._mgr.restore

  def tampered(step, args):
    out = real(step, args=args)
    if step == 6 and "state" in out:
      out["state"]["server"]["w"] = out["state"]["server"]["w"].at[3, 1].add(1e-3)
    return out
  monkeypatch.setattr(ckpt._mgr, "restore", tampered)
  with pytest.raises(CheckpointError, match=r"round 6 .*damaged \(array \['server'\]\['w'\] "
                                            r"differs from its digest\).*round 3"):
    ckpt.restore(_state(0))


@pytest.mark.parametrize("loss", ["digest", "meta", "state/manifest.ocdbt", "state"])
def test_a_deleted_part_is_damage(loss, tmp_path):
  ckpt = _saved(tmp_path)
  path = os.path.join(str(tmp_path), "6", loss)
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  with pytest.raises(CheckpointError, match=r"round 6 .*damaged.*resume from round 3"):
    ckpt.restore(_state(0))


def test_every_checkpoint_damaged_is_one_line_naming_each(tmp_path):
  ckpt = _saved(tmp_path)
  for step in (3, 6):
    _damage(tmp_path, step)
  with pytest.raises(CheckpointError) as e:
    ckpt.restore(_state(0), fallback=True)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"every checkpoint in {tmp_path} is damaged (round 6")
  assert "round 3: " in msg and msg.endswith("moved aside, not deleted)")
  assert ckpt.steps() == [3, 6]   # nothing moved when there is nothing to resume from


def test_history_saved_is_the_history_at_save_time_under_concurrent_saves(tmp_path):
  """The loop keeps appending to (and could even edit) its history list while asynchronous
  saves are in flight; each checkpoint must hold the history exactly as it was at its round."""
  ckpt = Checkpointer(str(tmp_path), keep=None)
  history = []
  for r in range(1, 13):
    history.append({"round": r, "train/loss": 1.0 / r})
    ckpt.save(r, _state(r), {"history": history})
    history.append({"round": r + 100})   # the future, appended while the save is in flight
    history[-2]["edited"] = True
    history.pop()
    history[-1].pop("edited")
  ckpt.wait()
  ckpt.close()
  reader = Checkpointer(str(tmp_path), keep=None)
  assert reader.steps() == list(range(1, 13))
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state(0))
  for r in reader.steps():
    state, meta = reader._read(r, abstract)   # verified against its digest too
    assert [h["round"] for h in meta["history"]] == list(range(1, r + 1))
    assert all("edited" not in h for h in meta["history"])
    _assert_state(state, r)
