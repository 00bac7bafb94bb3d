"""Tests for regularizers.surgery: Bloop, mixed, PCGrad, dynamic barrier, perp_grad and the
one-forward gradient helper, against float64 NumPy references and hand-derived cases."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _reference import mlp_problem, random_tree
from regularizers import (
    BloopState,
    bloop,
    dynamic_barrier,
    main_and_aux_grads,
    mixed,
    pcgrad,
    perp_grad,
)

# Rectangular both ways, a stacked leading axis, a vector and a scalar.
SHAPES = {"a": (3, 5), "b": (5, 3), "c": (2, 3, 4), "v": (4,), "s": ()}
BASELINES = {"mixed": mixed, "pcgrad": pcgrad, "dynamic_barrier": dynamic_barrier}
ALL_AUX = {"bloop": bloop, **BASELINES}
TOL = {jnp.float32: {"rtol": 1e-5, "atol": 1e-6}, jnp.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def np64(tree):
  return {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in tree.items()}


def dot(x, y):
  return sum(float(np.sum(x[k] * y[k])) for k in x)


def assert_tree_close(got, want, **tol):
  for k in want:
    np.testing.assert_allclose(np.asarray(jnp.asarray(got[k], jnp.float32)), want[k], **tol,
                               err_msg=k)


def update(tx, g, state=None, **extras):
  """One eager update (tiny trees: op-by-op dispatch is cheaper than compiling)."""
  state = tx.init(g) if state is None else state
  return tx.update(g, state, None, **extras)


# ---------------------------------------------------------------------------
# Float64 NumPy references, computed the slow, obvious way.
# ---------------------------------------------------------------------------


def ref_bloop(gs, as_, lam, decay, eps, projection, ema_order):
  """Outputs, final EMA and last diagnostics of Bloop over a sequence of steps."""
  m = {k: np.zeros_like(v) for k, v in gs[0].items()}
  outs = []
  for g, a in zip(gs, as_, strict=True):
    new_m = {k: decay * m[k] + (1 - decay) * g[k] for k in g}
    mu = m if ema_order == "before" else new_m
    mm, am = dot(mu, mu), dot(a, mu)
    if projection == "global":
      r = am / (mm + eps) if mm + eps > 0 else 0.0
      ratios = dict.fromkeys(g, r)
      ratio = r
    else:
      ratios = {}
      for k in g:
        n = float(np.sum(mu[k] ** 2)) + eps
        ratios[k] = float(np.sum(a[k] * mu[k])) / n if n > 0 else 0.0
      ratio = sum(ratios[k] * float(np.sum(mu[k] ** 2)) for k in g) / mm if mm > 0 else 0.0
    outs.append({k: g[k] + lam * (a[k] - ratios[k] * mu[k]) for k in g})
    norms = np.sqrt(dot(a, a)) * np.sqrt(mm)
    cosine = am / norms if norms > 0 else 0.0
    m = new_m
  return outs, m, cosine, ratio


def ref_baseline(name, g, a, lam):
  ga, gg, aa = dot(g, a), dot(g, g), dot(a, a)
  if name == "mixed":
    return {k: g[k] + lam * a[k] for k in g}
  if name == "pcgrad":
    if ga >= 0:
      return {k: g[k] + lam * a[k] for k in g}
    return {k: (g[k] - ga / aa * a[k]) + lam * (a[k] - ga / gg * g[k]) for k in g}
  mu = max(1 - lam * ga / gg, 0.0) if gg > 0 else 1.0
  return {k: mu * g[k] + lam * a[k] for k in g}


def ref_perp(g, w):
  out = {}
  for k in g:
    ww = float(np.sum(w[k] ** 2))
    out[k] = g[k] - (float(np.sum(g[k] * w[k])) / ww) * w[k] if ww > 0 else g[k].copy()
  return out


# ---------------------------------------------------------------------------
# Hand-derived 2-D cases: g = (1, 0), a conflicting (-1, 1) or agreeing (1, 1).
# ---------------------------------------------------------------------------

G = jnp.array([1.0, 0.0])
A_CONFLICT = jnp.array([-1.0, 1.0])
A_AGREE = jnp.array([1.0, 1.0])


@pytest.mark.parametrize(
    "name, aux, lam, expected",
    [
        # mixed: g + lam a.
        ("mixed", A_CONFLICT, 0.5, [0.5, 0.5]),
        ("mixed", A_AGREE, 0.5, [1.5, 0.5]),
        # pcgrad, conflict <g,a> = -1: pi(g;a) = g + a/2 = (.5,.5), pi(a;g) = a + g = (0,1).
        ("pcgrad", A_CONFLICT, 0.5, [0.5, 1.0]),
        ("pcgrad", A_CONFLICT, 0.0, [0.5, 0.5]),
        ("pcgrad", A_AGREE, 0.5, [1.5, 0.5]),
        # barrier: mu = max(1 - lam <g,a>/||g||^2, 0): 1.5, 0.5, and 0 for lam = 2.
        ("dynamic_barrier", A_CONFLICT, 0.5, [1.0, 0.5]),
        ("dynamic_barrier", A_AGREE, 0.5, [1.0, 0.5]),
        ("dynamic_barrier", A_AGREE, 2.0, [2.0, 2.0]),
        ("dynamic_barrier", A_CONFLICT, 0.0, [1.0, 0.0]),
        # bloop projecting on m = g (decay 0, EMA after): a - <a,g> g = (0, 1) in both cases.
        ("bloop", A_CONFLICT, 0.5, [1.0, 0.5]),
        ("bloop", A_AGREE, 0.5, [1.0, 0.5]),
        ("bloop", A_AGREE, 0.0, [1.0, 0.0]),
    ],
)
def test_hand_derived_2d(name, aux, lam, expected):
  kwargs = {"decay": 0.0, "ema_order": "after", "eps": 0.0} if name == "bloop" else {}
  d, _ = update(ALL_AUX[name](lam, **kwargs), G, aux_grads=aux)
  np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-7)


def test_bloop_hand_derived_two_steps_both_orders():
  # decay 0.5, lam 0.5, eps 0; step 1: g = (1,0), a = (-1,1); step 2: g = (1,1), a = (-1,1).
  gs, aux = [G, A_AGREE], [A_CONFLICT, A_CONFLICT]
  # before: step 1 uses m = 0 -> mixed (0.5, 0.5); then m = (0.5, 0). Step 2: r = -0.5/0.25
  # = -2, a - r m = (0, 1), d = (1, 1.5).
  # after: step 1 uses m = (0.5, 0) -> (1, 0.5). Step 2 uses m = (0.75, 0.5): r = -4/13,
  # a - r m = (-10/13, 15/13), d = (8/13, 41/26).
  expected = {"before": [[0.5, 0.5], [1.0, 1.5]], "after": [[1.0, 0.5], [8 / 13, 41 / 26]]}
  for order, want in expected.items():
    tx = bloop(0.5, decay=0.5, eps=0.0, ema_order=order)
    state = tx.init(G)
    for g, a, w in zip(gs, aux, want, strict=True):
      d, state = update(tx, g, state, aux_grads=a)
      np.testing.assert_allclose(d, w, rtol=1e-6, err_msg=order)
    np.testing.assert_allclose(state.ema, [0.75, 0.5], rtol=1e-6)


# ---------------------------------------------------------------------------
# Bloop against the NumPy reference over several steps.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("projection", ["global", "per_leaf"])
@pytest.mark.parametrize("ema_order", ["before", "after"])
def test_bloop_matches_reference_over_steps(projection, ema_order):
  rng = np.random.default_rng(0)
  gs = [random_tree(rng, SHAPES) for _ in range(5)]
  as_ = [random_tree(rng, SHAPES) for _ in range(5)]
  lam, decay, eps = 0.3, 0.8, 1e-8
  tx = bloop(lam, decay=decay, eps=eps, projection=projection, ema_order=ema_order)
  step = jax.jit(lambda g, s, a: tx.update(g, s, aux_grads=a))
  state = tx.init(gs[0])
  outs = []
  for g, a in zip(gs, as_, strict=True):
    d, state = step(g, state, a)
    outs.append(d)
  want, m, cosine, ratio = ref_bloop([np64(g) for g in gs], [np64(a) for a in as_], lam, decay,
                                     eps, projection, ema_order)
  for got, ref in zip(outs, want, strict=True):
    assert_tree_close(got, ref, rtol=1e-5, atol=1e-5)
  assert_tree_close(state.ema, m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.aux_cosine, cosine, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.projection_ratio, ratio, rtol=1e-4, atol=1e-6)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))


def test_ema_orders_differ_and_first_before_step_is_mixed():
  rng = np.random.default_rng(1)
  g, a = random_tree(rng, SHAPES), random_tree(rng, SHAPES)
  d_before, s_before = update(bloop(0.7), g, aux_grads=a)
  d_after, s_after = update(bloop(0.7, ema_order="after"), g, aux_grads=a)
  d_mixed, _ = update(mixed(0.7), g, aux_grads=a)
  chex.assert_trees_all_close(d_before, d_mixed, rtol=1e-6)
  chex.assert_trees_all_close(s_before.ema, s_after.ema)  # same EMA update, other use
  assert float(s_before.aux_cosine) == 0.0 and float(s_after.aux_cosine) != 0.0
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree.leaves(d_before), jax.tree.leaves(d_after), strict=True))
  assert diff > 1e-2


@pytest.mark.parametrize("projection", ["global", "per_leaf"])
def test_global_vs_per_leaf_orthogonality(projection):
  """d - g = lam pi(a) is orthogonal to m summed over leaves (global) or leaf by leaf."""
  rng = np.random.default_rng(2)
  g, a = random_tree(rng, SHAPES), random_tree(rng, SHAPES)
  lam = 0.4
  d, state = update(bloop(lam, decay=0.0, ema_order="after", projection=projection), g,
                    aux_grads=a)
  m = np64(state.ema)
  resid = {k: (np64(d)[k] - np64(g)[k]) / lam for k in d}
  per_leaf = np.array([np.sum(resid[k] * m[k]) for k in m])
  scale = np.sqrt(dot(resid, resid) * dot(m, m))
  if projection == "global":
    assert abs(per_leaf.sum()) < 1e-5 * scale
    assert np.max(np.abs(per_leaf)) > 1e-2 * scale  # not leaf by leaf
  else:
    np.testing.assert_array_less(np.abs(per_leaf), 1e-5 * scale)


def test_aux_weight_zero_gives_main_gradient():
  rng = np.random.default_rng(3)
  g = random_tree(rng, SHAPES)
  a = jax.tree.map(lambda x: -x + 0.1, g)  # conflicting
  for tx in [bloop(0.0), bloop(0.0, ema_order="after", projection="per_leaf"), mixed(0.0),
             dynamic_barrier(0.0)]:
    state = tx.init(g)
    for _ in range(2):
      d, state = update(tx, g, state, aux_grads=a)
      chex.assert_trees_all_equal(d, g)
  # PCGrad projects the main gradient on conflict whatever lam (Yu et al.'s form).
  d, _ = update(pcgrad(0.0), g, aux_grads=a)
  assert_tree_close(d, ref_baseline("pcgrad", np64(g), np64(a), 0.0), rtol=1e-5, atol=1e-5)
  assert dot(np64(d), np64(a)) == pytest.approx(0.0, abs=1e-4 * np.sqrt(dot(np64(a), np64(a))))


def test_bloop_bilevel_fixed_point():
  """Main loss (w1 + w2 - 2)^2 has a line of minima, aux ||w||^2. Mixed converges to
  w = 2/(2 + lam) (off the line); Bloop to (1, 1): the aux-optimal main minimiser."""
  main = lambda w: (w[0] + w[1] - 2.0) ** 2
  aux = lambda w: jnp.sum(w**2)
  lam = 0.5

  def train(tx):
    tx = optax.chain(tx, optax.sgd(0.05))

    def body(carry, _):
      w, s = carry
      u, s = tx.update(jax.grad(main)(w), s, w, aux_grads=jax.grad(aux)(w))
      return (optax.apply_updates(w, u), s), None

    w0 = jnp.array([2.0, -1.0])
    return jax.jit(lambda w: jax.lax.scan(body, (w, tx.init(w)), length=600)[0][0])(w0)

  np.testing.assert_allclose(train(mixed(lam)), [0.8, 0.8], atol=1e-4)
  np.testing.assert_allclose(train(bloop(lam, decay=0.9)), [1.0, 1.0], atol=1e-3)


# ---------------------------------------------------------------------------
# Baselines against the reference, conflicting and agreeing.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("relation", ["conflict", "agree"])
def test_baselines_match_reference(name, relation):
  rng = np.random.default_rng(4)
  g, noise = random_tree(rng, SHAPES), random_tree(rng, SHAPES)
  sign = -1.0 if relation == "conflict" else 1.0
  a = jax.tree.map(lambda x, n: sign * 0.8 * x + 0.5 * n, g, noise)
  g64, a64 = np64(g), np64(a)
  assert (dot(g64, a64) < 0) == (relation == "conflict")
  lam = 0.7
  d, state = update(BASELINES[name](lam), g, aux_grads=a)
  assert_tree_close(d, ref_baseline(name, g64, a64, lam), rtol=1e-5, atol=1e-5)
  cosine = dot(g64, a64) / np.sqrt(dot(g64, g64) * dot(a64, a64))
  np.testing.assert_allclose(state.main_aux_cosine, cosine, rtol=1e-5)
  if name == "dynamic_barrier":
    np.testing.assert_allclose(state.main_weight, max(1 - lam * dot(g64, a64) / dot(g64, g64), 0),
                               rtol=1e-5)
    assert dot(np64(d), g64) >= dot(g64, g64) * (1 - 1e-5)
  if name == "pcgrad" and relation == "conflict":
    # Each projected part is orthogonal to the other gradient.
    part_g = {k: np64(d)[k] - lam * (a64[k] - dot(g64, a64) / dot(g64, g64) * g64[k]) for k in g}
    assert abs(dot(part_g, a64)) < 1e-4 * np.sqrt(dot(a64, a64) * dot(g64, g64))


# ---------------------------------------------------------------------------
# dtypes, zeros and non-finite values.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_AUX))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_dtypes_against_reference(name, dtype):
  rng = np.random.default_rng(5)
  g, a = random_tree(rng, SHAPES, dtype), random_tree(rng, SHAPES, dtype)
  lam = 0.6
  tx = ALL_AUX[name](lam, **({"ema_order": "after", "decay": 0.5} if name == "bloop" else {}))
  d, state = update(tx, g, aux_grads=a)
  for k in g:
    assert d[k].dtype == dtype and d[k].shape == g[k].shape
  if name == "bloop":
    want = ref_bloop([np64(g)], [np64(a)], lam, 0.5, 1e-12, "global", "after")[0][0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))
  else:
    want = ref_baseline(name, np64(g), np64(a), lam)
  assert_tree_close(d, want, **TOL[dtype])


@pytest.mark.parametrize("name", list(ALL_AUX))
def test_zero_gradients_are_finite(name):
  zeros = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  a = random_tree(np.random.default_rng(6), SHAPES)
  kwargs = {"eps": 0.0} if name == "bloop" else {}
  tx = ALL_AUX[name](0.5, **kwargs)
  state = tx.init(zeros)
  for aux in [zeros, a, zeros]:
    d, state = update(tx, zeros, state, aux_grads=aux)
    for leaf in jax.tree.leaves((d, state)):
      assert bool(jnp.all(jnp.isfinite(leaf)))
  d, _ = update(tx, zeros, aux_grads=a)  # g = 0: the projections are skipped, d = lam a
  want = {k: 0.5 * v for k, v in np64(a).items()}
  assert_tree_close(d, want, rtol=1e-6)


def test_bloop_nan_policy():
  rng = np.random.default_rng(7)
  g, a = random_tree(rng, SHAPES), random_tree(rng, SHAPES)
  tx = bloop(0.5)
  _, state = update(tx, g, aux_grads=a)  # a nonzero EMA
  g_nan = {**g, "a": g["a"].at[0, 0].set(jnp.nan)}
  d, s_nan = update(tx, g_nan, state, aux_grads=a)
  assert not bool(jnp.isfinite(d["a"][0, 0]))
  assert not bool(jnp.all(jnp.isfinite(s_nan.ema["a"])))  # documented: NaN enters the EMA
  a_nan = {**a, "v": a["v"].at[1].set(jnp.inf)}
  d, s_aux = update(tx, g, state, aux_grads=a_nan)
  assert all(not bool(jnp.any(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(d))  # global
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(s_aux.ema))  # a not in EMA
  # apply_if_finite around the chain skips the step, state included.
  guarded = optax.apply_if_finite(optax.chain(bloop(0.5), optax.sgd(0.1)), 3)
  s0 = guarded.init(g)
  _, s1 = guarded.update(g, s0, g, aux_grads=a)
  u, s2 = guarded.update(g_nan, s1, g, aux_grads=a)
  assert all(not bool(jnp.any(x)) for x in jax.tree.leaves(u))
  chex.assert_trees_all_equal(s2.inner_state, s1.inner_state)


@pytest.mark.parametrize("name", ["mixed", "pcgrad", "dynamic_barrier"])
def test_baselines_nan_visible(name):
  rng = np.random.default_rng(8)
  g, a = random_tree(rng, SHAPES), random_tree(rng, SHAPES)
  for gg, aa in [({**g, "b": g["b"].at[1, 1].set(jnp.nan)}, a),
                 (g, {**a, "c": a["c"].at[0, 1, 2].set(jnp.nan)})]:
    d, _ = update(BASELINES[name](0.5), gg, aux_grads=aa)
    assert any(not bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(d))


# ---------------------------------------------------------------------------
# perp_grad.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_perp_grad_matches_reference_and_is_orthogonal(dtype):
  rng = np.random.default_rng(9)
  g, w = random_tree(rng, SHAPES, dtype), random_tree(rng, SHAPES, dtype)
  w["b"] = jnp.zeros_like(w["b"])  # a zero-weight leaf passes through unchanged
  tx = perp_grad()
  d, state = jax.jit(tx.update)(g, tx.init(w), w)
  want = ref_perp(np64(g), np64(w))
  assert_tree_close(d, want, **TOL[dtype])
  chex.assert_trees_all_equal(d["b"], g["b"])
  for k in g:
    assert d[k].dtype == dtype
    if k != "b":
      dk, wk = np64(d)[k], np64(w)[k]
      tol = 1e-5 if dtype == jnp.float32 else 1e-2
      assert abs(np.sum(dk * wk)) <= tol * np.linalg.norm(dk) * np.linalg.norm(wk) + 1e-7
  g64, w64 = np64(g), np64(w)
  removed = sum(float(np.sum(g64[k] * w64[k])) ** 2 / float(np.sum(w64[k] ** 2))
                for k in g if k != "b")
  np.testing.assert_allclose(state.radial_fraction, removed / dot(g64, g64),
                             rtol=1e-5 if dtype == jnp.float32 else 2e-2)


def test_perp_grad_zeros_and_errors():
  zeros = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  tx = perp_grad()
  d, state = tx.update(zeros, tx.init(zeros), zeros)
  chex.assert_trees_all_equal(d, zeros)
  assert float(state.radial_fraction) == 0.0
  with pytest.raises(ValueError, match="params"):
    tx.update(zeros, tx.init(zeros))
  w = random_tree(np.random.default_rng(10), SHAPES)
  d, _ = tx.update({**zeros, "a": zeros["a"].at[0, 0].set(jnp.nan)}, tx.init(w), w)
  assert not bool(jnp.any(jnp.isfinite(d["a"])))


# ---------------------------------------------------------------------------
# Both gradients from one forward pass.
# ---------------------------------------------------------------------------


def two_losses(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])  # the shared activations
  logits = h @ params["w2"]
  main = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  aux = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2) + 0.1 * jnp.mean(h**2)
  return main, aux


def classification_problem(dtype=jnp.float32):
  """The shared tiny tanh MLP (6-9-4, 7 samples) with integer labels: ``params, x, y``."""
  params, (x, _), _ = mlp_problem(11, sizes=(6, 9, 4), batch=7, dtype=dtype)
  return params, x, jnp.asarray(np.random.default_rng(12).integers(0, 4, 7))


def test_main_and_aux_grads_equal_two_grad_calls():
  params, x, y = classification_problem()
  helper = lambda p: main_and_aux_grads(two_losses, p, x, y)
  two_grads = lambda p: (jax.grad(lambda q: two_losses(q, x, y)[0])(p),
                         jax.grad(lambda q: two_losses(q, x, y)[1])(p))
  ((l_main, l_aux), (g, a)), (g_ref, a_ref), losses = jax.jit(
      lambda p: (helper(p), two_grads(p), two_losses(p, x, y)))(params)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(a, a_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([l_main, l_aux], losses, rtol=1e-6)
  # One forward pass: the jaxpr has one tanh (two grad calls have two).
  assert str(jax.make_jaxpr(helper)(params)).count("tanh") == 1
  assert str(jax.make_jaxpr(two_grads)(params)).count("tanh") == 2


def test_main_and_aux_grads_has_aux_bf16_and_errors():
  params, x, y = classification_problem(jnp.bfloat16)

  def with_data(p, x, y):
    main, aux = two_losses(p, x, y)
    return (main, aux), {"main": main}

  ((l_main, _), data), (g, a) = jax.jit(
      lambda p: main_and_aux_grads(with_data, p, x, y, has_aux=True))(params)
  assert float(data["main"]) == float(l_main)
  for k in params:
    assert g[k].dtype == a[k].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="pair"):
    main_and_aux_grads(lambda p: (jnp.sum(p["w1"]),), params)
  with pytest.raises(ValueError, match="scalars"):
    main_and_aux_grads(lambda p: (p["w1"], jnp.sum(p["w1"])), params)


def test_helper_feeds_bloop_in_a_training_step():
  params, x, y = classification_problem()
  tx = optax.chain(bloop(0.1), optax.adam(1e-2))

  @jax.jit
  def step(p, s):
    (l_main, _), (g, a) = main_and_aux_grads(two_losses, p, x, y)
    u, s = tx.update(g, s, p, aux_grads=a)
    return optax.apply_updates(p, u), s, l_main

  state = tx.init(params)
  losses = []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]
  assert isinstance(state[0], BloopState) and float(state[0].aux_cosine) != 0.0


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_AUX))
def test_aux_grads_missing_or_mismatched(name):
  rng = np.random.default_rng(12)
  g = random_tree(rng, SHAPES)
  tx = ALL_AUX[name](0.5)
  state = tx.init(g)
  with pytest.raises(ValueError, match="aux_grads"):
    tx.update(g, state)
  with pytest.raises(ValueError, match=r"aux_grads.*tree structure"):
    tx.update(g, state, aux_grads={k: v for k, v in g.items() if k != "v"})
  with pytest.raises(ValueError, match=r"aux_grads\['b'\] is float32\[3, 5\].*float32\[5, 3\]"):
    tx.update(g, state, aux_grads={**g, "b": g["b"].T})
  with pytest.raises(ValueError, match=r"aux_grads\['v'\] is bfloat16\[4\].*float32\[4\]"):
    tx.update(g, state, aux_grads={**g, "v": g["v"].astype(jnp.bfloat16)})


@pytest.mark.parametrize(
    "factory, kwargs, arg",
    [
        (bloop, {"aux_weight": -0.1}, "aux_weight"),
        (mixed, {"aux_weight": -1.0}, "aux_weight"),
        (pcgrad, {"aux_weight": -1.0}, "aux_weight"),
        (dynamic_barrier, {"aux_weight": -1.0}, "aux_weight"),
        (bloop, {"aux_weight": 0.1, "decay": 1.0}, "decay"),
        (bloop, {"aux_weight": 0.1, "decay": -0.5}, "decay"),
        (bloop, {"aux_weight": 0.1, "eps": -1e-8}, "eps"),
        (bloop, {"aux_weight": 0.1, "projection": "layer"}, "projection"),
        (bloop, {"aux_weight": 0.1, "ema_order": "during"}, "ema_order"),
    ],
)
def test_bad_configuration(factory, kwargs, arg):
  with pytest.raises(ValueError, match=arg):
    factory(**kwargs)
