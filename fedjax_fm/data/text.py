"""Text to fixed-shape integer arrays: a character vocabulary and two tokenizers.

A tokenizer here is any object with `encode(texts) -> dict[str, np.ndarray]` whose arrays are
`[N, max_length]` int32 (so a federation of text clients has static shapes and a round compiles
once), plus `vocab_size` and `pad_id`:

- `CharTokenizer`: one id per character over the fixed `CHAR_VOCAB` (padding id 0, unknown id 1),
  the vocabulary of LEAF's Shakespeare next-character task (Caldas et al. 2018) and of the
  federation suite's char-level text inputs.
- `HFTokenizer`: a Hugging Face tokenizer folder (e.g. all-MiniLM-L6-v2's) padded and truncated
  to `max_length`, giving `input_ids`, `attention_mask` and `token_type_ids`.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

import numpy as np

PAD_ID = 0
UNK_ID = 1
# Printable characters of the plays and of the suite's questions; everything else maps to UNK.
CHAR_VOCAB = ("\n !\"&'(),-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
              "abcdefghijklmnopqrstuvwxyz")
_CHAR_TO_ID = {ch: i + 2 for i, ch in enumerate(CHAR_VOCAB)}
CHAR_VOCAB_SIZE = len(CHAR_VOCAB) + 2


def char_ids(text: str) -> np.ndarray:
  """`[len(text)]` int32 ids of the characters of `text` (unknown characters -> `UNK_ID`)."""
  return np.fromiter((_CHAR_TO_ID.get(ch, UNK_ID) for ch in text), np.int32, len(text))


def decode_char_ids(ids: Sequence[int]) -> str:
  """Inverse of `char_ids` (padding dropped, unknown shown as '?')."""
  out = []
  for i in ids:
    i = int(i)
    if i == PAD_ID:
      continue
    out.append("?" if i == UNK_ID else CHAR_VOCAB[i - 2])
  return "".join(out)


class TextTokenizer(Protocol):
  """What the data builders need of a tokenizer."""
  max_length: int
  vocab_size: int
  pad_id: int

  def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    ...


class CharTokenizer:
  """Character-level tokenizer over `CHAR_VOCAB` with a fixed length.

  `encode` returns `input_ids` (truncated or padded with `PAD_ID` on the right) and
  `attention_mask` (1 for a character, 0 for padding), both `[N, max_length]` int32.
  """

  vocab_size = CHAR_VOCAB_SIZE
  pad_id = PAD_ID

  def __init__(self, max_length: int):
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    self.max_length = max_length

  def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    ids = np.full((len(texts), self.max_length), PAD_ID, np.int32)
    for row, text in enumerate(texts):
      encoded = char_ids(text[:self.max_length])
      ids[row, :len(encoded)] = encoded
    return {"input_ids": ids, "attention_mask": (ids != PAD_ID).astype(np.int32)}


class HFTokenizer:
  """A Hugging Face tokenizer folder, padded and truncated to a fixed `max_length`.

  Uses the fast `tokenizers` library on the folder's `tokenizer.json` (a fraction of a second to
  load) and falls back to `transformers.AutoTokenizer` for folders without one. `encode` returns
  `input_ids`, `attention_mask` and `token_type_ids`, each `[N, max_length]` int32, identical to
  `AutoTokenizer(texts, padding="max_length", truncation=True, max_length=max_length)`.

  Args:
    folder: a local tokenizer folder (e.g. `fedjax_fm.assets.path("all-minilm-l6-v2")`).
    max_length: tokens per text, special tokens included.
  """

  def __init__(self, folder: str, max_length: int):
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"tokenizer folder {folder} does not exist; for MiniLM fetch it "
                              "with: python -m fedjax_fm.assets all-minilm-l6-v2")
    self.folder = folder
    self.max_length = max_length
    fast_file = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(fast_file):
      from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
      self._fast = Tokenizer.from_file(fast_file)
      pad_token = self._pad_token_from_config(folder) or "[PAD]"
      pad_id = self._fast.token_to_id(pad_token)
      self.pad_id = 0 if pad_id is None else int(pad_id)
      self._fast.enable_truncation(max_length)
      self._fast.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)
      self.vocab_size = int(self._fast.get_vocab_size())
      self._slow = None
    else:
      from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
      self._fast = None
      self._slow = AutoTokenizer.from_pretrained(folder)
      self.pad_id = int(self._slow.pad_token_id or 0)
      self.vocab_size = int(len(self._slow))

  @staticmethod
  def _pad_token_from_config(folder: str) -> str | None:
    config_file = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_file):
      return None
    with open(config_file) as f:
      pad = json.load(f).get("pad_token")
    return pad.get("content") if isinstance(pad, dict) else pad

  def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    texts = [str(t) for t in texts]
    if self._fast is not None:
      encodings = self._fast.encode_batch(texts)
      field = lambda name: np.array([getattr(e, name) for e in encodings], np.int32).reshape(
          len(texts), self.max_length)
      return {"input_ids": field("ids"), "attention_mask": field("attention_mask"),
              "token_type_ids": field("type_ids")}
    out = self._slow(texts, padding="max_length", truncation=True, max_length=self.max_length,
                     return_token_type_ids=True, return_attention_mask=True)
    return {k: np.asarray(out[k], np.int32).reshape(len(texts), self.max_length)
            for k in ("input_ids", "attention_mask", "token_type_ids")}


def minilm_tokenizer(max_length: int = 32) -> HFTokenizer:
  """The all-MiniLM-L6-v2 tokenizer from the asset cache (FileNotFoundError names the fetch)."""
  from fedjax_fm import assets  # pylint: disable=import-outside-toplevel
  return HFTokenizer(assets.path("all-minilm-l6-v2"), max_length)
