"""Test setup: 8 fake CPU devices, so multi-device sharding is tested on any machine, and one
persistent compilation cache for the whole run (test processes and the launches they start),
so a program compiled by one test is not compiled again by another.

XLA reads the flag once, when jax first initialises its backend, so it must be set before any
test module imports jax.
"""

import os
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# Tests check values, not speed: XLA's CPU backend without its optimisation passes compiles the
# suite's hundreds of small programs about 2.5x faster (the same programs, the same results up
# to float rounding). Benchmarks and launches outside the tests keep the default level.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `.ci/run` points this at a fresh folder per run; locally it persists between runs.
os.environ.setdefault("FEDJAX_FM_COMPILATION_CACHE",
                      os.path.join(tempfile.gettempdir(), "fedjax_fm_test_jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["FEDJAX_FM_COMPILATION_CACHE"])
# Every program, however small: a test or launch that needs one another process compiled
# loads it (a few ms) instead of compiling it (0.03-0.5 s each, hundreds of them).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The slowest files (35-185 s each in CI's log) start first, slowest first: a long file started last keeps
# one worker busy while the other sits idle. `-n 2 --dist loadfile` hands files to the workers
# in collection order once xdist's own reordering (most tests first) is off, below. The order
# of the rest, and within each file, is unchanged.
SLOW_FIRST = ("test_readme.py", "test_train.py", "test_tap_launch.py", "test_multihost.py",
              "test_benchmark.py", "test_fedbone_launch.py", "test_tap.py",
              "test_feddat_launch.py", "test_feddat.py", "test_experiment.py", "test_fedpft.py",
              "test_fedpft_launch.py", "test_decoder_algorithms.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's --no-loadscope-reorder
    config.option.loadscopereorder = False
