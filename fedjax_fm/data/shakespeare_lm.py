"""Causal-LM fine-tuning data from Shakespeare: characters' speeches as clients' text.

Two disjoint parts of the plays (`fedjax_fm.data.shakespeare`):

- **pretraining text**: every speech of the `PRETRAIN_PLAYS` (seven plays with no role among
  the federation's largest), for a small decoder trained centrally first
  (`fedjax_fm.pretrain`), so federated fine-tuning starts from a model that already writes
  English verse;
- **the federation**: the other 30 plays; a client is one (play, speaker) role, as in LEAF,
  and its text is its speeches in order, one per line (a speech's lines joined by spaces).
  The `num_clients` roles with the most text take part.

Tokens are characters over `text.CHAR_VOCAB` (ids 2..; 0 is padding) for the pretrained
Shakespeare decoder, so no tokenizer file is needed and its vocabulary is
`text.CHAR_VOCAB_SIZE`; a downloaded Llama or Qwen folder brings its own tokenizer
(``data.tokenizer="model"``, `lm_tokenizer`). Each client's speeches are split in
time order, as LEAF splits Shakespeare: the first ``1 - test_fraction`` of them train, the rest
are its held-out speeches. Each side is cut into consecutive windows of `seq_len` characters
(the last one right-padded, ``attention_mask`` 0 on the padding), at most
`max_train_windows` / `max_test_windows` of them (the first ones of the test side, a random
subset of the train side). The metric is per-client perplexity on the held-out windows,
``exp`` of the mean next-character negative log-likelihood.

`sample_prompts` picks, for a few clients, the opening of their first held-out speech as a
generation prompt (`Federation.prompts`), so a run can show what personalization did to a
speaker's style.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from fedjax_fm.builders import Federation, SamplePrompts
from fedjax_fm.cohort import FederatedData
from fedjax_fm.data import shakespeare
from fedjax_fm.data import text as text_lib

# Held out of the federation for central pretraining: 7 plays, 791k characters of speech.
PRETRAIN_PLAYS = ("Coriolanus", "King Henry VI, Part 1", "King Henry VI, Part 2",
                  "King Henry VI, Part 3", "King Henry VIII", "The Tragedy of Titus Andronicus",
                  "Timon of Athens")
VOCAB_SIZE = text_lib.CHAR_VOCAB_SIZE


def _speeches(records) -> list[tuple[str, str, str]]:
  """(play, speaker, speech text) per speech, in the plays' order."""
  plays, speakers, speech_ids, lines = shakespeare._columns(records)  # pylint: disable=protected-access
  out: list[tuple[str, str, str]] = []
  last = None
  for play, speaker, speech, line in zip(plays, speakers, speech_ids, lines):
    key = (play, speaker, int(speech))
    if key != last:
      out.append((play, speaker, line))
      last = key
    else:
      out[-1] = (play, speaker, out[-1][2] + " " + line)
  return out


def pretrain_text(folder: str | None = None) -> tuple[str, str]:
  """The pretraining plays' speeches, one per line: (train, validation), the last 5% of each
  play's speeches in validation."""
  by_play: dict[str, list[str]] = {}
  for play, _, speech in _speeches(shakespeare.load_records(folder)):
    if play in PRETRAIN_PLAYS:
      by_play.setdefault(play, []).append(speech)
  missing = sorted(set(PRETRAIN_PLAYS) - set(by_play))
  if missing:
    raise ValueError(f"the Shakespeare asset has no play {missing}; refetch it with "
                     "`python -m fedjax_fm.assets shakespeare`")
  train, valid = [], []
  for play in PRETRAIN_PLAYS:
    speeches = by_play[play]
    cut = len(speeches) - max(1, len(speeches) // 20)
    train += speeches[:cut]
    valid += speeches[cut:]
  return "\n".join(train) + "\n", "\n".join(valid) + "\n"


def role_texts(folder: str | None = None) -> tuple[list[tuple[str, str]], list[list[str]]]:
  """Every (play, speaker) role of the federation's plays and its speeches, in order of first
  appearance."""
  roles: dict[tuple[str, str], list[str]] = {}
  for play, speaker, speech in _speeches(shakespeare.load_records(folder)):
    if play not in PRETRAIN_PLAYS:
      roles.setdefault((play, speaker), []).append(speech)
  return list(roles), list(roles.values())


@dataclasses.dataclass(frozen=True)
class LMTokenizer:
  """Text <-> token ids for language modelling: no special tokens, no padding, no truncation."""
  encode: Callable[[str], np.ndarray]
  decode: Callable[[Sequence[int]], str]
  vocab_size: int


CHARS = LMTokenizer(text_lib.char_ids, text_lib.decode_char_ids, VOCAB_SIZE)


def lm_tokenizer(spec: str, model_path: str | None = None) -> LMTokenizer:
  """``config.data.tokenizer``: ``"chars"`` (`CHARS`: the pretrained Shakespeare decoder's),
  ``"model"`` (the tokenizer of the ``config.model.path`` folder: a downloaded Llama or Qwen) or a
  tokenizer folder. A folder's ``tokenizer.json`` is read with the `tokenizers` library, else
  transformers' ``AutoTokenizer`` loads it.

  Raises:
    ValueError: ``"model"`` without a model folder; FileNotFoundError: no such folder.
  """
  if spec == "chars":
    return CHARS
  folder = model_path if spec == "model" else spec
  if folder is None:
    raise ValueError("config.data.tokenizer='model' needs config.model.path (a Hugging Face "
                     "folder with its tokenizer); use 'chars' for the pretrained Shakespeare model")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
  fast = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(fast):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    tok = Tokenizer.from_file(fast)
    return LMTokenizer(
        lambda t: np.asarray(tok.encode(t, add_special_tokens=False).ids, np.int32),
        lambda ids: tok.decode([int(i) for i in ids]), int(tok.get_vocab_size()))
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  tok = AutoTokenizer.from_pretrained(folder)
  return LMTokenizer(lambda t: np.asarray(tok.encode(t, add_special_tokens=False), np.int32),
                     lambda ids: tok.decode([int(i) for i in ids]), len(tok))


def windows(text: str, seq_len: int, tokenizer: LMTokenizer = CHARS
            ) -> tuple[np.ndarray, np.ndarray]:
  """Consecutive `seq_len`-token windows of `text` as (input_ids, attention_mask), each
  [n, seq_len] int32; the last window right-padded. A window shorter than 2 tokens (no
  next-token target) is dropped."""
  ids = tokenizer.encode(text)
  n = -(-len(ids) // seq_len)
  padded = np.zeros(n * seq_len, np.int32)
  padded[:len(ids)] = ids
  mask = np.zeros(n * seq_len, np.int32)
  mask[:len(ids)] = 1
  ids, mask = padded.reshape(n, seq_len), mask.reshape(n, seq_len)
  keep = mask.sum(1) >= 2
  return ids[keep], mask[keep]


@dataclasses.dataclass(frozen=True)
class RoleFederation:
  """`role_federation`'s result: the clients' windows and who they are."""
  train: FederatedData
  test: FederatedData
  roles: list[tuple[str, str]]      # (play, speaker) per client
  test_texts: list[str]             # each client's held-out speeches, one per line


def role_federation(*, num_clients: int, seq_len: int, test_fraction: float = 0.2,
                    max_train_windows: int | None = None, max_test_windows: int | None = None,
                    seed: int = 0, folder: str | None = None,
                    tokenizer: LMTokenizer = CHARS) -> RoleFederation:
  """The `num_clients` roles with the most text, as `input_ids` / `attention_mask` windows.

  Raises:
    ValueError: a bad size, or more clients than roles with speeches on both sides of the split.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"config.data.test_fraction must be in (0, 1), got {test_fraction}")
  if seq_len < 2 or num_clients < 1:
    raise ValueError(f"config.data.seq_len must be >= 2 and num_clients >= 1, got {seq_len} and "
                     f"{num_clients}")
  keys, speeches = role_texts(folder)
  eligible = [i for i, s in enumerate(speeches) if len(s) >= 2]
  if num_clients > len(eligible):
    raise ValueError(f"config.data.num_clients={num_clients}, but only {len(eligible)} roles have "
                     "two or more speeches; lower it")
  sizes = np.asarray([sum(len(x) for x in speeches[i]) for i in eligible])
  chosen = [eligible[i] for i in np.argsort(-sizes, kind="stable")[:num_clients]]
  rng = np.random.default_rng([seed, 0x11A])
  train, test, test_texts = [], [], []
  for i in chosen:
    s = speeches[i]
    cut = len(s) - max(1, int(round(test_fraction * len(s))))
    train_ids, train_mask = windows("\n".join(s[:cut]) + "\n", seq_len, tokenizer)
    test_text = "\n".join(s[cut:]) + "\n"
    test_ids, test_mask = windows(test_text, seq_len, tokenizer)
    if max_train_windows is not None and len(train_ids) > max_train_windows:
      keep = np.sort(rng.choice(len(train_ids), max_train_windows, replace=False))
      train_ids, train_mask = train_ids[keep], train_mask[keep]
    if max_test_windows is not None:
      test_ids, test_mask = test_ids[:max_test_windows], test_mask[:max_test_windows]
    train.append({"input_ids": train_ids, "attention_mask": train_mask})
    test.append({"input_ids": test_ids, "attention_mask": test_mask})
    test_texts.append(test_text)
  return RoleFederation(FederatedData.from_clients(train), FederatedData.from_clients(test),
                        [keys[i] for i in chosen], test_texts)


def sample_prompts(roles: list[tuple[str, str]], test_texts: list[str], clients: int,
                   prompt_chars: int, max_new_tokens: int,
                   tokenizer: LMTokenizer = CHARS) -> SamplePrompts:
  """Generation prompts for the first `clients` clients (the largest roles): the first
  `prompt_chars` characters of each one's first held-out speech that long, LEFT-padded to one
  length."""
  picks = list(range(min(clients, len(roles))))

  def opening(text):  # the first held-out speech as long as the prompt, else the longest
    speeches = [s for s in text.split("\n") if s]
    long = [s for s in speeches if len(s) >= prompt_chars]
    return (long[0] if long else max(speeches, key=len))[:prompt_chars]

  prompts = [opening(test_texts[c]) for c in picks]
  encoded = [tokenizer.encode(p) for p in prompts]
  width = max(len(e) for e in encoded)
  ids = np.zeros((len(picks), width), np.int32)
  mask = np.zeros((len(picks), width), np.int32)
  for row, e in enumerate(encoded):
    ids[row, width - len(e):] = e
    mask[row, width - len(e):] = 1
  return SamplePrompts(clients=np.asarray(picks, np.int32),
                       names=[f"{speaker} ({play})" for play, speaker in
                              (roles[c] for c in picks)],
                       prompts=prompts, input_ids=ids, attention_mask=mask,
                       max_new_tokens=max_new_tokens, decode=tokenizer.decode)


def shakespeare_lm_data(config) -> Federation:
  """``data.name`` ``"shakespeare_lm"``: `role_federation` from ``config.data`` (tokenizer,
  num_clients, seq_len, test_fraction, max_train_windows, max_test_windows, sample_clients,
  prompt_chars,
  sample_tokens; ``sample_clients`` 0 for no generation samples) and ``config.seed``."""
  d = config.data
  tokenizer = lm_tokenizer(d.tokenizer, config.model.get("path"))
  fed = role_federation(num_clients=d.num_clients, seq_len=d.seq_len,
                        test_fraction=d.test_fraction, max_train_windows=d.max_train_windows,
                        max_test_windows=d.max_test_windows, seed=config.seed,
                        tokenizer=tokenizer)
  prompts = (sample_prompts(fed.roles, fed.test_texts, d.sample_clients, d.prompt_chars,
                            d.sample_tokens, tokenizer) if d.sample_clients else None)
  return Federation(fed.train, fed.test, prompts=prompts)
