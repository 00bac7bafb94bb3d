"""Tests for optimizers.clipped_adam: Pan & Li's clipped Adam against a NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _reference import random_tree
from optimizers import clip_coordinatewise, clipped_adamw, scale_by_clipped_adam

# Rectangular both ways, a stacked leading axis and a vector.
SHAPES = {"a": (3, 5), "b": (5, 3), "c": (2, 3, 4), "v": (4,)}


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def reference(grads, params, fraction, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, wd=0.0,
              lr=1.0):
  """Pan & Li's clipped AdamW, float64, one coordinate vector; returns per-step (m, v, u)."""
  m = np.zeros_like(params)
  v = np.zeros_like(params)
  w = params.copy()
  out = []
  for t, g in enumerate(grads, start=1):
    mags = np.sort(np.abs(g))[::-1]
    tau = mags[int(np.floor(g.size * fraction))]
    c = np.where(np.abs(g) >= tau, np.sign(g) * tau, g) if fraction > 0 else g
    m = b1 * m + (1 - b1) * c
    v = b2 * v + (1 - b2) * g * g
    u = -lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t) + eps_root) + eps) + wd * w)
    w = w + u
    out.append((m.copy(), v.copy(), u.copy()))
  return out


@pytest.mark.parametrize("fraction,b1,b2,eps_root",
                         [(0.1, 0.9, 0.999, 0.0), (0.3, 0.8, 0.95, 1e-6)], ids=["k0.1", "k0.3"])
def test_moments_and_updates_after_three_steps(fraction, b1, b2, eps_root):
  rng = np.random.default_rng(int(100 * fraction))
  params = random_tree(rng, SHAPES)
  # Heavy-tailed gradients so that clipping matters.
  grads = [jax.tree.map(lambda x: x ** 3, random_tree(rng, SHAPES, scale=2.0)) for _ in range(3)]
  tx = clipped_adamw(0.01, fraction, b1, b2, eps_root=eps_root, weight_decay=0.1)
  state = tx.init(params)
  step = jax.jit(tx.update)
  ref = reference([flat(g) for g in grads], flat(params), fraction, b1, b2, eps_root=eps_root,
                  wd=0.1, lr=0.01)
  p = params
  for g, (m, v, u) in zip(grads, ref, strict=True):
    updates, state = step(g, state, p)
    p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(flat(state[0].mu), m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(flat(state[0].nu), v, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(flat(updates), u, rtol=1e-4, atol=1e-7)
  assert int(state[0].count) == 3
  # Some coordinates were clipped, and the second moment is NOT that of the clipped gradient.
  assert float(state[0].clip.clip_fraction) > 0
  chained = optax.chain(clip_coordinatewise(fraction), optax.scale_by_adam(b1, b2))
  cstate = chained.init(params)
  for g in grads:
    _, cstate = chained.update(g, cstate, params)
  assert not np.allclose(flat(cstate[1].nu), ref[-1][1], rtol=1e-3)
  np.testing.assert_allclose(flat(cstate[1].mu), ref[-1][0], rtol=1e-5, atol=1e-7)


def test_fraction_zero_is_adamw():
  rng = np.random.default_rng(1)
  params = random_tree(rng, SHAPES)
  grads = [random_tree(rng, SHAPES) for _ in range(3)]
  ours, theirs = clipped_adamw(1e-2, 0.0, weight_decay=0.05), optax.adamw(1e-2, weight_decay=0.05)
  s1, s2 = ours.init(params), theirs.init(params)
  for g in grads:
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = theirs.update(g, s2, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-9)


def test_bf16_zeros_mu_dtype_and_nan():
  rng = np.random.default_rng(2)
  params = random_tree(rng, SHAPES, jnp.bfloat16)
  grads = random_tree(rng, SHAPES, jnp.bfloat16)
  tx = scale_by_clipped_adam(0.2, mu_dtype=jnp.float32)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(state.mu))
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(state.nu))
  # Against the float64 reference of the bf16 gradient: bf16 output rounding only.
  _, _, u = reference([flat(grads)], flat(params), 0.2)[0]
  np.testing.assert_allclose(flat(updates), -u, rtol=1e-2, atol=1e-2)
  # Zero gradients: zero updates, no NaN.
  zeros = jax.tree.map(jnp.zeros_like, params)
  z, _ = tx.update(zeros, tx.init(params))
  assert all(not bool(jnp.any(x != 0)) for x in jax.tree.leaves(z))
  # A NaN stays visible.
  bad = {**grads, "v": grads["v"].at[0].set(jnp.nan)}
  out, _ = tx.update(bad, tx.init(params))
  assert bool(jnp.isnan(out["v"][0]))


def test_bad_input():
  for kwargs, name in [({"clip_fraction": 1.0}, "clip_fraction"),
                       ({"clip_fraction": -0.1}, "clip_fraction"),
                       ({"b1": 1.0}, "b1"), ({"b2": -0.5}, "b2"), ({"eps": -1.0}, "eps"),
                       ({"eps_root": -1.0}, "eps_root"), ({"weight_decay": -1.0}, "weight_decay")]:
    with pytest.raises(ValueError, match=name):
      clipped_adamw(1e-3, **{"clip_fraction": 0.1, **kwargs})
  with pytest.raises(ValueError, match="method"):
    scale_by_clipped_adam(0.1, method="sorted")


def test_weight_decay_mask():
  """``mask`` selects the leaves that decay: a masked-in leaf gets the undecayed update
  minus ``lr * weight_decay * w``, a masked-out leaf exactly the undecayed update."""
  params = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "b": jnp.array([0.3, -0.7])}
  grads = {"w": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "b": jnp.array([0.5, -0.1])}
  lr, wd = 0.1, 0.5
  base = clipped_adamw(lr, 0.25, weight_decay=0.0)
  masked = clipped_adamw(lr, 0.25, weight_decay=wd, mask={"w": True, "b": False})
  u0, _ = base.update(grads, base.init(params), params)
  u1, _ = masked.update(grads, masked.init(params), params)
  np.testing.assert_allclose(u1["w"], u0["w"] - lr * wd * params["w"], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(u1["b"], u0["b"])
