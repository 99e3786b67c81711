"""Meshes from config."""

import jax
import pytest

from fedjax_fm import sharding


def test_minus_one_takes_the_rest():
  mesh = sharding.make_mesh((("clients", -1), ("fsdp", 2)), devices=jax.devices()[:8])
  assert dict(mesh.shape) == {"clients": 4, "fsdp": 2}


def test_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match="no 'clients' axis"):
    sharding.make_mesh((("data", -1),))
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh((("clients", 3), ("fsdp", 2)), devices=jax.devices()[:8])
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.make_mesh((("clients", -1), ("fsdp", 3)), devices=jax.devices()[:8])


def test_check_divisible():
  mesh = sharding.make_mesh(devices=jax.devices()[:4])
  sharding.check_divisible(8, mesh, "cohort_size")
  with pytest.raises(ValueError, match="cohort_size=6 is not divisible"):
    sharding.check_divisible(6, mesh, "cohort_size")
