"""The server end of every round: one chain of links over the stacked client updates.

A link is a pair of pure functions, optax-style, that closes over its hyperparameters::

    state = link.init(shared_params)
    step, state = link.update(step, state, key)

`Step` carries what flows along the chain: the client updates (`[K, ...]` until an aggregating
link reduces them to `[...]`), their weights and acceptance mask, the current shared
parameters, the clip norm in force (for the noise link) and the round's metrics. `chain(...)`
composes links in four stages, checked when it is built::

    client links (per-client: simulated attack, finite filter, compression, clipping)
    -> one aggregating link (weighted mean, DP mean, presence-masked mean, coordinate median,
       trimmed mean, norm-bounded mean)
    -> server links (Gaussian noise, privacy report)
    -> the server optimizer (any optax transformation fed -aggregate as a pseudo-gradient)

Link state lives in the server state (`ServerState.chain`; the optimizer's in
`ServerState.opt_state`), so it is checkpointed and a resumed run continues bit-identically. A
link may also keep personal per-client state (top-k's error-feedback residual), stacked on the
client axis with the algorithm's client state; it never leaves the client.

Example::

    server_chain = chain(finite_filter(), clip(1.0), dp_mean(), gaussian_noise(1.1),
                         server_optimizer(optax.sgd(1.0)))
    links, opt_state = server_chain.init(shared)
    out = server_chain.apply(shared, deltas, weights, ok, (links, opt_state), rng)

References: McMahan et al. 2018 (DP-FedAvg: clipping, noise on the sum, fixed denominator);
Andrew et al. 2021 (adaptive clipping to a norm quantile); Reddi et al. 2021 (server
optimizers); Yin et al. 2018 (median, trimmed mean); Karimireddy et al. 2022 (bucketing);
Sun et al. 2019 (norm bounding); Alistarh et al. 2017 (stochastic quantization); Stich et al.
2018, Karimireddy et al. 2019 (top-k with error feedback). docs/algorithms.md 7.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_fm import aggregate, byzantine as byzantine_lib

PyTree = Any

CLIENT, AGGREGATE, SERVER, OPTIMIZER = "client", "aggregate", "server", "optimizer"
_STAGES = (CLIENT, AGGREGATE, SERVER, OPTIMIZER)


@dataclasses.dataclass(frozen=True)
class Step:
  """What flows along the chain (a trace-time record; links return a `dataclasses.replace`d copy).

  Attributes:
    updates: the client updates `[K, ...]` (deltas: trained minus received), or their
      aggregate `[...]` after the aggregating link.
    weights: `[K]` client weights (0: padding or a dropped client).
    accepted: `[K]` bool, the clients whose update counts.
    real: `[K]` bool, the cohort's real (not padded) slots, fixed on entry.
    params: the current shared parameters; the optimizer link writes the new ones here.
    round: the number of rounds completed before this one (int32 scalar).
    clip_norm: the per-client L2 bound in force (set by a clipping link), or None.
    client: this link's per-client rows `[K, ...]` (its personal client state), or None.
    masks: presence masks with the structure of `updates` (leaves `[K]` or `[K, ...]`: which
      clients hold which leaves of a superset tree, TAP's groups), or None: all hold all.
    metrics: scalar metrics of the round, by name.
  """
  updates: PyTree
  weights: jax.Array
  accepted: jax.Array
  real: jax.Array
  params: PyTree
  round: jax.Array
  clip_norm: jax.Array | None = None
  client: PyTree = None
  masks: PyTree = None
  metrics: dict = dataclasses.field(default_factory=dict)

  def with_metrics(self, **metrics) -> "Step":
    return dataclasses.replace(self, metrics={**self.metrics, **metrics})


class Link(NamedTuple):
  """One transform of the server end.

  Attributes:
    name: what it is (in error messages).
    stage: ``"client"``, ``"aggregate"``, ``"server"`` or ``"optimizer"`` (see the module doc).
    init: (shared params) -> the link's server state (``()`` for a stateless link).
    update: (step, state, key) -> (step, state).
    init_client: (shared params) -> one client's personal state of this link, or None.
    upload_bytes: (shared params) -> bytes one client sends, where the link changes them
      (compression), or None.
  """
  name: str
  stage: str
  init: Callable[[PyTree], Any]
  update: Callable[[Step, Any, jax.Array], tuple[Step, Any]]
  init_client: Callable[[PyTree], PyTree] | None = None
  upload_bytes: Callable[[PyTree], int] | None = None


class ChainState(NamedTuple):
  """A chain's server state: one entry per non-optimizer link, and the optimizer's state."""
  links: tuple
  optimizer: Any


class ChainOutput(NamedTuple):
  """What `Chain.apply` returns.

  Attributes:
    params: the new shared parameters (unchanged when no client was accepted).
    state: the new `ChainState` (likewise unchanged then).
    client: the links' new per-client rows `[K, ...]` (a tuple, one per link; None entries
      for links without client state); the algorithm scatters them back with its own rows.
    accepted: `[K]` bool, the clients whose update counted.
    aggregate: the aggregated update before server links (noise) and the optimizer.
    metrics: the links' scalar metrics.
  """
  params: PyTree
  state: ChainState
  client: tuple
  accepted: jax.Array
  aggregate: PyTree
  metrics: dict


class Chain(NamedTuple):
  """Links applied in order; build with `chain(...)`."""
  links: tuple[Link, ...]

  @property
  def has_client_state(self) -> bool:
    return any(link.init_client is not None for link in self.links)

  def init(self, params: PyTree) -> ChainState:
    *rest, opt = self.links
    return ChainState(links=tuple(link.init(params) for link in rest), optimizer=opt.init(params))

  def init_clients(self, params: PyTree, num_clients: int) -> tuple:
    """The links' personal client state, stacked `[num_clients, ...]` (None per stateless
    link)."""
    def stacked(link):
      if link.init_client is None:
        return None
      return jax.tree_util.tree_map(lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype),
                                    link.init_client(params))
    return tuple(stacked(link) for link in self.links)

  def upload_bytes(self, params: PyTree, plain: int) -> int:
    """Bytes one client sends per round: the last compressing link's count, else `plain`."""
    sizes = [link.upload_bytes(params) for link in self.links if link.upload_bytes]
    return sizes[-1] if sizes else plain

  def apply(self, params: PyTree, updates: PyTree, weights: jax.Array, mask: jax.Array,
            state: ChainState, rng: jax.Array, *, round_num: jax.Array | None = None,
            client: tuple | None = None, masks: PyTree | None = None) -> ChainOutput:
    """Runs the chain on one round's client updates.

    Args:
      params: the current shared parameters.
      updates: client-stacked updates `[K, ...]` with the structure of `params`.
      weights: `[K]` client weights; > 0 marks a real client.
      mask: `[K]` bool, the clients the algorithm found healthy (its own checks: personal
        rows, losses); the finite filter narrows it to finite updates.
      state: the chain's state (`ChainState` or a `(links, optimizer)` pair).
      rng: the round's aggregation key. The aggregating link draws from it as given (so a
        median's bucketing is the one the algorithm always had); every other link i draws from
        `fold_in(rng, i + 1)`.
      round_num: rounds completed before this one (for per-round reports); 0 if None.
      client: the links' per-client rows `[K, ...]` (`init_clients`' structure), or None.
      masks: per-leaf presence masks (`Step.masks`; read by `presence_mean`), or None.

    Returns:
      A `ChainOutput`. With no accepted client (no weight left) the parameters and every
      link's state stay as they were, optimizer moments included.
    """
    links_state, opt_state = state
    client = client if client is not None else (None,) * len(self.links)
    step = Step(updates=updates, weights=weights, accepted=jnp.asarray(mask, bool),
                real=weights > 0, params=params, masks=masks,
                round=jnp.zeros((), jnp.int32) if round_num is None else round_num)
    new_states, new_client, agg = [], [], None
    for i, (link, link_state, rows) in enumerate(
        zip(self.links, tuple(links_state) + (opt_state,), client)):
      key = rng if link.stage == AGGREGATE else jax.random.fold_in(rng, i + 1)
      step, link_state = link.update(dataclasses.replace(step, client=rows), link_state, key)
      new_states.append(link_state)
      new_client.append(step.client if link.init_client is not None else None)
      if link.stage == AGGREGATE:
        agg = step.updates
    new = ChainState(links=tuple(new_states[:-1]), optimizer=new_states[-1])
    old = ChainState(links=tuple(links_state), optimizer=opt_state)
    # With no accepted client the server must not move (not even optimizer moments).
    any_ok = jnp.any(step.weights > 0)
    new_params, new = aggregate.keep_if(any_ok, (step.params, new), (params, old))
    return ChainOutput(params=new_params, state=new, client=tuple(new_client),
                       accepted=step.accepted, aggregate=agg, metrics=step.metrics)


def chain(*links: Link) -> Chain:
  """Composes links: client links, exactly one aggregating link, server links, and the server
  optimizer last.

  Raises:
    ValueError: links out of stage order, no or two aggregators, no optimizer at the end, or
      a noise link without a clipping link before the aggregator.
  """
  stages = [link.stage for link in links]
  if not links or stages[-1] != OPTIMIZER or stages.count(OPTIMIZER) != 1:
    raise ValueError(f"a chain ends with exactly one server optimizer link; got {stages}")
  if stages.count(AGGREGATE) != 1:
    raise ValueError(f"a chain has exactly one aggregating link; got {stages}")
  order = [_STAGES.index(s) for s in stages]
  if order != sorted(order):
    raise ValueError(f"chain links must run client -> aggregate -> server -> optimizer; got "
                     f"{[(link.name, link.stage) for link in links]}")
  names = [link.name for link in links]
  if "gaussian_noise" in names and not {"clip", "adaptive_clip"} & set(names):
    raise ValueError("gaussian_noise is calibrated to a clip norm: put clip or adaptive_clip "
                     "before the aggregator")
  return Chain(tuple(links))


def _stateless(params):
  del params
  return ()


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def client_norms(stacked: PyTree) -> jax.Array:
  """[K]: each client's L2 norm over its whole (flattened) update, in float32."""
  leaves = jax.tree_util.tree_leaves(stacked)
  k = leaves[0].shape[0]
  sq = sum(jnp.sum(jnp.square(x.reshape(k, -1).astype(jnp.float32)), axis=1) for x in leaves)
  return jnp.sqrt(sq)


def scale_clients(stacked: PyTree, factor: jax.Array) -> PyTree:
  """Multiplies client k's update by factor[k]."""
  return jax.tree_util.tree_map(lambda x: x * _bcast(factor, x).astype(x.dtype), stacked)


def _clip_to(stacked: PyTree, bound: jax.Array) -> tuple[PyTree, jax.Array, jax.Array]:
  """Scales each client's update to L2 norm <= bound; returns (clipped, norms, was_clipped)."""
  norms = client_norms(stacked)
  factor = jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-30))
  return scale_clients(stacked, factor), norms, norms > bound


def _fraction(flags: jax.Array, among: jax.Array) -> jax.Array:
  return jnp.sum(flags & among) / jnp.maximum(jnp.sum(among), 1)


# ---- client links ---------------------------------------------------------------------------

def finite_filter() -> Link:
  """Drops clients whose update has a non-finite element: their rows become zeros (so a NaN
  cannot leak through 0 * NaN) and their weights 0. Every chain starts with it."""
  def update(step, state, key):
    del key
    ok = step.accepted
    if jax.tree_util.tree_leaves(step.updates):  # nothing shared (Local): nothing to check
      ok = ok & aggregate.finite_clients(step.updates)
    return dataclasses.replace(step, updates=aggregate.zero_where_bad(step.updates, ok),
                               weights=jnp.where(ok, step.weights, 0.0), accepted=ok), state
  return Link("finite_filter", CLIENT, _stateless, update)


def clip(clip_norm: float) -> Link:
  """Per-client L2 clipping to a fixed norm: u_k <- u_k * min(1, C / ||u_k||), the norm over
  the client's whole update (McMahan et al. 2018). Metric ``clipped_fraction``.

  Example::

      u = {"w": [[3., 4.], [0.3, 0.4]]}    # norms 5 and 0.5; clip(1.0) -> [[0.6, 0.8], [0.3, 0.4]]
  """
  if not (clip_norm > 0 and math.isfinite(clip_norm)):
    raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm}")

  def update(step, state, key):
    del key
    bound = jnp.asarray(clip_norm, jnp.float32)
    clipped, _, over = _clip_to(step.updates, bound)
    step = dataclasses.replace(step, updates=clipped, clip_norm=bound)
    return step.with_metrics(clipped_fraction=_fraction(over, step.accepted & step.real)), state
  return Link("clip", CLIENT, _stateless, update)


def adaptive_clip(initial_clip: float, target_quantile: float = 0.5,
                  learning_rate: float = 0.2, count_noise_std: float = 0.0) -> Link:
  """Per-client clipping to a norm that tracks a quantile of the clients' update norms
  (Andrew, Thakkar, McMahan, Ramaswamy 2021, geometric update).

  Each round clips to the current C, then with the noised centred count
  b = (sum_k (1[||u_k|| <= C] - 1/2) + N(0, s^2)) / n + 1/2 over the n real clients,
  C <- C * exp(-learning_rate * (b - target_quantile)). The state is C. With DP the count is
  noised (`count_noise_std` s; its sensitivity is 1/2) and the updates' noise multiplier is
  raised to pay for it (`fedjax_fm.privacy.update_noise_multiplier`).

  Metrics ``clip_norm`` (in force this round) and ``clipped_fraction``.
  """
  if not (initial_clip > 0 and math.isfinite(initial_clip)):
    raise ValueError(f"initial_clip must be a positive finite number, got {initial_clip}")
  if not 0.0 < target_quantile < 1.0:
    raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
  if not (learning_rate > 0 and count_noise_std >= 0):
    raise ValueError("adaptive_clip needs learning_rate > 0 and count_noise_std >= 0")

  def init(params):
    del params
    return jnp.asarray(initial_clip, jnp.float32)

  def update(step, bound, key):
    clipped, norms, over = _clip_to(step.updates, bound)
    counted = step.accepted & step.real
    n = jnp.maximum(jnp.sum(step.real), 1).astype(jnp.float32)
    centred = jnp.sum(jnp.where(counted, (norms <= bound) - 0.5, 0.0)).astype(jnp.float32)
    if count_noise_std:
      centred = centred + count_noise_std * jax.random.normal(key, (), jnp.float32)
    new_bound = bound * jnp.exp(-learning_rate * (centred / n + 0.5 - target_quantile))
    step = dataclasses.replace(step, updates=clipped, clip_norm=bound)
    return step.with_metrics(clip_norm=bound, clipped_fraction=_fraction(over, counted)), new_bound
  return Link("adaptive_clip", CLIENT, init, update)


def quantize(bits: int) -> Link:
  """Stochastic uniform quantization of each client's upload to `bits` (8 or 4) signed levels
  (QSGD-style, Alistarh et al. 2017): per client and leaf, s = max|u| / (2^(bits-1) - 1) and
  u -> s * floor(u / s + U[0, 1)), an unbiased estimate. The server sees the dequantized
  update. Upload: ceil(n * bits / 8) bytes per leaf plus one float32 scale.

  Example::

      u = [1.0, 0.5, -0.25], bits 8: s = 1/127; 0.5 * 127 = 63.5 -> 63 or 64 with prob. 1/2.
  """
  if bits not in (4, 8):
    raise ValueError(f"quantize supports 8 or 4 bits, got {bits}")
  levels = 2 ** (bits - 1) - 1

  def update(step, state, key):
    leaves, treedef = jax.tree_util.tree_flatten(step.updates)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for x, k in zip(leaves, keys):
      flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
      scale = jnp.max(jnp.abs(flat), axis=1, keepdims=True) / levels
      safe = jnp.where(scale > 0, scale, 1.0)
      q = jnp.floor(flat / safe + jax.random.uniform(k, flat.shape))
      q = jnp.clip(q, -levels, levels)
      out.append((q * scale).reshape(x.shape).astype(x.dtype))
    return dataclasses.replace(step, updates=jax.tree_util.tree_unflatten(treedef, out)), state

  def upload_bytes(params):
    return sum(-(-math.prod(x.shape) * bits // 8) + 4
               for x in jax.tree_util.tree_leaves(params))
  return Link(f"int{bits}", CLIENT, _stateless, update, upload_bytes=upload_bytes)


def _topk_count(size: int, fraction: float) -> int:
  return max(1, int(math.ceil(fraction * size)))


def top_k(fraction: float, error_feedback: bool = True) -> Link:
  """Top-k sparsification of each client's upload, per leaf: only the ceil(fraction * n)
  largest-magnitude coordinates are sent (value and int32 index each). With error feedback
  (Stich et al. 2018; Karimireddy et al. 2019) each client adds its residual e (what it has not
  yet sent) before selecting, and keeps e <- (u + e) - sent as personal client state.

  Example::

      u = [0.1, -3., 2.], e = [0.5, 0., 0.], fraction 1/3: v = [0.6, -3., 2.] -> sends
      [0, -3, 0], keeps e = [0.6, 0, 2.].
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"top_k fraction must be in (0, 1], got {fraction}")

  def update(step, state, key):
    del key
    residual = step.client if error_feedback else None

    def leaf(x, e):
      k_clients = x.shape[0]
      v = x if e is None else x + e.astype(x.dtype)
      flat = v.reshape(k_clients, -1)
      k = _topk_count(flat.shape[1], fraction)
      _, idx = jax.lax.top_k(jnp.abs(flat), k)
      keep = jnp.zeros(flat.shape, bool).at[jnp.arange(k_clients)[:, None], idx].set(True)
      sent = jnp.where(keep, flat, 0.0).reshape(x.shape)
      return sent, v - sent

    if residual is None:
      sent = jax.tree_util.tree_map(lambda x: leaf(x, None)[0], step.updates)
      return dataclasses.replace(step, updates=sent), state
    pairs = jax.tree_util.tree_map(leaf, step.updates, residual)
    is_pair = lambda p: isinstance(p, tuple)
    sent = jax.tree_util.tree_map(lambda p: p[0], pairs, is_leaf=is_pair)
    left = jax.tree_util.tree_map(lambda p: p[1], pairs, is_leaf=is_pair)
    return dataclasses.replace(step, updates=sent, client=left), state

  def upload_bytes(params):
    return sum(_topk_count(math.prod(x.shape), fraction) * (np.dtype(x.dtype).itemsize + 4)
               for x in jax.tree_util.tree_leaves(params))

  init_client = (lambda params: jax.tree_util.tree_map(jnp.zeros_like, params)) \
      if error_feedback else None
  return Link("top_k", CLIENT, _stateless, update, init_client=init_client,
              upload_bytes=upload_bytes)


def byzantine(attack: byzantine_lib.ByzantineAttack) -> Link:
  """Simulated attackers (`fedjax_fm.byzantine`): floor(fraction * real clients) of the
  accepted clients, drawn from the round key, send their attack (-scale * u, scale * u, or
  noise) instead of their update. A measurement tool: it goes first, before the finite filter,
  as the clients' uploads would. Metric ``num_attackers``."""
  if attack.client_ids is not None:
    raise ValueError("the chain's byzantine link draws attackers by fraction; fixed client ids "
                     "are FFGG's option")

  def update(step, state, key):
    choose_key, attack_key = jax.random.split(key)
    weights = jnp.where(step.accepted, step.weights, 0.0)
    ids = jnp.arange(weights.shape[0], dtype=jnp.int32)
    attackers = byzantine_lib.choose_attackers(choose_key, attack, ids, weights)
    attacked = byzantine_lib.apply_attack(step.updates, attackers, attack, attack_key)
    return dataclasses.replace(step, updates=attacked).with_metrics(
        num_attackers=jnp.sum(attackers)), state
  return Link("byzantine", CLIENT, _stateless, update)


# ---- aggregating links ----------------------------------------------------------------------

def _aggregating(name: str, reduce: Callable[[Step, jax.Array], PyTree]) -> Link:
  def update(step, state, key):
    return dataclasses.replace(step, updates=reduce(step, key)), state
  return Link(name, AGGREGATE, _stateless, update)


def weighted_mean() -> Link:
  """sum_k w_k u_k / sum_k w_k over the accepted clients (FedAvg's aggregate)."""
  return _aggregating("weighted_mean",
                      lambda step, key: aggregate.weighted_mean(step.updates, step.weights))


def presence_mean() -> Link:
  """The weighted mean over only the clients that hold each leaf (`Step.masks`;
  `aggregate.masked_weighted_mean`); a leaf nobody holds does not move. The aggregation of a
  superset tree whose client groups hold different parts of it (TAP)."""
  return _aggregating("presence_mean", lambda step, key: aggregate.masked_weighted_mean(
      step.updates, step.weights, step.masks))


def dp_mean() -> Link:
  """DP-FedAvg's estimator: sum of the accepted clients' updates, each with weight 1, over the
  fixed number n of real clients in the cohort (McMahan et al. 2018, fixed denominator), so one
  client moves the result by at most C / n whatever the others send."""
  def reduce(step, key):
    del key
    n = jnp.maximum(jnp.sum(step.real), 1)
    return jax.tree_util.tree_map(
        lambda x: jnp.sum(jnp.where(_bcast(step.accepted, x), x, 0.0), axis=0) / n.astype(x.dtype),
        step.updates)
  return _aggregating("dp_mean", reduce)


def coordinate_median(bucket_size: int = 1) -> Link:
  """Coordinate-wise median over every slot of the cohort, after random bucketing of
  `bucket_size` (`aggregate.coordinate_median`). A dropped or padded slot votes for zero."""
  if bucket_size < 1:
    raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
  return _aggregating("coordinate_median", lambda step, key: aggregate.coordinate_median(
      step.updates, key, bucket_size))


def trimmed_mean(trim_fraction: float) -> Link:
  """Coordinate-wise mean over every slot after dropping the floor(trim_fraction * K) largest
  and smallest (`aggregate.trimmed_mean`)."""
  if not 0.0 <= trim_fraction < 0.5:
    raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
  return _aggregating("trimmed_mean",
                      lambda step, key: aggregate.trimmed_mean(step.updates, trim_fraction))


def norm_bounded_mean(bound: float | None = None) -> Link:
  """Weighted mean after scaling every update to L2 norm <= M (Sun et al. 2019): M = `bound`,
  or, if None, the median norm of the accepted real clients this round (so a few scaled-up
  attackers cannot raise it). Metric ``norm_bound``."""
  if bound is not None and not bound > 0:
    raise ValueError(f"norm bound must be positive, got {bound}")

  def update(step, state, key):
    del key
    norms = client_norms(step.updates)
    counted = step.accepted & step.real
    if bound is None:
      m = jnp.nanmedian(jnp.where(counted, norms, jnp.nan))
      m = jnp.where(jnp.isfinite(m), m, 0.0)
    else:
      m = jnp.asarray(bound, jnp.float32)
    factor = jnp.where(norms > m, m / jnp.maximum(norms, 1e-30), 1.0)
    mean = aggregate.weighted_mean(scale_clients(step.updates, factor), step.weights)
    return dataclasses.replace(step, updates=mean).with_metrics(norm_bound=m), state
  return Link("norm_bounded_mean", AGGREGATE, _stateless, update)


# ---- server links ---------------------------------------------------------------------------

def gaussian_noise(noise_multiplier: float) -> Link:
  """Adds N(0, (z C / n)^2) to every coordinate of the aggregate: noise z C on the sum of the
  clipped updates, divided by the n real clients of the cohort like the `dp_mean` it follows
  (McMahan et al. 2018). C is the clip norm in force this round. Metric ``noise_std``."""
  if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
    raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")

  def update(step, state, key):
    if step.clip_norm is None:
      raise ValueError("gaussian_noise needs a clipping link earlier in the chain")
    n = jnp.maximum(jnp.sum(step.real), 1).astype(jnp.float32)
    std = noise_multiplier * step.clip_norm / n
    leaves, treedef = jax.tree_util.tree_flatten(step.updates)
    keys = jax.random.split(key, max(len(leaves), 1))
    noisy = [x + (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
             for x, k in zip(leaves, keys)]
    return dataclasses.replace(step, updates=jax.tree_util.tree_unflatten(treedef, noisy)
                               ).with_metrics(noise_std=std), state
  return Link("gaussian_noise", SERVER, _stateless, update)


def privacy_report(epsilons: Sequence[float]) -> Link:
  """Reports ``privacy/epsilon``: `epsilons[r]` after round r + 1 (computed before the run by
  `fedjax_fm.privacy`; the accountant runs on the host, this link only looks it up)."""
  table = np.asarray(epsilons, np.float32)
  if table.ndim != 1 or not len(table):
    raise ValueError("privacy_report needs one epsilon per round")

  def update(step, state, key):
    del key
    eps = jnp.asarray(table)[jnp.minimum(step.round, len(table) - 1)]
    return step.with_metrics(**{"privacy/epsilon": eps}), state
  return Link("privacy_report", SERVER, _stateless, update)


def server_optimizer(optimizer: optax.GradientTransformation) -> Link:
  """The server optimizer fed the pseudo-gradient -aggregate (Reddi et al. 2021;
  `aggregate.server_update`): `optax.sgd(1.0)` is FedAvg, `optax.adam` FedAdam."""
  def update(step, opt_state, key):
    del key
    params, opt_state = aggregate.server_update(optimizer, step.params, opt_state, step.updates)
    return dataclasses.replace(step, params=params), opt_state
  return Link("server_optimizer", OPTIMIZER, optimizer.init, update)


# ---- a chain from config --------------------------------------------------------------------

AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bounded_mean")
COMPRESSIONS = ("int8", "int4", "top_k")


@dataclasses.dataclass(frozen=True)
class ChainConfig:
  """The server end an algorithm's round ends in (``config.aggregation`` and
  ``config.privacy``, made by `fedjax_fm.builders.chain_config`); the algorithm adds its own
  server optimizer. Hashable, closed over, never a pytree leaf.

  Attributes:
    aggregator: ``"mean"`` (weighted), ``"median"`` (coordinate-wise after bucketing),
      ``"trimmed_mean"`` or ``"norm_bounded_mean"``.
    bucket_size, trim_fraction, norm_bound: their knobs (norm_bound None: the cohort's median
      norm).
    compression: None, ``"int8"``, ``"int4"`` or ``"top_k"`` (of `top_k_fraction`, with
      `error_feedback`).
    clip_norm: user-level DP's per-client clip (the initial one with `adaptive_clip`); None:
      no clipping, no privacy. With a clip the aggregate is `dp_mean` (uniform weights, fixed
      denominator) whatever the algorithm's `weighted`.
    adaptive_clip, target_quantile, clip_learning_rate, count_noise_std: `adaptive_clip`.
    noise_multiplier: z of `gaussian_noise` (0: clipping without noise).
    epsilons: epsilon after each round, reported as ``privacy/epsilon`` (None: not reported).
    attack: simulated Byzantine clients (`fedjax_fm.byzantine.ByzantineAttack`, by fraction),
      or None.
  """
  aggregator: str = "mean"
  bucket_size: int = 2
  trim_fraction: float = 0.1
  norm_bound: float | None = None
  compression: str | None = None
  top_k_fraction: float = 0.01
  error_feedback: bool = True
  clip_norm: float | None = None
  adaptive_clip: bool = False
  target_quantile: float = 0.5
  clip_learning_rate: float = 0.2
  count_noise_std: float = 0.0
  noise_multiplier: float = 0.0
  epsilons: tuple[float, ...] | None = None
  attack: byzantine_lib.ByzantineAttack | None = None

  def __post_init__(self):
    if self.aggregator not in AGGREGATORS:
      raise ValueError(f"unknown aggregator {self.aggregator!r}; use one of {AGGREGATORS}")
    if self.compression is not None and self.compression not in COMPRESSIONS:
      raise ValueError(f"unknown compression {self.compression!r}; use one of {COMPRESSIONS} "
                       "or None")
    if self.clip_norm is not None and self.aggregator != "mean":
      raise ValueError(f"user-level DP (a clip norm) aggregates with the DP mean; it cannot be "
                       f"combined with aggregator={self.aggregator!r}")
    if self.noise_multiplier and self.clip_norm is None:
      raise ValueError("a noise multiplier needs a clip norm (the noise is calibrated to it)")

  @property
  def compresses(self) -> bool:
    return self.compression is not None


def build_chain(config: ChainConfig, optimizer: optax.GradientTransformation, *,
                presence: bool = False) -> Chain:
  """[simulated attack] -> finite filter -> [compression] -> [projection] -> [clip] -> aggregator -> [noise]
  -> [privacy report] -> the server optimizer.

  Compression comes first because it happens on the client before the upload; clipping and
  noise act on what the server receives, so the DP bound holds for the compressed update too.
  With `presence` the aggregator is `presence_mean` (clients hold parts of a superset tree);
  it takes no clipping or other aggregator.
  """
  if presence and (config.clip_norm is not None or config.aggregator != "mean"):
    raise ValueError("an algorithm whose client groups hold different parts of the model "
                     "aggregates with the presence-masked mean: no DP clipping and no "
                     f"aggregator={config.aggregator!r}")
  links = [] if config.attack is None else [byzantine(config.attack)]
  links.append(finite_filter())
  if config.compression in ("int8", "int4"):
    links.append(quantize(int(config.compression[3:])))
  elif config.compression == "top_k":
    links.append(top_k(config.top_k_fraction, config.error_feedback))
  if presence:
    links.append(presence_mean())
  elif config.clip_norm is not None:
    links.append(adaptive_clip(config.clip_norm, config.target_quantile,
                               config.clip_learning_rate, config.count_noise_std)
                 if config.adaptive_clip else clip(config.clip_norm))
    links.append(dp_mean())
  elif config.aggregator == "mean":
    links.append(weighted_mean())
  elif config.aggregator == "median":
    links.append(coordinate_median(config.bucket_size))
  elif config.aggregator == "trimmed_mean":
    links.append(trimmed_mean(config.trim_fraction))
  else:
    links.append(norm_bounded_mean(config.norm_bound))
  if config.noise_multiplier:
    links.append(gaussian_noise(config.noise_multiplier))
  if config.epsilons is not None:
    links.append(privacy_report(config.epsilons))
  links.append(server_optimizer(optimizer))
  return chain(*links)
