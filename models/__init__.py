"""Flax NNX models for fedjax_fm (installed as `fedjax_fm.models`)."""

from fedjax_fm.models.cnn import MLP, SimpleCNN
from fedjax_fm.models.tasks import classification_loss, functional

__all__ = ["MLP", "SimpleCNN", "classification_loss", "functional"]
