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


def test_results_sweep_overrides_name_real_hparams_and_ablate_one_alignment_each():
  """benchmarks/fedpft_experiments.py: every override names a key of the `small` config, and
  each ablation switches off exactly the alignment it names."""
  from benchmarks import fedpft_experiments
  small = tiny.config("fedpft_text", "small")

  def with_overrides(method):
    c = tiny.config("fedpft_text", "small")
    for flag in fedpft_experiments.METHODS[method]:
      path, value = flag.removeprefix("--config.").split("=")
      *parents, leaf = path.split(".")
      node = c
      for p in parents:
        node = node[p]
      assert leaf in node, flag
      node[leaf] = type(node[leaf])(value)
    return c.algorithm.hparams

  assert small.model.num_layers == 4 and small.data.partition.kind == "iid"
  base = with_overrides("fedpft")
  assert base.layer_align_steps > 0 and base.align_every > 0 and base.variant == "fedpft"
  no_layer, no_neuron = with_overrides("no_layer_align"), with_overrides("no_neuron_align")
  assert (no_layer.layer_align_steps, no_layer.align_every) == (0, base.align_every)
  assert (no_neuron.layer_align_steps, no_neuron.align_every) == (base.layer_align_steps, 0)
  assert [with_overrides(m).keep_neurons for m in ("keep192", "fedpft", "keep768")] == \
      [192, 384, 768]
  assert {with_overrides(m).variant for m in ("full", "fedot")} == {"full", "fedot"}
