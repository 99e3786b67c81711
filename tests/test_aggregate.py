"""Server-side aggregators on hand-computed examples."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import aggregate


def test_weighted_mean():
  # (1*[1, 2] + 3*[5, 6]) / 4 = [4, 5]
  x = {"a": jnp.array([[1.0, 2.0], [5.0, 6.0]])}
  np.testing.assert_allclose(aggregate.weighted_mean(x, jnp.array([1.0, 3.0]))["a"], [4.0, 5.0])


def test_weighted_mean_of_nobody_is_zero_not_nan():
  x = {"a": jnp.array([[1.0], [2.0]])}
  np.testing.assert_array_equal(aggregate.weighted_mean(x, jnp.zeros(2))["a"], [0.0])


def test_masked_weighted_mean_per_leaf_presence():
  stacked = {"a": jnp.array([[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]]),
             "b": jnp.array([[10.0], [20.0], [30.0]])}
  weights = jnp.array([1.0, 1.0, 2.0])
  masks = {"a": jnp.array([1.0, 1.0, 0.0]),   # client 2 lacks "a": mean of 1 and 3 = 2
           "b": jnp.array([0.0, 0.0, 0.0])}   # nobody holds "b": keeps the old value
  old = {"a": jnp.array([-1.0, -1.0]), "b": jnp.array([7.0])}
  out = aggregate.masked_weighted_mean(stacked, weights, masks, old)
  np.testing.assert_allclose(out["a"], [2.0, 2.0])
  np.testing.assert_allclose(out["b"], [7.0])


def test_masked_weighted_mean_elementwise_masks():
  stacked = {"a": jnp.array([[1.0, 4.0], [3.0, 8.0]])}
  masks = {"a": jnp.array([[1.0, 0.0], [1.0, 0.0]])}  # element 1 held by nobody
  out = aggregate.masked_weighted_mean(stacked, jnp.array([1.0, 3.0]), masks,
                                       {"a": jnp.array([0.0, 5.0])})
  # element 0: (1*1 + 3*3) / 4 = 2.5; element 1 keeps 5.
  np.testing.assert_allclose(out["a"], [2.5, 5.0])


def test_coordinate_median_plain():
  x = {"a": jnp.array([[1.0, 100.0], [2.0, -5.0], [50.0, 0.0]])}
  np.testing.assert_allclose(aggregate.coordinate_median(x)["a"], [2.0, 0.0])


def test_coordinate_median_with_bucketing_averages_pairs_first():
  x = {"a": jnp.array([[0.0], [2.0], [4.0], [6.0]])}
  key = jax.random.key(3)
  perm = np.asarray(jax.random.permutation(key, 4))
  vals = np.array([0.0, 2.0, 4.0, 6.0])[perm]
  buckets = [(vals[0] + vals[1]) / 2, (vals[2] + vals[3]) / 2]
  out = aggregate.coordinate_median(x, key, bucket_size=2)
  np.testing.assert_allclose(out["a"], [np.median(buckets)])


def test_bucketing_with_a_remainder_bucket():
  x = {"a": jnp.arange(5.0)[:, None]}
  out = aggregate.bucket(x, jax.random.key(0), 2)["a"]
  assert out.shape == (3, 1)
  # Bucket means weighted by bucket sizes recover the total: 2*m0 + 2*m1 + 1*m2 = 0+1+2+3+4.
  np.testing.assert_allclose(2 * out[0, 0] + 2 * out[1, 0] + out[2, 0], 10.0, rtol=1e-6)


def test_coordinate_median_bucketing_needs_rng():
  with pytest.raises(ValueError, match="rng"):
    aggregate.coordinate_median({"a": jnp.zeros((4, 1))}, None, bucket_size=2)


def test_trimmed_mean_drops_extremes():
  x = {"a": jnp.array([[-100.0], [1.0], [2.0], [3.0], [100.0]])}
  np.testing.assert_allclose(aggregate.trimmed_mean(x, 0.2)["a"], [2.0])
  with pytest.raises(ValueError, match="trim_fraction"):
    aggregate.trimmed_mean(x, 0.5)


def test_finite_clients_and_zero_where_bad():
  x = {"a": jnp.array([[1.0, jnp.nan], [1.0, 2.0], [jnp.inf, 0.0]])}
  ok = aggregate.finite_clients(x)
  np.testing.assert_array_equal(ok, [False, True, False])
  z = aggregate.zero_where_bad(x, ok)
  np.testing.assert_array_equal(z["a"], [[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]])


def test_server_update_sgd_one_is_plain_averaging():
  params = {"w": jnp.array([1.0, 2.0])}
  opt = optax.sgd(1.0)
  new, _ = aggregate.server_update(opt, params, opt.init(params), {"w": jnp.array([0.5, -1.0])})
  np.testing.assert_allclose(new["w"], [1.5, 1.0])
  opt = optax.sgd(0.5)
  new, _ = aggregate.server_update(opt, params, opt.init(params), {"w": jnp.array([0.5, -1.0])})
  np.testing.assert_allclose(new["w"], [1.25, 1.5])
