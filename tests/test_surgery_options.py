"""Reference-matching options of the gradient surgeries (Bloop's EMA initialisation,
rescale, ratio-only, barrier, several auxiliary losses; PCGrad and the barrier over
EMAs; the perpendicular gradient's rescale) against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _reference import random_tree
from regularizers import (
    BloopState,
    PCGradEmaState,
    bloop,
    dynamic_barrier,
    mixed,
    pcgrad,
    perp_grad,
)

# Rectangular both ways, a stacked leading axis and a vector.
SHAPES = {"a": (3, 5), "b": (5, 3), "c": (2, 3, 4), "v": (4,)}


def np64(tree):
  return {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in tree.items()}


def dot(x, y):
  return sum(float(np.sum(x[k] * y[k])) for k in x)


def assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
  for k in want:
    np.testing.assert_allclose(np.asarray(jnp.asarray(got[k], jnp.float32)), want[k],
                               rtol=rtol, atol=atol, err_msg=k)


def steps(seed, n=4, correlated=True):
  """Main and auxiliary gradients over ``n`` steps (a drifting mean, so the EMA matters)."""
  rng = np.random.default_rng(seed)
  base_g, base_a = random_tree(rng, SHAPES), random_tree(rng, SHAPES)
  gs, as_ = [], []
  for _ in range(n):
    gs.append({k: v + 0.7 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
               for k, v in base_g.items()} if correlated else random_tree(rng, SHAPES))
    as_.append({k: v + 0.6 * base_g[k] + 0.5 * jnp.asarray(rng.standard_normal(v.shape),
                                                            jnp.float32)
                for k, v in base_a.items()})
  return gs, as_


# ---------------------------------------------------------------------------
# Float64 references, written from the formulas (EMA m <- m + (1 - decay) (x - m)).
# ---------------------------------------------------------------------------


def ref_bloop(gs, as_list, lams, decay, eps, *, order="after", init="zeros", m0=None,
              rescale=False, ratio_only=False, barrier=False, per_leaf=False):
  keys = gs[0].keys()
  m = {k: np.zeros_like(v) for k, v in gs[0].items()} if m0 is None else m0
  outs = []
  for t, g in enumerate(gs):
    if init == "grad" and t == 0:
      m = {k: g[k].copy() for k in keys}
    new_m = {k: m[k] + (1 - decay) * (g[k] - m[k]) for k in keys}
    mu = m if order == "before" else new_m
    d = {k: g[k].copy() for k in keys}
    for lam, a in zip(lams, as_list[t], strict=True):
      if per_leaf:
        r = {k: float(np.sum(a[k] * mu[k])) / (float(np.sum(mu[k] ** 2)) + eps)
             if float(np.sum(mu[k] ** 2)) + eps > 0 else 0.0 for k in keys}
      else:
        mm = dot(mu, mu)
        r = dict.fromkeys(keys, dot(a, mu) / (mm + eps) if mm + eps > 0 else 0.0)
      if barrier:
        r = {k: min(v, 1 / lam) for k, v in r.items()}
      along = g if ratio_only else mu
      for k in keys:
        d[k] = d[k] + lam * (a[k] - r[k] * along[k])
    scale = 1 / (1 + sum(lams)) if rescale else 1.0
    outs.append({k: scale * d[k] for k in keys})
    m = new_m
  return outs, m


def ref_pcgrad_ema(gs, as_, lam, decay, eps, init="zeros", rescale=False):
  keys = gs[0].keys()
  mg = {k: np.zeros_like(v) for k, v in gs[0].items()}
  ma = {k: np.zeros_like(v) for k, v in gs[0].items()}
  outs = []
  for t, (g, a) in enumerate(zip(gs, as_, strict=True)):
    if init == "grad" and t == 0:
      mg, ma = {k: g[k].copy() for k in keys}, {k: a[k].copy() for k in keys}
    mg = {k: mg[k] + (1 - decay) * (g[k] - mg[k]) for k in keys}
    ma = {k: ma[k] + (1 - decay) * (a[k] - ma[k]) for k in keys}
    ra = min(dot(a, mg) / (dot(mg, mg) + eps), 0.0)
    rg = min(dot(g, ma) / (dot(ma, ma) + eps), 0.0)
    scale = 1 / (1 + lam) if rescale else 1.0
    outs.append({k: scale * ((g[k] - rg * ma[k]) + lam * (a[k] - ra * mg[k])) for k in keys})
  return outs


def run(tx, gs, as_list, state=None):
  state = tx.init(gs[0]) if state is None else state
  step = jax.jit(lambda g, a, s: tx.update(g, s, None, aux_grads=a))
  outs = []
  for g, a in zip(gs, as_list, strict=True):
    d, state = step(g, a, state)
    outs.append(d)
  return outs, state


# ---------------------------------------------------------------------------
# Bloop.
# ---------------------------------------------------------------------------

BLOOP_OPTIONS = [
    {"ema_init": "grad"},
    {"ema_init": "grad", "rescale": True},
    {"ema_init": "zeros", "ratio_only": True},
    {"ema_init": "grad", "barrier": True},
    {"ema_init": "zeros", "barrier": True, "rescale": True, "ratio_only": True},
]


@pytest.mark.parametrize("options", BLOOP_OPTIONS,
                         ids=["grad", "grad_rescale", "ratio_only", "barrier", "all"])
def test_bloop_reference_options_over_steps(options):
  # The reference code's setting: EMA updated first, decay 0.9, eps 1e-7.
  gs, as_ = steps(1)
  lam = 4.0 if options.get("barrier") else 0.3  # r ~ 0.6 > 1 / lam: the barrier's cap binds
  tx = bloop(lam, decay=0.9, eps=1e-7, ema_order="after", **options)
  outs, state = run(tx, gs, as_)
  want, m = ref_bloop([np64(g) for g in gs], [[np64(a)] for a in as_], [lam], 0.9, 1e-7,
                      init=options["ema_init"], rescale=options.get("rescale", False),
                      ratio_only=options.get("ratio_only", False),
                      barrier=options.get("barrier", False))
  for got, exp in zip(outs, want, strict=True):
    assert_tree_close(got, exp)
  assert_tree_close(state.ema, m)


def test_bloop_grad_init_first_step_and_option_effects():
  gs, as_ = steps(2, n=2)
  g, a = np64(gs[0]), np64(as_[0])
  # "grad", EMA after: the first step projects on g itself (a - <a,g>/|g|^2 g).
  d, _ = run(bloop(0.5, decay=0.9, eps=0.0, ema_order="after", ema_init="grad"), gs[:1],
             as_[:1])
  r = dot(a, g) / dot(g, g)
  assert_tree_close(d[0], {k: g[k] + 0.5 * (a[k] - r * g[k]) for k in g})
  # ... while "zeros" with the EMA before the update is the mixed direction there.
  d, _ = run(bloop(0.5), gs[:1], as_[:1])
  assert_tree_close(d[0], {k: g[k] + 0.5 * a[k] for k in g})
  # Options change the output (guards against an option silently ignored).
  for lam, options in ((0.5, {"ema_init": "grad"}), (0.5, {"rescale": True}),
                       (0.5, {"ratio_only": True}), (5.0, {"barrier": True})):
    base, _ = run(bloop(lam, decay=0.9, ema_order="after"), gs, as_)
    other, _ = run(bloop(lam, decay=0.9, ema_order="after", **options), gs, as_)
    assert not np.allclose(np.asarray(other[1]["a"]), np.asarray(base[1]["a"]), rtol=1e-3)


def test_bloop_random_init():
  gs, as_ = steps(3, n=3)
  tx = bloop(0.4, decay=0.9, eps=1e-7, ema_order="after", ema_init="random", seed=7)
  state = tx.init(gs[0])
  m0 = np64(state.ema)
  values = np.concatenate([v.ravel() for v in m0.values()])
  assert values.std() > 0.5 and abs(values.mean()) < 0.3  # standard normal draws
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.ema))
  # Another seed, another start; the same seed, the same start.
  other = np64(bloop(0.4, ema_init="random", seed=8).init(gs[0]).ema)
  assert not np.allclose(other["a"], m0["a"])
  np.testing.assert_array_equal(np64(tx.init(gs[0]).ema)["a"], m0["a"])
  outs, _ = run(tx, gs, as_, state)
  want, _ = ref_bloop([np64(g) for g in gs], [[np64(a)] for a in as_], [0.4], 0.9, 1e-7,
                      m0=m0)
  for got, exp in zip(outs, want, strict=True):
    assert_tree_close(got, exp)


@pytest.mark.parametrize("projection,order", [("global", "before"), ("per_leaf", "after")])
def test_bloop_several_auxiliary_losses(projection, order):
  gs, as1 = steps(4)
  _, as2 = steps(5)
  lams = [0.3, 1.5]
  tx = bloop(lams, decay=0.8, eps=1e-6, projection=projection, ema_order=order, rescale=True)
  outs, state = run(tx, gs, [[a1, a2] for a1, a2 in zip(as1, as2, strict=True)])
  want, _ = ref_bloop([np64(g) for g in gs],
                      [[np64(a1), np64(a2)] for a1, a2 in zip(as1, as2, strict=True)], lams,
                      0.8, 1e-6, order=order, rescale=True, per_leaf=projection == "per_leaf")
  for got, exp in zip(outs, want, strict=True):
    assert_tree_close(got, exp)
  assert state.aux_cosine.shape == (2,) and state.projection_ratio.shape == (2,)
  # One loss given as a list of one equals the plain form.
  single, _ = run(bloop([0.3], decay=0.8), gs, [[a] for a in as1])
  plain, _ = run(bloop(0.3, decay=0.8), gs, as1)
  assert_tree_close(single[-1], np64(plain[-1]))


# ---------------------------------------------------------------------------
# PCGrad and the dynamic barrier over EMAs; mixed with rescale.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("init,rescale", [("zeros", False), ("grad", True)])
def test_pcgrad_over_emas(init, rescale):
  gs, as_ = steps(6, correlated=False)  # independent draws: conflicts come and go
  tx = pcgrad(0.7, decay=0.9, eps=1e-7, ema_init=init, rescale=rescale)
  outs, state = run(tx, gs, as_)
  assert isinstance(state, PCGradEmaState)
  want = ref_pcgrad_ema([np64(g) for g in gs], [np64(a) for a in as_], 0.7, 0.9, 1e-7, init,
                        rescale)
  for got, exp in zip(outs, want, strict=True):
    assert_tree_close(got, exp)
  # Some steps conflict (the output is not the mixed direction there).
  mixed_out, _ = run(mixed(0.7), gs, as_)
  assert any(not np.allclose(np.asarray(x["a"]), np.asarray(y["a"]), rtol=1e-3)
             for x, y in zip(outs, mixed_out, strict=True))
  # decay 0 (each EMA is the current gradient) is the raw-gradient PCGrad.
  raw, _ = run(pcgrad(0.7), gs, as_)
  ema0, _ = run(pcgrad(0.7, decay=0.0, eps=0.0), gs, as_)
  for x, y in zip(raw, ema0, strict=True):
    assert_tree_close(x, np64(y))


def test_dynamic_barrier_over_ema_and_rescale():
  gs, as_ = steps(7)
  tx = dynamic_barrier(1.2, decay=0.9, eps=1e-7, ema_init="grad")
  outs, state = run(tx, gs, as_)
  assert isinstance(state, BloopState)
  want, _ = ref_bloop([np64(g) for g in gs], [[np64(a)] for a in as_], [1.2], 0.9, 1e-7,
                      init="grad", barrier=True)
  for got, exp in zip(outs, want, strict=True):
    assert_tree_close(got, exp)
  raw, _ = run(dynamic_barrier(1.2), gs, as_)
  ema0, _ = run(dynamic_barrier(1.2, decay=0.0, eps=0.0), gs, as_)
  for x, y in zip(raw, ema0, strict=True):
    assert_tree_close(x, np64(y))
  # rescale divides by 1 + lam (mixed, PCGrad, barrier alike).
  for factory in (mixed, pcgrad, dynamic_barrier):
    plain, _ = run(factory(1.2), gs[:1], as_[:1])
    scaled, _ = run(factory(1.2, rescale=True), gs[:1], as_[:1])
    assert_tree_close(scaled[0], {k: v / 2.2 for k, v in np64(plain[0]).items()})


# ---------------------------------------------------------------------------
# perp_grad(rescale=True): the authors' OrthoGrad.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_perp_grad_rescale_norm_and_orthogonality(dtype):
  rng = np.random.default_rng(8)
  w = random_tree(rng, SHAPES, dtype)
  # Gradients mostly along the weights (cosine ~0.99): the plain projection is short.
  g = {k: (3.0 * v.astype(jnp.float32) + 0.3 * rng.standard_normal(v.shape)).astype(dtype)
       for k, v in w.items()}
  out, state = perp_grad(rescale=True).update(g, perp_grad(rescale=True).init(w), w)
  plain, _ = perp_grad().update(g, perp_grad().init(w), w)
  g64, w64 = np64(g), np64(w)
  # Removing ~99% of g in float32 leaves rounding of ~1e-7 ||g||, rescaled by ~10.
  tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == jnp.float32 else {"rtol": 2e-2, "atol": 2e-2}
  for k in g64:
    perp = g64[k] - float(np.sum(g64[k] * w64[k])) / float(np.sum(w64[k] ** 2)) * w64[k]
    want = perp * np.linalg.norm(g64[k]) / np.linalg.norm(perp)
    got = np.asarray(jnp.asarray(out[k], jnp.float32), np.float64)
    assert out[k].dtype == dtype
    np.testing.assert_allclose(got, want, **tol, err_msg=k)
    # Per leaf: the norm of the original gradient, orthogonal to the weights.
    np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(g64[k]), rtol=tol["rtol"])
    assert abs(np.sum(got * w64[k])) <= 5 * tol["rtol"] * np.linalg.norm(got) * np.linalg.norm(
        w64[k])
    # ... where the plain projection kept a fraction of it only.
    assert np.linalg.norm(np.asarray(jnp.asarray(plain[k], jnp.float32))) < 0.5 * np.linalg.norm(
        g64[k])
  assert float(state.radial_fraction) > 0.5


def test_perp_grad_rescale_zero_and_parallel_gradients():
  w = {"x": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "z": jnp.zeros(3), "y": jnp.array([1.0, 0.0])}
  tx = perp_grad(rescale=True)
  g = {"x": jnp.zeros((2, 2)), "z": jnp.array([1.0, -2.0, 0.5]), "y": jnp.array([3.0, 0.0])}
  out, _ = tx.update(g, tx.init(w), w)
  np.testing.assert_array_equal(out["x"], 0.0)  # zero gradient: zero, not NaN
  np.testing.assert_array_equal(out["y"], 0.0)  # exactly along w: nothing left to rescale
  np.testing.assert_allclose(out["z"], g["z"])  # zero weights: the gradient unchanged


def test_bad_options():
  cases = [
      (lambda: bloop(0.1, ema_init="ones"), "ema_init"),
      (lambda: bloop(0.1, ema_init="random", seed=1.5), "seed"),
      (lambda: bloop(0.1, rescale="yes"), "rescale"),
      (lambda: bloop(0.1, ratio_only=1), "ratio_only"),
      (lambda: bloop(0.1, barrier=None), "barrier"),
      (lambda: bloop([0.1, 0.2], barrier=True), "barrier"),
      (lambda: bloop([0.1, -0.2]), "aux_weight"),
      (lambda: bloop([]), "aux_weight"),
      (lambda: pcgrad(0.1, decay=1.0), "decay"),
      (lambda: pcgrad(0.1, decay=0.9, eps=-1.0), "eps"),
      (lambda: pcgrad(0.1, decay=0.9, ema_init="first"), "ema_init"),
      (lambda: dynamic_barrier(0.1, decay=-0.1), "decay"),
      (lambda: mixed(0.1, rescale=2), "rescale"),
      (lambda: perp_grad(rescale="true"), "rescale"),
  ]
  for make, name in cases:
    with pytest.raises(ValueError, match=name):
      make()
  g = {"v": jnp.ones(3)}
  tx = bloop([0.1, 0.2])
  with pytest.raises(ValueError, match="aux_grads"):
    tx.update(g, tx.init(g), aux_grads=[g])
  with pytest.raises(ValueError, match="aux_grads"):
    tx.update(g, tx.init(g), aux_grads=g)
