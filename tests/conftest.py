"""Test setup: 8 fake CPU devices, so multi-device sharding is tested on any machine.

XLA reads the flag once, when jax first initialises its backend, so it must be set before any
test module imports jax.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
