"""Property-based tests (hypothesis) of every public transformation.

Each property holds for all inputs, so hypothesis draws the values (and scales from
1e-30 to 1e30); shapes come from small fixed sets so that each jitted function
compiles once. Properties: scale equivariance/invariance, transpose equivariance,
permutation invariance, identity limits (rho = 0, aux_weight = 0, c -> infinity,
full rank with an SGD-like inner transform), idempotence.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optimizers
import regularizers
from _reference import random_tree

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)
exponents = st.integers(-30, 30)  # scales 1e-30 .. 1e30


def scaled(tree, s):
  """``s * tree`` rounded once to float32 (as a float32 multiplication would)."""
  return jax.tree.map(lambda x: np.float32(s) * np.asarray(x, np.float32), tree)


def assert_close(actual, expected, rtol):
  """``|actual - expected| <= rtol * max|expected|``, the max over the whole tree (float64)."""
  expected = jax.tree.map(lambda e: np.asarray(e, np.float64), expected)
  atol = rtol * max(float(np.max(np.abs(e), initial=0)) for e in jax.tree.leaves(expected))
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=0, atol=atol + 1e-300)


# ---------------------------------------------------------------------------
# Spectral clipping: H_{sc}(sX) = s H_c(X), H_c(X^T) = H_c(X)^T, c -> inf, hard o hard.
# ---------------------------------------------------------------------------

SPECTRAL_SHAPES = {"a": (3, 5), "b": (2, 5, 3), "v": (4,)}


@functools.cache
def spectral_clip_fn(mode: str):
  state = optimizers.spectral_clip(1.0).init(None)

  @jax.jit
  def clip(tree, c):  # c traced: one compilation for every threshold
    return optimizers.spectral_clip(c, mode=mode).update(tree, state)[0]

  return clip


@PROPERTY
@given(seed=seeds, exponent=exponents, c=st.sampled_from([0.3, 1.0, 2.5]),
       mode=st.sampled_from(["soft", "hard"]))
def test_spectral_clip_scale_transpose_limit_idempotence(seed, exponent, c, mode):
  clip = spectral_clip_fn(mode)
  x = random_tree(seed, SPECTRAL_SHAPES)
  x["at"] = x["a"].T
  out = clip(x, c)
  s = 10.0**exponent
  # scale equivariance H_{sc}(sX) = s H_c(X), from 1e-30 to 1e30
  assert_close(jax.tree.map(lambda y: np.asarray(y, np.float64) / s, clip(scaled(x, s), s * c)),
               out, rtol=2e-5)
  # transpose equivariance, and vectors pass through
  np.testing.assert_allclose(out["at"], out["a"].T, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(out["v"], x["v"])
  # c -> infinity is the identity
  big = 1e8 * max(float(np.linalg.norm(v)) for v in x.values())
  assert_close(clip(x, big), x, rtol=1e-6)
  if mode == "hard":  # min(min(s, c), c) = min(s, c)
    assert_close(clip(out, c), out, rtol=5e-4)


# ---------------------------------------------------------------------------
# Coordinate-wise clipping: permutation invariance, scale equivariance, exact == bisect.
# ---------------------------------------------------------------------------

CLIP_SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 2, 3)}


@functools.cache
def clip_coordinatewise_fn(method: str):
  state = optimizers.clip_coordinatewise(0.1).init(None)

  @jax.jit
  def clip(tree, fraction):
    if method == "threshold":
      return optimizers.clip_coordinatewise(threshold=fraction).update(tree, state)
    return optimizers.clip_coordinatewise(fraction, method=method).update(tree, state)

  return clip


def permute_tree(tree, perm):
  """Permutes all coordinates of ``tree`` across leaves, keeping the leaf shapes."""
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])[perm]
  leaves, treedef = jax.tree.flatten(tree)
  sizes = np.cumsum([x.size for x in leaves])[:-1]
  return treedef.unflatten([p.reshape(x.shape) for p, x in zip(np.split(flat, sizes), leaves,
                                                                strict=True)])


@PROPERTY
@given(seed=seeds, exponent=exponents, fraction=st.floats(0.01, 0.9))
def test_clip_coordinatewise_permutation_scale_and_methods(seed, exponent, fraction):
  g = random_tree(seed, CLIP_SHAPES, bounded_below=True)
  s = np.float32(10.0**exponent)
  perm = np.random.default_rng(seed + 1).permutation(sum(x.size for x in g.values()))
  exact, state = clip_coordinatewise_fn("exact")(g, fraction)
  for method in ("exact", "bisect"):
    clip = clip_coordinatewise_fn(method)
    # the bisection finds the exact threshold bit for bit, at any scale
    out_s, state_s = clip(scaled(g, s), fraction)
    chex.assert_trees_all_equal(out_s, scaled(exact, s))  # clip(s g) = s clip(g), exactly
    assert state_s.threshold == np.float32(s) * state.threshold
    assert state_s.clip_fraction == state.clip_fraction
    # the threshold is global over the tree: permuting coordinates across leaves commutes
    out_p, state_p = clip(permute_tree(g, perm), fraction)
    chex.assert_trees_all_equal(out_p, permute_tree(exact, perm))
    chex.assert_trees_all_equal(state_p, state)
  # a fixed threshold is idempotent: clipping twice is clipping once
  tau = float(np.median(np.abs(g["a"])))
  once, _ = clip_coordinatewise_fn("threshold")(g, tau)
  twice, _ = clip_coordinatewise_fn("threshold")(once, tau)
  chex.assert_trees_all_equal(once, twice)


# ---------------------------------------------------------------------------
# SAM: the perturbation does not depend on the gradient's scale; rho = 0 is the gradient.
# ---------------------------------------------------------------------------

SAM_VARIANTS = {"sam": {}, "asam": {"adaptive": True, "eta": 0.01}, "pinf": {"p": float("inf")}}
SAM_SHAPES = {"w": (3, 4), "b": (4,)}


def sam_loss(p):
  return jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["w"] @ p["b"]) + jnp.sum(p["b"] ** 4)


@functools.cache
def sam_fn(variant: str):
  kwargs = SAM_VARIANTS[variant]
  state = regularizers.sam(0.05).init(None)

  @jax.jit
  def run(grads, params, s, rho):
    e = regularizers.sam_perturbation(jax.tree.map(lambda g: s * g, grads), params, rho=rho,
                                      **kwargs)
    out, _ = regularizers.sam(rho, **kwargs).update(grads, state, params,
                                                    grad_fn=jax.grad(sam_loss))
    return e, out, jax.grad(sam_loss)(params)

  return run


@PROPERTY
@given(seed=seeds, exponent=exponents, variant=st.sampled_from(list(SAM_VARIANTS)))
def test_sam_perturbation_scale_invariant_and_rho_zero_is_plain_gradient(seed, exponent,
                                                                         variant):
  params = random_tree(seed, SAM_SHAPES)
  grads = jax.grad(sam_loss)(params)
  run = sam_fn(variant)
  e, _, _ = run(grads, params, 1.0, 0.05)
  e_s, _, _ = run(grads, params, 10.0**exponent, 0.05)
  assert_close(e_s, e, rtol=1e-6)
  _, out, plain = run(grads, params, 1.0, 0.0)
  chex.assert_trees_all_equal(out, plain)


# ---------------------------------------------------------------------------
# Gradient surgery: f(s g, s a) = s f(g, a); aux_weight = 0 returns g.
# ---------------------------------------------------------------------------

SURGERY = {  # eps = 0: Bloop's eps is an absolute offset of ||m||^2, not scale-free
    "bloop": (regularizers.bloop, {"eps": 0.0}),
    "bloop_per_leaf_after": (regularizers.bloop, {"projection": "per_leaf", "eps": 0.0,
                                                  "ema_order": "after", "decay": 0.5}),
    "mixed": (regularizers.mixed, {}),
    "pcgrad": (regularizers.pcgrad, {}),
    "dynamic_barrier": (regularizers.dynamic_barrier, {}),
}
SURGERY_SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


@functools.cache
def surgery_fn(name: str):
  factory, kwargs = SURGERY[name]

  @jax.jit
  def two_steps(g1, g2, a, s, lam):
    tx = factory(lam, **kwargs)
    state = tx.init(g1)
    mul = lambda t: jax.tree.map(lambda x: s * x, t)
    _, state = tx.update(mul(g1), state, aux_grads=mul(a))
    return tx.update(mul(g2), state, aux_grads=mul(a))[0]

  return two_steps


def pcgrad_reference(g, a, lam):
  """float64: the mixed direction, or pi(g; a) + lam pi(a; g) on conflict."""
  g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
  if g @ a >= 0:
    return g + lam * a
  return g - (g @ a) / (a @ a) * a + lam * (a - (g @ a) / (g @ g) * g)


@PROPERTY
@given(seed=seeds, exponent=exponents, lam=st.sampled_from([0.0, 0.3, 2.0]),
       name=st.sampled_from(list(SURGERY)))
def test_surgery_scale_equivariant_and_aux_weight_zero(seed, exponent, lam, name):
  g1, g2, a = (random_tree(seed + i, SURGERY_SHAPES) for i in range(3))
  step = surgery_fn(name)
  out = step(g1, g2, a, 1.0, lam)
  s = 10.0**exponent
  assert_close(jax.tree.map(lambda y: np.asarray(y, np.float64) / s, step(g1, g2, a, s, lam)),
               out, rtol=1e-5)
  if name == "pcgrad":
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
    np.testing.assert_allclose(flat, pcgrad_reference(g2, a, lam), rtol=1e-5, atol=1e-5)
  elif lam == 0.0:
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.asarray, g2))


@functools.cache
def perp_grad_fn():
  tx = regularizers.perp_grad()
  return jax.jit(lambda g, w, s, t: tx.update(jax.tree.map(lambda x: s * x, g), tx.init(w),
                                              jax.tree.map(lambda x: t * x, w))[0])


@PROPERTY
@given(seed=seeds, exponent=exponents, weight_exponent=exponents)
def test_perp_grad_scale_equivariant_in_g_invariant_in_w(seed, exponent, weight_exponent):
  g, w = random_tree(seed, SURGERY_SHAPES), random_tree(seed + 1, SURGERY_SHAPES)
  out = perp_grad_fn()(g, w, 1.0, 1.0)
  s, t = 10.0**exponent, 10.0**weight_exponent
  assert_close(jax.tree.map(lambda y: np.asarray(y, np.float64) / s,
                            perp_grad_fn()(g, w, s, t)), out, rtol=1e-5)


# ---------------------------------------------------------------------------
# Subspace: full rank with an SGD-like inner transform is the identity (or momentum).
# ---------------------------------------------------------------------------

SUBSPACE_SHAPES = {"a": (3, 5), "b": (5, 3), "c": (2, 4, 3), "v": (4,)}
RANK = 100  # above every dimension: clamped to min(m, n), the full orthonormal basis
SUBSPACE_CASES = {
    "dct-identity": (lambda: optimizers.dct_projector(RANK), optax.identity(), "keep"),
    "dct-momentum": (lambda: optimizers.dct_projector(RANK, update_every=2), optax.trace(0.9),
                     "rotate"),
    "svd-momentum": (lambda: optimizers.svd_projector(RANK, update_every=2), optax.trace(0.9),
                     "rotate"),
    "online_pca_frozen-identity": (
        lambda: optimizers.online_pca_projector(RANK, learning_rate=0.0), optax.identity(),
        "keep"),
}


@functools.cache
def subspace_fn(name: str):
  projector, inner, on_refresh = SUBSPACE_CASES[name]
  tx = optimizers.subspace(inner, projector(), on_refresh=on_refresh)
  reference = inner

  @jax.jit
  def three_steps(g1, g2, g3):
    state, ref_state = tx.init(g1), reference.init(g1)
    outs, refs = [], []
    for g in (g1, g2, g3):
      u, state = tx.update(g, state)
      r, ref_state = reference.update(g, ref_state)
      outs.append(u)
      refs.append(r)
    return outs, refs

  return three_steps


@PROPERTY
@given(seed=seeds, name=st.sampled_from(list(SUBSPACE_CASES)))
def test_subspace_full_rank_is_the_inner_transform(seed, name):
  grads = [random_tree(seed + i, SUBSPACE_SHAPES) for i in range(3)]
  outs, refs = subspace_fn(name)(*grads)
  assert_close(outs, refs, rtol=2e-6)


@functools.cache
def online_pca_fn():
  # The DCT start (scale-free bit for bit); the SVD start of a scaled G may differ in the
  # last bits (LAPACK rescales by magnitude), which Adam's sign-like first steps amplify.
  tx = optimizers.subspace(optax.identity(),
                           optimizers.online_pca_projector(2, learning_rate=0.1, init="dct"))

  @jax.jit
  def bases(g1, g2, g3, s):
    state = tx.init(g1)
    for g in (g1, g2, g3):
      _, state = tx.update(jax.tree.map(lambda x: s * x, g), state)
    return state.projector_state.basis

  return bases


@PROPERTY
@given(seed=seeds, exponent=st.integers(-100, 100))
def test_online_pca_basis_does_not_depend_on_gradient_scale(seed, exponent):
  """The online-PCA step normalises G by ||G||_F: the same basis, bit for bit, for G
  scaled by any power of two from 2^-100 (~1e-30) to 2^100 (~1e30). (Powers of two
  keep G / ||G|| exact; Adam's first step, sign(grad), would amplify rounding noise.)"""
  grads = [random_tree(seed + i, SUBSPACE_SHAPES) for i in range(3)]
  chex.assert_trees_all_equal(online_pca_fn()(*grads, 2.0**exponent),
                              online_pca_fn()(*grads, 1.0))


# ---------------------------------------------------------------------------
# Full optimizers and Sven: the step does not depend on the gradient's (residuals') scale.
# ---------------------------------------------------------------------------

ADAM_BASED = {
    "spectra_adamw": lambda: optimizers.spectra_adamw(0.1, max_singular_value=0.5),
    "dct_adamw": lambda: optimizers.dct_adamw(0.1, 2),
    "online_subspace_descent": lambda: optimizers.online_subspace_descent(0.1, 2),
}


@functools.cache
def adam_based_fn(name: str):
  tx = ADAM_BASED[name]()

  @jax.jit
  def two_steps(params, g1, g2, s):
    state = tx.init(params)
    u1, state = tx.update(jax.tree.map(lambda x: s * x, g1), state, params)
    u2, _ = tx.update(jax.tree.map(lambda x: s * x, g2), state, params)
    return u1, u2

  return two_steps


@PROPERTY
@given(seed=seeds, exponent=st.integers(-2, 3), name=st.sampled_from(list(ADAM_BASED)))
def test_adam_based_optimizers_invariant_to_gradient_scale(seed, exponent, name):
  """Adam's direction m / sqrt(v) is scale-free (up to eps = 1e-8 against |g| >~ 1e-5)."""
  params, g1, g2 = (random_tree(seed + i, SUBSPACE_SHAPES) for i in range(3))
  step = adam_based_fn(name)
  assert_close(step(params, g1, g2, 10.0**exponent), step(params, g1, g2, 1.0), rtol=1e-3)


SVEN = {"gram": {}, "matrix_free": {"method": "matrix_free", "oversampling": 1}}
NUM_SAMPLES = 5


@functools.cache
def sven_fn(method: str):
  tx = optimizers.scale_by_sven(3, **SVEN[method])

  @jax.jit
  def step(params, coef_a, coef_v, s):
    def residuals(p):  # (NUM_SAMPLES,)
      return s * (jnp.tanh(p["a"]).ravel() @ coef_a + p["v"] @ coef_v - 0.5)

    return tx.update(params, tx.init(params), params, residual_fn=residuals)[0]

  return step


@PROPERTY
@given(seed=seeds, exponent=st.integers(-3, 12), method=st.sampled_from(list(SVEN)))
def test_sven_invariant_to_residual_scale(seed, exponent, method):
  """pinv_k(s M) (s R) = pinv_k(M) R (while the singular values stay above the 1e-10
  cutoff and the Gram matrix below float32's overflow)."""
  rng = np.random.default_rng(seed)
  params = {"a": np.asarray(rng.standard_normal((3, 5)), np.float32),
            "v": np.asarray(rng.standard_normal(4), np.float32)}
  coef_a = np.asarray(rng.standard_normal((15, NUM_SAMPLES)), np.float32)
  coef_v = np.asarray(rng.standard_normal((4, NUM_SAMPLES)), np.float32)
  step = sven_fn(method)
  assert_close(step(params, coef_a, coef_v, 10.0**exponent), step(params, coef_a, coef_v, 1.0),
               rtol=1e-4)
