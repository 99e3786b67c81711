"""Shakespeare parser and tasks: hand-written plays, then the real cached plays."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedjax_fm import assets
from fedjax_fm.data import shakespeare, text

UPPER_PLAY = """THE TRAGEDY OF TESTS

PERSONS REPRESENTED.

HAMLET, a prince.
HORATIO, his friend.


ACT I.

SCENE I. A platform.

[Enter HAMLET and
HORATIO.]

HAMLET.
Who's there? [Aside.] Stand,
and unfold yourself.

HORATIO.
Friends to this ground.
[Exit.

Dead march. Enter the funeral of a king,
attended by lords.

HAMLET.
Sicilia.
Good night.
"""

ABBREVIATED_PLAY = """Title

ACT I.

Scene I. Elsinore.

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Good night.
Not a speaker, a stray verse block.

Ber.
Long live the king!
"""


def test_parse_play_with_upper_case_headings():
  assert shakespeare.parse_play(UPPER_PLAY) == [
      ("HAMLET", 0, "Who's there? Stand,"),      # [Aside.] dropped, spaces collapsed
      ("HAMLET", 0, "and unfold yourself."),
      ("HORATIO", 1, "Friends to this ground."),  # unclosed "[Exit." dropped
      ("HAMLET", 2, "Sicilia."),                  # a verse line ending in '.' is not a speaker
      ("HAMLET", 2, "Good night."),
  ]


def test_parse_play_with_abbreviated_mixed_case_headings():
  records = shakespeare.parse_play(ABBREVIATED_PLAY)
  assert records == [("Ber", 0, "Who's there?"),
                     ("Fran", 1, "Nay, answer me: stand, and unfold yourself."),
                     ("Ber", 2, "Long live the king!")]


def test_parse_play_skips_a_poem_without_act_headings():
  assert shakespeare.parse_play("SONNETS\n\nFrom fairest creatures we desire increase,\n") == []


def _write_folder(root):
  folder = os.path.join(root, "plays")
  os.makedirs(folder)
  for name, body in [("tests_gut.txt", UPPER_PLAY), ("tests_gut_f.txt", UPPER_PLAY),
                     ("abbrev_gut.txt", ABBREVIATED_PLAY), ("poem_gut.txt", "POEM\n\nA line.\n")]:
    with open(os.path.join(folder, name), "w") as f:
      f.write(body)
  with open(os.path.join(folder, "metadata.txt"), "w") as f:
    f.write("[tests_gut]\ntitle = The Tragedy of Tests\n\n[abbrev_gut]\ntitle = Abbrev\n")
  return folder


def test_load_records_reads_modern_editions_once_and_caches_parquet(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_FM_CACHE", str(tmp_path / "cache"))
  folder = _write_folder(str(tmp_path))
  records = shakespeare.load_records(folder)
  assert records.column_names == ["play", "speaker", "speech", "line"]
  # The folio copy (_gut_f) is ignored, the poem has no speakers: 3 + 5 lines.
  assert len(records) == 8
  assert records["play"][0] == "Abbrev" and records["play"][-1] == "The Tragedy of Tests"
  # Speech numbers run on across plays: Abbrev has speeches 0..2, Tests 3..5.
  assert records["speech"] == [0, 1, 2, 3, 3, 4, 5, 5]
  cached = os.listdir(tmp_path / "cache" / "parsed")
  assert len(cached) == 1 and cached[0].endswith(".parquet")
  again = shakespeare.load_records(folder)
  assert again.to_dict() == records.to_dict()

  keys, texts = shakespeare.speaker_texts(records)
  assert keys == [("Abbrev", "Ber"), ("Abbrev", "Fran"), ("The Tragedy of Tests", "HAMLET"),
                  ("The Tragedy of Tests", "HORATIO")]
  assert texts[0] == "Who's there? Long live the king!"


def test_missing_plays_name_the_fetch_command(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_FM_CACHE", str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="-m fedjax_fm.assets shakespeare"):
    shakespeare.load_records()
  with pytest.raises(FileNotFoundError, match="-m fedjax_fm.assets shakespeare"):
    shakespeare.load_records(str(tmp_path))  # a folder without play files


def test_next_char_windows_by_hand():
  x, y = shakespeare.next_char_windows("abcdef", seq_length=3, stride=1)
  assert [text.decode_char_ids(row) for row in x] == ["abc", "bcd", "cde"]
  assert text.decode_char_ids(y) == "def"
  x, y = shakespeare.next_char_windows("abcdef", seq_length=3, stride=2)
  assert [text.decode_char_ids(row) for row in x] == ["abc", "cde"]
  assert x.dtype == y.dtype == np.int32
  assert shakespeare.next_char_windows("abc", seq_length=3)[0].shape == (0, 3)


def test_char_tokenizer_pads_truncates_and_masks():
  encoded = text.CharTokenizer(max_length=4).encode(["ab", "abcdef", "a\u00e9"])
  assert encoded["input_ids"].tolist()[1] == text.char_ids("abcd").tolist()
  assert encoded["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
  assert encoded["input_ids"][0, 2] == text.PAD_ID and encoded["input_ids"][2, 1] == text.UNK_ID


# --- the real plays (cached by `python -m fedjax_fm.assets shakespeare`) -------------------------

@pytest.fixture(scope="module")
def real_records():
  try:
    folder = assets.path("shakespeare")
  except FileNotFoundError as e:
    pytest.skip(f"real plays not cached: {e}")
  return shakespeare.load_records(folder)


def test_real_plays_give_37_plays_and_1328_speaker_clients(real_records):
  columns = real_records.to_dict()  # column access of a Dataset iterates slowly; this is arrow
  plays = set(columns["play"])
  assert len(plays) == 37 and "Hamlet" in plays and "Sonnets" not in plays
  keys, texts = shakespeare.speaker_texts(real_records)
  assert len(keys) == 1328
  hamlet = texts[keys.index(("Hamlet", "Ham"))]
  assert "To be, or not to be" in hamlet and "[" not in hamlet
  start = columns["play"].index("Hamlet")
  assert list(zip(columns["speaker"][start:start + 2], columns["line"][start:start + 2])) == [
      ("Ber", "Who's there?"), ("Fran", "Nay, answer me: stand, and unfold yourself.")]


def test_real_next_char_federation(real_records):
  del real_records  # cached by the fixture
  train, test, keys = shakespeare.next_char_federation(max_windows_per_client=20, seed=0)
  # Every (play, speaker) with at least 2 windows of 80 characters, i.e. 82+ characters.
  assert train.num_clients == test.num_clients == len(keys) == 1146
  assert train.arrays["x"].shape[1:] == (80,) and train.arrays["x"].dtype == np.int32
  assert train.sizes.max() <= 16 and test.sizes.min() >= 1 and train.sizes.min() >= 1
  assert int(train.arrays["y"].max()) < text.CHAR_VOCAB_SIZE
  # In time order within a client, the next character is the window shifted by one.
  full_train, _, _ = shakespeare.next_char_federation(max_clients=3, seed=1)
  client = full_train.client(0)
  np.testing.assert_array_equal(client["x"][1, :-1], client["x"][0, 1:])
  assert client["x"][1, -1] == client["y"][0]


def test_real_play_and_speaker_classification(real_records):
  texts, labels, keys, names = shakespeare.classification_examples(
      real_records, target="play", unit="line", num_classes=8)
  assert len(names) == 8 and names[0] == "Coriolanus"  # the play with the most lines
  assert len(texts) == len(labels) == len(keys) and labels.dtype == np.int32
  assert set(np.unique(labels)) == set(range(8))
  assert np.bincount(labels).tolist() == sorted(np.bincount(labels).tolist(), reverse=True)
  texts, labels, _, names = shakespeare.classification_examples(
      real_records, target="speaker", unit="speech", num_classes=4)
  assert names[0] == "Ham (Hamlet)"
  assert all(isinstance(t, str) and t for t in texts)
  with pytest.raises(ValueError, match="unknown plays"):
    shakespeare.classification_examples(real_records, plays=["Hamlet", "Cardenio"])
