"""Tests for optimizers.clipping: global coordinate-wise clipping, exact and bisection."""

from __future__ import annotations

import math

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optimizers import ClipCoordinatewiseState, clip_coordinatewise, coordinatewise_threshold

METHODS = ["exact", "bisect"]
# Below this, the bisection's fused count may treat distinct magnitudes as equal
# (documented in optimizers.clipping).
TINY_EXACT = 2.0**-102


# ---------------------------------------------------------------------------
# float64 NumPy reference: concatenate, sort, index.
# ---------------------------------------------------------------------------


def _np_leaves(tree):
  return [np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x, np.float64)
          for x in jax.tree.leaves(tree)]


def ref_tau(tree, fraction):
  mags = np.concatenate([np.abs(x).ravel() for x in _np_leaves(tree)])
  mags[np.isnan(mags)] = np.inf
  k = math.floor(len(mags) * fraction + 1e-9)
  return np.sort(mags)[::-1][k]


def ref_clip(tree, tau, scale=1.0):
  def clip(x):
    xf = np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x, np.float64)
    hit = np.isfinite(xf) & (np.abs(xf) >= tau)
    return np.where(hit, np.sign(xf) * tau * scale, xf), hit

  pairs = [clip(x) for x in jax.tree.leaves(tree)]
  treedef = jax.tree.structure(tree)
  clipped = treedef.unflatten([p[0] for p in pairs])
  num_hit = sum(int(p[1].sum()) for p in pairs)
  return clipped, num_hit


def assert_close_to_ref(got, ref):
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
    tol = 2.0**-8 if g.dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=tol, atol=0)


def heavy_tailed_tree(seed: int, dtype_b=jnp.bfloat16) -> dict:
  """Several leaves: matrices, a stacked (layers, m, n) leaf, a scalar, bf16, heavy tails."""
  rng = np.random.default_rng(seed)
  return {
      "dense": {"kernel": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32),
                "bias": jnp.asarray(rng.standard_cauchy(11), dtype_b)},
      "stack": jnp.asarray(rng.standard_normal((3, 4, 6)) * 0.1, jnp.float32),
      "scale": jnp.asarray(rng.standard_normal(), jnp.float32),
      "head": jnp.asarray(rng.standard_cauchy((5, 13)), jnp.float32),
  }


threshold_fn = jax.jit(coordinatewise_threshold, static_argnames=("method", "bisect_steps"))


def apply(tx, tree):
  """One jitted update from a fresh state."""
  return jax.jit(tx.update)(tree, tx.init(tree))


# ---------------------------------------------------------------------------
# The threshold.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_matches_sort_reference(seed, method):
  tree = heavy_tailed_tree(seed)
  for fraction in [0.0, 0.013, 0.1, 0.37, 0.9, 0.999]:
    expected = ref_tau(tree, fraction)
    traced = threshold_fn(tree, jnp.float32(fraction), method=method)
    assert traced.dtype == jnp.float32
    assert float(traced) == expected, (fraction, float(traced), expected)
  # A Python fraction takes the concrete-rank path.
  assert float(coordinatewise_threshold(tree, 0.25, method=method)) == ref_tau(tree, 0.25)


@pytest.mark.parametrize("method", METHODS)
def test_threshold_rank_rounding(method):
  """k = floor(N * fraction) as written, despite binary rounding (0.57 * 100 = 56.99...)."""
  tree = {"a": jnp.arange(1.0, 101.0, dtype=jnp.float32)}
  for fraction in [0.57, 0.7, 0.29]:
    k = round(100 * fraction)
    expected = 100.0 - k  # magnitudes 100, 99, ...: the k-th largest (0-indexed) is 100 - k
    assert float(coordinatewise_threshold(tree, fraction, method=method)) == expected
    assert float(threshold_fn(tree, jnp.float32(fraction), method=method)) == expected


def test_bisect_equals_exact_bit_for_bit():
  """Default bisect_steps: the same float, on heavy-tailed values with ties, on more
  than 2^16 coordinates (the high/low count halves) and with bf16 leaves."""
  rng = np.random.default_rng(3)
  tie_values = rng.integers(1, 5, (200, 200)) * np.where(rng.random((200, 200)) < 0.5, -1, 1)
  tree = {
      "cauchy": jnp.asarray(rng.standard_cauchy((200, 150)), jnp.float32),
      "ties": jnp.asarray(tie_values, jnp.float32),
      "bf16": jnp.asarray(rng.standard_normal((64, 70)) * 1e-3, jnp.bfloat16),
      "tiny": jnp.asarray(rng.standard_normal(50) * 1e-20, jnp.float32),
  }
  fractions = jnp.asarray([0.0, 1e-4, 0.3, 0.6, 0.9999], jnp.float32)
  both = jax.jit(jax.vmap(lambda f: (coordinatewise_threshold(tree, f),
                                     coordinatewise_threshold(tree, f, method="bisect"))))
  exact, bisect = both(fractions)
  np.testing.assert_array_equal(np.asarray(exact), np.asarray(bisect))
  for f, e in zip(np.asarray(fractions), np.asarray(exact), strict=True):
    assert e == ref_tau(tree, float(f))


@pytest.mark.parametrize("steps", [10, 14, 18, 22, 26])
def test_bisect_with_fewer_steps_within_stated_bound(steps):
  """tau_s <= tau <= tau_s * exp(2^(8 - s)); clipped set a superset, extras in [tau_s, tau)."""
  rng = np.random.default_rng(steps)
  tree = {"a": jnp.asarray(rng.standard_cauchy((40, 50)), jnp.float32),
          "b": jnp.asarray(rng.lognormal(0.0, 3.0, 999), jnp.float32)}
  exact_tx = clip_coordinatewise(0.1)
  approx_tx = clip_coordinatewise(0.1, method="bisect", bisect_steps=steps)
  exact, exact_state = apply(exact_tx, tree)
  approx, approx_state = apply(approx_tx, tree)
  tau, tau_s = float(exact_state.threshold), float(approx_state.threshold)
  assert tau_s <= tau <= tau_s * math.exp(2.0 ** (8 - steps))
  for x, e, a in zip(jax.tree.leaves(tree), jax.tree.leaves(exact), jax.tree.leaves(approx),
                     strict=True):
    x, e, a = (np.asarray(v, np.float64) for v in (x, e, a))
    hit_exact, hit_approx = np.abs(x) >= tau, np.abs(x) >= tau_s
    assert np.all(hit_approx[hit_exact])
    extra = hit_approx & ~hit_exact
    assert np.all((np.abs(x[extra]) >= tau_s) & (np.abs(x[extra]) < tau))
    assert np.max(np.abs(e - a)) <= (tau - tau_s) * (1 + 1e-6) + 1e-30
  assert float(approx_state.clip_fraction) >= float(exact_state.clip_fraction)


# ---------------------------------------------------------------------------
# The transform.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_update_matches_reference(method, scale):
  tree = heavy_tailed_tree(5)
  n = sum(x.size for x in jax.tree.leaves(tree))
  tx = clip_coordinatewise(0.1, scale=scale, method=method)
  updates, state = apply(tx, tree)
  tau = ref_tau(tree, 0.1)
  expected, num_hit = ref_clip(tree, tau, scale)
  assert_close_to_ref(updates, expected)
  chex.assert_trees_all_equal_dtypes(updates, tree)
  assert isinstance(state, ClipCoordinatewiseState)
  assert state.threshold.dtype == state.clip_fraction.dtype == jnp.float32
  assert float(state.threshold) == np.float32(tau)
  assert float(state.clip_fraction) == pytest.approx(num_hit / n, rel=1e-6)
  assert num_hit >= math.floor(0.1 * n) + 1


@pytest.mark.parametrize("method", METHODS)
def test_ties_clip_the_whole_tie_block(method):
  """With ties at tau, every coordinate with |g| >= tau is clipped (more than k + 1)."""
  rng = np.random.default_rng(6)
  values = rng.integers(1, 4, (10, 10)).astype(np.float32) * rng.choice([-1.0, 1.0], (10, 10))
  tree = {"a": jnp.asarray(values[:4]), "b": jnp.asarray(values[4:].reshape(3, 2, 10))}
  fraction = 0.2  # k = 20 lands inside the block of |g| = 3 (about a third of 100)
  tx = clip_coordinatewise(fraction, scale=0.5, method=method)
  updates, state = apply(tx, tree)
  tau = ref_tau(tree, fraction)
  assert tau == 3.0
  expected, num_hit = ref_clip(tree, tau, 0.5)
  assert num_hit > 21
  assert_close_to_ref(updates, expected)
  assert float(state.clip_fraction) == pytest.approx(num_hit / 100)


def test_fraction_zero_is_identity():
  tree, scale = heavy_tailed_tree(7), 0.25
  tx = clip_coordinatewise(0.0, scale=scale)
  updates, state = apply(tx, tree)
  chex.assert_trees_all_equal(updates, tree)
  assert float(state.threshold) == 0 and float(state.clip_fraction) == 0
  # A traced fraction of 0 (inject_hyperparams) is the identity too; 0.1 is not.
  injected = optax.inject_hyperparams(clip_coordinatewise, static_args=("method",))
  for method in METHODS:
    tx = injected(fraction=0.0, scale=scale, method=method)
    updates, state = apply(tx, tree)
    chex.assert_trees_all_equal(updates, tree)
    assert float(state.inner_state.clip_fraction) == 0
    tx = injected(fraction=0.1, scale=scale, method=method)
    updates, _ = apply(tx, tree)
    assert_close_to_ref(updates, ref_clip(tree, ref_tau(tree, 0.1), scale)[0])


def test_fixed_threshold_and_scale():
  tree = heavy_tailed_tree(8)
  n = sum(x.size for x in jax.tree.leaves(tree))
  for threshold, scale in [(0.5, 1.0), (1.7, 0.3), (1e6, 2.0)]:
    tx = clip_coordinatewise(threshold=threshold, scale=scale)
    updates, state = apply(tx, tree)
    expected, num_hit = ref_clip(tree, np.float64(np.float32(threshold)), scale)
    assert_close_to_ref(updates, expected)
    assert float(state.threshold) == np.float32(threshold)
    assert float(state.clip_fraction) == pytest.approx(num_hit / n)
  injected = optax.inject_hyperparams(clip_coordinatewise)(threshold=1.7, scale=0.3)
  got, _ = jax.jit(injected.update)(tree, injected.init(tree))
  want, _ = apply(clip_coordinatewise(threshold=1.7, scale=0.3), tree)
  chex.assert_trees_all_close(got, want, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_permutation_invariance(method):
  """tau depends only on the multiset of magnitudes; outputs permute with the inputs."""
  rng = np.random.default_rng(9)
  tree = {"a": jnp.asarray(rng.standard_cauchy((6, 7)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32),
          "c": jnp.asarray(rng.standard_normal(17), jnp.float32)}
  flat, unravel = jax.flatten_util.ravel_pytree(tree)
  perm = rng.permutation(flat.size)
  permuted = unravel(flat[perm])
  tx = clip_coordinatewise(0.15, scale=0.7, method=method)
  out, state = apply(tx, tree)
  out_p, state_p = apply(tx, permuted)
  assert float(state.threshold) == float(state_p.threshold)
  assert float(state.clip_fraction) == float(state_p.clip_fraction)
  np.testing.assert_array_equal(jax.flatten_util.ravel_pytree(out)[0][perm],
                                jax.flatten_util.ravel_pytree(out_p)[0])


@pytest.mark.parametrize("method", METHODS)
def test_zero_gradients_give_zeros(method):
  tree = jax.tree.map(jnp.zeros_like, heavy_tailed_tree(10))
  tx = clip_coordinatewise(0.1, scale=0.5, method=method)
  updates, state = apply(tx, tree)
  chex.assert_trees_all_equal(updates, tree)
  assert np.isfinite(float(state.threshold)) and np.isfinite(float(state.clip_fraction))
  # Exact: tau = 0 (all tie at 0). Bisection: tau in [0, 2^-102] (module docstring).
  assert 0 <= float(state.threshold) <= (0 if method == "exact" else TINY_EXACT)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_gradients_stay_visible(method):
  """NaN/Inf pass through unchanged and rank as +inf; the rest is clipped as if they were
  the largest magnitudes (tau not poisoned)."""
  tree = heavy_tailed_tree(11)
  tree["head"] = tree["head"].at[0, 0].set(jnp.nan).at[1, 2].set(-jnp.inf)
  tree["dense"]["bias"] = tree["dense"]["bias"].at[3].set(jnp.nan)
  tx = clip_coordinatewise(0.2, method=method)
  updates, state = apply(tx, tree)
  assert np.isnan(float(updates["head"][0, 0])) and np.isnan(float(updates["dense"]["bias"][3]))
  assert float(updates["head"][1, 2]) == -np.inf
  tau = ref_tau(tree, 0.2)
  assert np.isfinite(tau) and float(state.threshold) == tau
  expected, num_hit = ref_clip(tree, tau)
  for g, r in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=2.0**-8)  # NaN == NaN here
  n = sum(x.size for x in jax.tree.leaves(tree))
  assert float(state.clip_fraction) == pytest.approx(num_hit / n)
  # More non-finite coordinates than k + 1: tau = inf, no finite coordinate changes.
  nan_tree = {"a": jnp.asarray([jnp.nan, jnp.nan, 1.0, -2.0, 3.0, jnp.inf])}
  tx = clip_coordinatewise(0.4, method=method)
  updates, state = apply(tx, nan_tree)
  np.testing.assert_array_equal(np.asarray(updates["a"]), np.asarray(nan_tree["a"]))
  assert float(state.threshold) == np.inf and float(state.clip_fraction) == 0


@pytest.mark.parametrize("method", METHODS)
def test_bf16_leaves_keep_dtype(method):
  rng = np.random.default_rng(12)
  tree = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16),
          "b": jnp.asarray(rng.standard_cauchy(8), jnp.bfloat16)}
  tx = clip_coordinatewise(0.3, scale=0.9, method=method)
  updates, state = apply(tx, tree)
  chex.assert_trees_all_equal_dtypes(updates, tree)
  assert state.threshold.dtype == jnp.float32
  tau = ref_tau(tree, 0.3)
  assert float(state.threshold) == tau  # a bf16 value, found exactly in float32
  assert_close_to_ref(updates, ref_clip(tree, tau, 0.9)[0])


@pytest.mark.parametrize("method", METHODS)
def test_float64_leaves_rank_in_float64(method):
  with jax.enable_x64(True):
    rng = np.random.default_rng(13)
    tree = {"a": jnp.asarray(rng.standard_normal((9, 7)), jnp.float64),
            "b": jnp.asarray(rng.standard_normal(30), jnp.float32)}
    tx = clip_coordinatewise(0.1, method=method)
    updates, state = apply(tx, tree)
    tau = ref_tau(tree, 0.1)
    assert float(coordinatewise_threshold(tree, 0.1, method=method)) == tau
    assert updates["a"].dtype == jnp.float64 and updates["b"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(updates["a"]), ref_clip(tree, tau)[0]["a"], rtol=1e-15)
    assert state.threshold.dtype == jnp.float32


def test_none_and_masked_leaves_are_ignored():
  rng = np.random.default_rng(14)
  w = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
  tree = {"w": w, "frozen": None, "masked": optax.MaskedNode()}
  tx = clip_coordinatewise(0.25)
  updates, state = apply(tx, tree)
  assert updates["frozen"] is None and updates["masked"] == optax.MaskedNode()
  assert_close_to_ref({"w": updates["w"]}, ref_clip({"w": w}, ref_tau({"w": w}, 0.25))[0])
  # Works inside optax.masked (MaskedNode in the inner updates) and on an empty tree.
  masked = optax.masked(clip_coordinatewise(0.25), {"w": True, "b": False})
  out, _ = apply(masked, {"w": w, "b": w})
  chex.assert_trees_all_equal(out["b"], w)
  assert_close_to_ref({"w": out["w"]}, {"w": np.asarray(updates["w"], np.float64)})
  empty, state = tx.update({}, tx.init({}))
  assert empty == {} and float(state.clip_fraction) == 0


def test_init_under_eval_shape_and_placeholder():
  tx = clip_coordinatewise(0.1)
  state = jax.eval_shape(tx.init, heavy_tailed_tree(0))
  assert state.threshold.shape == () and state.threshold.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({}, "fraction"),
        ({"fraction": 0.1, "threshold": 1.0}, "threshold"),
        ({"fraction": -0.1}, "fraction"),
        ({"fraction": 1.0}, "fraction"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": -1.0}, "threshold"),
        ({"fraction": 0.1, "scale": 0.0}, "scale"),
        ({"threshold": 1.0, "scale": -2.0}, "scale"),
        ({"fraction": 0.1, "method": "sort"}, "method"),
        ({"fraction": 0.1, "method": "bisect", "bisect_steps": 0}, "bisect_steps"),
    ],
)
def test_bad_input(kwargs, name):
  with pytest.raises(ValueError, match=name):
    clip_coordinatewise(**kwargs)


def test_bad_input_threshold_function():
  with pytest.raises(ValueError, match="fraction"):
    coordinatewise_threshold({"a": jnp.ones(3)}, 1.5)
  with pytest.raises(ValueError, match="method"):
    coordinatewise_threshold({"a": jnp.ones(3)}, 0.5, method="median")


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


def test_chain_with_adam_trains_a_toy_problem():
  """optax.chain(clip_coordinatewise(0.1), optax.adam(1e-3)) fits a regression with
  heavy-tailed noise; each step's update equals adam's on the clipped gradient."""
  rng = np.random.default_rng(15)
  x = jnp.asarray(rng.standard_normal((256, 16)), jnp.float32)
  w_true = {"w": jnp.asarray(rng.uniform(-0.4, 0.4, (16, 2)), jnp.float32),
            "b": jnp.asarray([0.2, -0.1], jnp.float32)}
  noise = jnp.asarray(0.01 * rng.standard_t(1.5, (256, 2)), jnp.float32)
  y = x @ w_true["w"] + w_true["b"] + noise

  def loss(p):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  params = jax.tree.map(jnp.zeros_like, w_true)
  tx = optax.chain(clip_coordinatewise(0.1), optax.adam(1e-3))
  reference = optax.adam(1e-3)

  @jax.jit
  def step(params, state, ref_state):
    g = jax.grad(loss)(params)
    updates, state = tx.update(g, state, params)
    clipped, _ = clip_coordinatewise(0.1).update(g, ClipCoordinatewiseState(
        jnp.float32(0), jnp.float32(0)))
    ref_updates, ref_state = reference.update(clipped, ref_state, params)
    return optax.apply_updates(params, updates), state, ref_state, updates, ref_updates

  state, ref_state = tx.init(params), reference.init(params)
  initial = float(loss(params))
  for _ in range(600):
    params, state, ref_state, updates, ref_updates = step(params, state, ref_state)
  chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6, atol=1e-9)
  assert float(loss(params)) < 0.05 * initial
  assert float(state[0].clip_fraction) >= math.floor(0.1 * 34 + 1e-9) / 34
