"""PCGrad over clients and the presence-masked mean, on hand-computed examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_fm import aggregate

KEY = jax.random.key(0)
# Jitted once per tree structure and option: eager dispatch of the loops is the slow part here.
pcgrad = jax.jit(aggregate.pcgrad, static_argnames="per_leaf")


# The hand examples share one tree shape ({"a": [2, 2], "b": [2, 1]}), so they share two
# compiled programs (flattened and per leaf).

def test_two_conflicting_gradients_lose_exactly_their_conflicting_components():
  # a0 = [1, 0], a1 = [-1, 1] (b is zero): <g0, g1> = -1, |g0|^2 = 1, |g1|^2 = 2.
  # g0~ = g0 - (-1 / 2) g1 = [0.5, 0.5];  g1~ = g1 - (-1 / 1) g0 = [0, 1].
  g = {"a": jnp.array([[1.0, 0.0], [-1.0, 1.0]]), "b": jnp.zeros((2, 1))}
  for per_leaf in (False, True):
    out = pcgrad(g, KEY, per_leaf=per_leaf)
    np.testing.assert_allclose(out["a"], [[0.5, 0.5], [0.0, 1.0]], atol=1e-7)
    np.testing.assert_array_equal(out["b"], g["b"])
    # What is left of each is orthogonal to the other's original gradient.
    np.testing.assert_allclose(out["a"][0] @ g["a"][1], 0.0, atol=1e-7)
    np.testing.assert_allclose(out["a"][1] @ g["a"][0], 0.0, atol=1e-7)


def test_non_conflicting_gradients_are_unchanged():
  g = {"a": jnp.array([[1.0, 2.0], [0.5, 0.0]]), "b": jnp.array([[1.0], [0.0]])}  # dot 0.5
  for per_leaf in (False, True):  # per leaf: <a0, a1> = 0.5, <b0, b1> = 0
    out = pcgrad(g, KEY, per_leaf=per_leaf)
    for name in g:
      np.testing.assert_array_equal(out[name], g[name])
  assert float(aggregate.conflict_fraction(g)) == 0.0


def test_per_leaf_projects_a_leaf_that_the_flattened_vector_does_not():
  # Leaf a conflicts (<a0, a1> = -1), leaf b agrees strongly (<b0, b1> = 4): the flattened
  # inner product is +3, so the flattened variant keeps both gradients; per leaf, a is
  # projected exactly as in the two-client example and b is untouched.
  g = {"a": jnp.array([[1.0, 0.0], [-1.0, 1.0]]), "b": jnp.array([[2.0], [2.0]])}
  flat = pcgrad(g, KEY)
  np.testing.assert_array_equal(flat["a"], g["a"])
  leafwise = pcgrad(g, KEY, per_leaf=True)
  np.testing.assert_allclose(leafwise["a"], [[0.5, 0.5], [0.0, 1.0]], atol=1e-7)
  np.testing.assert_array_equal(leafwise["b"], g["b"])


def test_three_clients_order_follows_the_key():
  # g0 = [1, 0], g1 = [-1, 1], g2 = [-1, -1]: <g0, g1> = <g0, g2> = -1, <g1, g2> = 0.
  # Client 0: g1 first gives [1, 0] + 1/2 [-1, 1] = [.5, .5], whose dot with g2 is -1, so then
  #   [.5, .5] + 1/2 [-1, -1] = [0, 0]; g2 first ends at [0, 0] as well.
  # Client 1: g0 first gives [-1, 1] + [1, 0] = [0, 1], whose dot with g2 is now -1, so then
  #   [0, 1] + 1/2 [-1, -1] = [-.5, .5]; g2 first (dot 0, kept) then g0 gives [0, 1].
  # Client 2: g0 first gives [0, -1], dot with g1 -1, then [-.5, -.5]; g1 first gives [0, -1].
  g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]])}
  for seed in range(4):
    key = jax.random.key(seed)
    orders = [list(np.asarray(jax.random.permutation(k, 3))) for k in jax.random.split(key, 3)]
    before = lambda row, a, b: orders[row].index(a) < orders[row].index(b)
    expected = [[0.0, 0.0],
                [-0.5, 0.5] if before(1, 0, 2) else [0.0, 1.0],
                [-0.5, -0.5] if before(2, 0, 1) else [0.0, -1.0]]
    np.testing.assert_allclose(pcgrad(g, key)["w"], expected, atol=1e-6)


def _reference(grads: np.ndarray, rng, valid) -> np.ndarray:
  """The textbook loop on flattened vectors, with the permutations pcgrad draws."""
  k = grads.shape[0]
  keys = jax.random.split(rng, k)
  out = grads.astype(np.float64).copy()
  for i in range(k):
    if not valid[i]:
      continue
    for j in np.asarray(jax.random.permutation(keys[i], k)):
      if j == i or not valid[j]:
        continue
      dot = out[i] @ grads[j]
      if dot < 0:
        out[i] -= dot / (grads[j] @ grads[j]) * grads[j]
  return out


def test_matches_a_plain_loop_with_random_orders_and_ignores_masked_clients():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(6, 5)).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 1, 1], bool)
  key = jax.random.key(3)
  tree = {"x": jnp.asarray(grads[:, :2]), "y": jnp.asarray(grads[:, 2:])}
  out = pcgrad(tree, key, mask=jnp.asarray(valid, jnp.float32))
  got = np.concatenate([out["x"], out["y"]], axis=1)
  np.testing.assert_allclose(got, _reference(grads, key, valid), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[2], grads[2])  # a padded slot is left as it is
  # Dropping the padded client's values entirely changes nothing for the others.
  other = grads.copy()
  other[2] = -100.0 * grads[0]
  out2 = pcgrad({"x": jnp.asarray(other[:, :2]), "y": jnp.asarray(other[:, 2:])}, key,
                          mask=jnp.asarray(valid, jnp.float32))
  np.testing.assert_allclose(np.concatenate([out2["x"], out2["y"]], 1)[valid], got[valid],
                             rtol=1e-6)


def test_result_does_not_depend_on_the_device_count():
  if len(jax.devices()) < 4:
    pytest.fail("tests/conftest.py should give 8 fake CPU devices")
  rng = np.random.default_rng(1)
  tree = {"a": jnp.asarray(rng.normal(size=(8, 3, 4)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)}
  key = jax.random.key(11)
  mask = jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
  fn = jax.jit(lambda t, m: aggregate.pcgrad_with_conflicts(t, key, per_leaf=True, mask=m))
  one = jax.device_put((tree, mask), jax.devices()[0])
  mesh = Mesh(np.array(jax.devices()[:4]), ("clients",))
  four = jax.device_put((tree, mask), NamedSharding(mesh, P("clients")))
  assert len(four[0]["a"].sharding.device_set) == 4
  (p1, f1), (p4, f4) = fn(*one), fn(*four)
  for name in tree:
    np.testing.assert_allclose(p4[name], p1[name], rtol=1e-5, atol=1e-6)
  assert float(f1) == float(f4)


def test_conflict_fraction_counts_pairs_of_valid_clients():
  # Pairs: (0,1) dot -1 conflicts; (0,2) dot 0 and (1,2) dot 0 do not -> 1/3.
  g = {"w": jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])}
  np.testing.assert_allclose(aggregate.conflict_fraction(g), 1.0 / 3.0)
  # Without client 1 no pair conflicts; with one valid client there is no pair at all.
  assert float(aggregate.conflict_fraction(g, jnp.array([1.0, 0.0, 1.0]))) == 0.0
  assert float(aggregate.conflict_fraction(g, jnp.array([1.0, 0.0, 0.0]))) == 0.0
  _, frac = jax.jit(aggregate.pcgrad_with_conflicts)(g, KEY)
  np.testing.assert_allclose(frac, 1.0 / 3.0)


def test_masked_weighted_mean_over_a_superset_tree():
  # Three clients from two groups: clients 0, 1 hold "enc" and "head_a"; client 2 holds "enc"
  # and "head_b". Absent leaves are stacked as zeros with presence 0.
  stacked = {"enc": jnp.array([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]]),
             "head_a": jnp.array([[4.0], [8.0], [0.0]]),
             "head_b": jnp.array([[0.0], [0.0], [6.0]]),
             "head_c": jnp.zeros((3, 1))}
  weights = jnp.array([1.0, 3.0, 2.0])
  presence = {"enc": jnp.array([1.0, 1.0, 1.0]), "head_a": jnp.array([1.0, 1.0, 0.0]),
              "head_b": jnp.array([0.0, 0.0, 1.0]), "head_c": jnp.zeros(3)}
  out = aggregate.masked_weighted_mean(stacked, weights, presence)
  # enc: (1*[1,2] + 3*[3,2] + 2*[5,8]) / 6 = [20, 24] / 6; head_a: (4 + 24) / 4 = 7;
  # head_b: only client 2 -> 6; head_c: nobody -> the default, zeros.
  np.testing.assert_allclose(out["enc"], [20.0 / 6.0, 4.0], rtol=1e-6)
  np.testing.assert_allclose(out["head_a"], [7.0])
  np.testing.assert_allclose(out["head_b"], [6.0])
  np.testing.assert_array_equal(out["head_c"], [0.0])
  kept = aggregate.masked_weighted_mean(stacked, weights, presence,
                                        old={k: jnp.full(v.shape[1:], -1.0)
                                             for k, v in stacked.items()})
  np.testing.assert_array_equal(kept["head_c"], [-1.0])
  np.testing.assert_allclose(kept["head_a"], [7.0])
