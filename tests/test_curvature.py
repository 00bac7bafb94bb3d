"""Tests for optimizers.curvature: Hessian-vector products, directional sharpness and
the top Hessian eigenvalue, against explicit float64 Hessians."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from _reference import mlp_problem
from optimizers import directional_sharpness, hessian_top_eigenvalue, hessian_vector_product


def mlp_loss(seed: int, dtype=jnp.float64):
  """The shared tiny tanh MLP regression (3-4-2, 5 samples) with its data closed over:
  ``params, loss(params)``."""
  params, (x, y), mse = mlp_problem(seed, sizes=(3, 4, 2), batch=5, dtype=dtype)
  x, y = np.asarray(x), np.asarray(y)  # cast to the params' dtype at each call
  return params, lambda p: mse(p, jnp.asarray(x, p["w1"].dtype), jnp.asarray(y, p["w1"].dtype))


def explicit_hessian(loss, params) -> np.ndarray:
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)


def random_direction(seed: int, params, dtype=None):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), dtype or p.dtype),
                      params)


def flat64(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def quadratic_problem(eigenvalues, seed: int):
  """L(w) = 0.5 w^T A w + c^T w over a two-leaf tree, A = Q diag(eigenvalues) Q^T."""
  eigenvalues = np.asarray(eigenvalues, np.float64)
  n = eigenvalues.size
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  a = (q * eigenvalues) @ q.T
  a = (a + a.T) / 2
  c = rng.standard_normal(n)
  params = {"m": jnp.asarray(rng.standard_normal((2, n // 4)), jnp.float32),
            "v": jnp.asarray(rng.standard_normal(n - n // 2), jnp.float32)}

  def loss(p):
    w = ravel_pytree(p)[0]
    return 0.5 * w @ jnp.asarray(a, w.dtype) @ w + jnp.asarray(c, w.dtype) @ w

  return params, loss, a


# ---------------------------------------------------------------------------
# Hessian-vector products and directional sharpness.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_hvp_and_sharpness_match_explicit_hessian_float64(seed):
  with jax.enable_x64(True):
    params, loss = mlp_loss(seed)
    h = explicit_hessian(loss, params)
    for k in range(3):
      v = random_direction(100 * seed + k, params)
      vf = flat64(v)
      np.testing.assert_allclose(flat64(hessian_vector_product(loss, params, v)), h @ vf,
                                 rtol=1e-10, atol=1e-12)
      s = directional_sharpness(loss, params, v)
      assert s.dtype == jnp.float64
      np.testing.assert_allclose(float(s), vf @ h @ vf / (vf @ vf), rtol=1e-10)


def test_sharpness_float32_against_float64_hessian():
  with jax.enable_x64(True):
    params64, loss = mlp_loss(2)
    h = explicit_hessian(loss, params64)
  params32 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params64)
  scale = np.abs(np.linalg.eigvalsh(h)).max()
  sharpness = jax.jit(directional_sharpness, static_argnums=0)
  for k in range(3):
    v = random_direction(7 + k, params32)
    vf = flat64(v)
    got = sharpness(loss, params32, v)
    assert got.dtype == jnp.float32
    assert abs(float(got) - vf @ h @ vf / (vf @ vf)) <= 1e-5 * scale


def test_sharpness_hand_derived_indefinite_diagonal():
  """L = sum(cos(w)) over the tree: H = diag(-cos(w)), S(v) = -sum(cos(w) v^2) / sum(v^2)."""
  rng = np.random.default_rng(3)
  params = {"a": jnp.asarray(rng.uniform(-3, 3, (4, 5)), jnp.float32),
            "b": jnp.asarray(rng.uniform(-3, 3, 7), jnp.float32)}

  def loss(p):
    return sum(jnp.sum(jnp.cos(x)) for x in jax.tree.leaves(p))

  for k in range(3):
    v = random_direction(20 + k, params)
    w, vf = flat64(params), flat64(v)
    expected = -np.sum(np.cos(w) * vf**2) / np.sum(vf**2)
    np.testing.assert_allclose(float(directional_sharpness(loss, params, v)), expected,
                               rtol=1e-5, atol=1e-6)


def test_sharpness_scale_invariance_zero_and_nan_direction():
  params, loss, _ = quadratic_problem(np.linspace(-2.0, 5.0, 12), seed=4)
  v = random_direction(5, params)
  s = float(directional_sharpness(loss, params, v))
  scaled = float(directional_sharpness(loss, params, jax.tree.map(lambda x: -3.0 * x, v)))
  assert scaled == pytest.approx(s, rel=1e-5)
  zero = directional_sharpness(loss, params, jax.tree.map(jnp.zeros_like, v))
  assert float(zero) == 0.0
  nan_v = {**v, "v": v["v"].at[0].set(jnp.nan)}
  assert np.isnan(float(directional_sharpness(loss, params, nan_v)))


def test_sharpness_bf16_params_computed_in_float32():
  params, loss, a = quadratic_problem(np.linspace(-1.0, 4.0, 8), seed=6)
  params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  v = random_direction(8, params, jnp.bfloat16)
  got = directional_sharpness(loss, params_bf16, v)
  assert got.dtype == jnp.float32
  vf = flat64(v)  # bf16 values, exactly
  np.testing.assert_allclose(float(got), vf @ a @ vf / (vf @ vf), rtol=1e-5)


# ---------------------------------------------------------------------------
# Top eigenvalue by power iteration.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "eigenvalues",
    [np.r_[7.0, np.linspace(-2.0, 3.0, 15)], np.r_[-6.0, np.linspace(-2.5, 3.0, 11)]],
    ids=["positive_dominant", "negative_dominant"],
)
def test_power_iteration_matches_eigvalsh(eigenvalues):
  params, loss, a = quadratic_problem(eigenvalues, seed=9)
  lam = np.linalg.eigvalsh(a)
  expected = lam[np.argmax(np.abs(lam))]
  top = jax.jit(hessian_top_eigenvalue, static_argnums=0, static_argnames="num_iters")
  got = top(loss, params, num_iters=40, key=jax.random.PRNGKey(1))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_power_iteration_mlp_float64():
  with jax.enable_x64(True):
    params, loss = mlp_loss(10)
    lam = np.linalg.eigvalsh(explicit_hessian(loss, params))
    order = np.argsort(-np.abs(lam))
    ratio = abs(lam[order[1]] / lam[order[0]])
    assert ratio < 0.9  # the problem has a gap, so 200 iterations converge
    got = float(hessian_top_eigenvalue(loss, params, num_iters=200, key=3))
    np.testing.assert_allclose(got, lam[order[0]], rtol=1e-8)
    # A Rayleigh quotient never exceeds the largest magnitude, even unconverged.
    few = float(hessian_top_eigenvalue(loss, params, num_iters=2, key=3))
    assert abs(few) <= abs(lam[order[0]]) * (1 + 1e-12)


def test_power_iteration_key_handling_and_zero_hessian():
  params, loss, _ = quadratic_problem(np.r_[5.0, np.linspace(-1.0, 1.0, 7)], seed=11)
  a = hessian_top_eigenvalue(loss, params, num_iters=3, key=0)
  b = hessian_top_eigenvalue(loss, params, num_iters=3)
  c = hessian_top_eigenvalue(loss, params, num_iters=3, key=jax.random.PRNGKey(0))
  d = hessian_top_eigenvalue(loss, params, num_iters=3, key=jax.random.key(0))
  assert float(a) == float(b) == float(c) == float(d)
  e = hessian_top_eigenvalue(loss, params, num_iters=3, key=1)
  assert float(e) != float(a)

  def linear(p):
    return sum(jnp.sum(2.0 * x) for x in jax.tree.leaves(p))

  assert float(hessian_top_eigenvalue(linear, params, num_iters=4)) == 0.0


@pytest.mark.parametrize("num_iters", [0, -1, 2.5])
def test_power_iteration_bad_num_iters(num_iters):
  params, loss, _ = quadratic_problem(np.ones(4), seed=12)
  with pytest.raises(ValueError, match="num_iters"):
    hessian_top_eigenvalue(loss, params, num_iters=num_iters)


def test_sharpness_and_eigenvalue_on_explicit_sharded_params():
  """Explicit-sharded parameters on an 8-device mesh give the unsharded results (the
  tree inner products must not ravel the sharded leaves)."""
  params, _ = mlp_loss(7, jnp.float32)
  direction = random_direction(8, params)

  def loss(p):  # couples the leaves with elementwise ops and sums only (any sharding)
    return (jnp.sum(jnp.tanh(p["w1"] * p["b1"]) ** 2)
            + jnp.sum(p["w2"] ** 4) * (1.0 + jnp.sum(jnp.sin(p["b1"]))))

  specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", "data"), "b2": P()}
  want_s = directional_sharpness(loss, params, direction)
  want_e = hessian_top_eigenvalue(loss, params, num_iters=8, key=3)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
    sp, sd = jax.tree.map(put, params, specs), jax.tree.map(put, direction, specs)
    got_s = jax.jit(lambda p, d: directional_sharpness(loss, p, d))(sp, sd)
    got_e = jax.jit(lambda p: hessian_top_eigenvalue(loss, p, num_iters=8, key=3))(sp)
  np.testing.assert_allclose(got_s, want_s, rtol=1e-5)
  np.testing.assert_allclose(got_e, want_e, rtol=1e-5)
