"""Parameter roles: assignment by pattern, select/merge, sizes."""

import jax.numpy as jnp
import pytest

from fedjax_fm import roles


def _params():
  return {"backbone": {"kernel": jnp.zeros((4, 3))}, "adapter": {"w": jnp.zeros((3,))},
          "head": {"kernel": jnp.zeros((3, 2), jnp.bfloat16)}}


def test_assign_roles_by_pattern():
  r = roles.assign_roles(_params(), frozen=r"^backbone/", personal=r"^head/")
  assert r == {"backbone": {"kernel": "frozen"}, "adapter": {"w": "shared"},
               "head": {"kernel": "personal"}}


def test_unmatched_pattern_is_a_clear_error():
  with pytest.raises(ValueError, match="matches no parameter"):
    roles.assign_roles(_params(), personal=r"^classifier/")


def test_select_then_merge_round_trips():
  p = _params()
  r = roles.assign_roles(p, frozen=r"^backbone/", personal=r"^head/")
  shared = roles.select(p, r, roles.SHARED)
  assert shared["backbone"]["kernel"] is None and shared["adapter"]["w"] is not None
  back = roles.merge(roles.select(p, r, roles.PERSONAL), shared, roles.select(p, r, roles.FROZEN))
  assert back["backbone"]["kernel"] is p["backbone"]["kernel"]
  assert back["head"]["kernel"] is p["head"]["kernel"]


def test_counts_and_bytes():
  p = _params()
  r = roles.assign_roles(p, frozen=r"^backbone/", personal=r"^head/")
  assert roles.count(r, p, roles.FROZEN) == 12
  assert roles.tree_bytes(roles.select(p, r, roles.SHARED)) == 3 * 4
  assert roles.tree_bytes(roles.select(p, r, roles.PERSONAL)) == 6 * 2  # bfloat16


def test_unknown_role_rejected():
  with pytest.raises(ValueError, match="unknown role"):
    roles.select(_params(), roles.assign_roles(_params()), "global")
