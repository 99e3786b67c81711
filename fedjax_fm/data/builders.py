"""Data builders of the launcher's table (`fedjax_fm.experiment.DATASETS`): config -> the
federation's train and test data (`fedjax_fm.builders.Federation`).

Each reads ``config.data`` and ``config.seed`` only; the algorithm-specific federations (FedBone's
multi-task suite, TAP's modality-task pairs) are built next to their algorithms' builders.
"""

from __future__ import annotations

from fedjax_fm.builders import Federation
from fedjax_fm.data import digits, partition, suite, text


def digits_data(config) -> Federation:
  """scikit-learn's digits (`fedjax_fm.data.digits`) partitioned by ``config.data.partition``."""
  arrays = digits.load_digits_arrays()
  spec = partition.PartitionConfig.from_mapping(config.data.partition)
  parts = partition.make_partition(spec, config.seed, labels=arrays["y"])
  train, test = partition.split_clients(arrays, parts, config.data.test_fraction, config.seed)
  return Federation(train, test)


def shakespeare_play_data(config) -> Federation:
  """Shakespeare speeches labelled with their play, tokenised for all-MiniLM-L6-v2
  (`fedjax_fm.data.suite.minilm_play_classification`)."""
  d = config.data
  train, test, _ = suite.minilm_play_classification(
      config.seed, partition=partition.PartitionConfig.from_mapping(d.partition),
      num_plays=d.num_plays, max_length=d.max_length, examples_per_play=d.examples_per_play,
      test_fraction=d.test_fraction, unit=d.unit)
  return Federation(train, test)


def digits_vqa_data(config) -> Federation:
  """Digit images with questions, one question family per client (FedDAT's domains); the
  family is each client's group in the summary."""
  d = config.data
  group = suite.digits_vqa_group(partition.PartitionConfig.from_mapping(d.partition),
                                 seed=config.seed, test_fraction=d.test_fraction,
                                 families=tuple(d.families),
                                 tokenizer=text.minilm_tokenizer(d.max_length))
  return Federation(group.train, group.test, list(group.client_keys))
