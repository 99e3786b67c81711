"""FedPFT's builder (`algorithms/fedpft_launch.py`): the tiny config runs end to end, the
server's public split is disjoint from the clients' plays, and bad variants are refused."""

import numpy as np
import pytest

from tests import tiny
from fedjax_fm.algorithms import fedpft_launch
from fedjax_fm.data import shakespeare


def test_fedpft_text_tiny_runs(tmp_path):
  history, _ = tiny.run_two_rounds(tiny.config("fedpft_text"), tmp_path)
  assert np.isfinite(history[-1]["train/loss"])


def test_public_split_holds_only_speeches_of_plays_no_client_holds():
  public = fedpft_launch.shakespeare_public_inputs(num_plays_held=4, count=6, max_length=16,
                                                   seed=0)
  assert public["input_ids"].shape == (6, 16)
  texts, labels, _, _ = shakespeare.classification_examples(
      shakespeare.load_records(), target="play", unit="speech", min_chars=20)
  assert (labels >= 4).sum() >= 6   # the pool the split is drawn from: other plays only
  with pytest.raises(ValueError, match="public_examples=.* lower"):
    fedpft_launch.shakespeare_public_inputs(num_plays_held=4, count=10**7, max_length=16,
                                            seed=0)


def test_unknown_variant_is_refused(tmp_path):
  config = tiny.config("fedpft_text")
  config.algorithm.hparams.variant = "half"
  with pytest.raises(ValueError, match=r"unknown fedpft variant 'half'"):
    tiny.run(config, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()
