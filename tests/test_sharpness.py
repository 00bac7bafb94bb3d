"""Tests for regularizers.sharpness: SAM, ASAM, p-norm perturbations, m-sharpness."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from _reference import mlp_problem
from regularizers import SAMState, m_sharpness_gradient, sam, sam_perturbation

# Rectangular both ways and a stacked leading axis.
SHAPES = {"a": (3, 5), "b": (5, 3), "c": (2, 3, 4), "v": (4,)}


def quadratic(seed, dtype=jnp.float32):
  """L(w) = 0.5 v^T A v + b^T v over the flattened tree v; returns (params, loss, A, b)."""
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
  n = ravel_pytree(params)[0].size
  m = rng.standard_normal((n, n))
  a = m @ m.T / n + np.eye(n)
  b = rng.standard_normal(n)
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

  def loss(p):
    v = ravel_pytree(p)[0].astype(jnp.float32)
    return 0.5 * v @ a32 @ v + b32 @ v

  return params, loss, a, b


def flat64(tree):
  return np.asarray(ravel_pytree(jax.tree.map(lambda x: x.astype(jnp.float32), tree))[0],
                    np.float64)


def reference_e(g, w, rho, p=2.0, adaptive=False, eta=0.01):
  """e = rho T sign(Tg)|Tg|^(q-1) / ||Tg||_q^(q-1), T = |w| + eta (ASAM) or 1, float64."""
  t = np.abs(w) + eta if adaptive else np.ones_like(w)
  tg = t * g
  if not np.any(tg):
    return np.zeros_like(g)
  if math.isinf(p):
    return rho * t * np.sign(tg)
  q = p / (p - 1.0)
  d = np.sign(tg) * np.abs(tg) ** (q - 1) / np.sum(np.abs(tg) ** q) ** ((q - 1) / q)
  return rho * t * d


def sam_update(tx, params, loss, state=None):
  state = tx.init(params) if state is None else state
  return jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss)))(
      params, state)


def test_hand_derived_two_coordinates():
  # L = sum w^2 at w = (3, 4): g = (6, 8), ||g|| = 10, e = rho (0.6, 0.8),
  # g_sam = 2 (w + e).
  loss = lambda w: jnp.sum(w**2)
  w = jnp.array([3.0, 4.0])
  out, state = sam_update(sam(0.1), w, loss)
  np.testing.assert_allclose(out, [6.12, 8.16], rtol=1e-6)
  np.testing.assert_allclose(state.grad_norm, 10.0, rtol=1e-6)
  np.testing.assert_allclose(state.perturbation_norm, 0.1, rtol=1e-6)
  # ASAM: T = |w| + eta = (3.5, 4.5), Tg = (21, 36), e = rho T^2 g / ||Tg||.
  out, state = sam_update(sam(0.1, adaptive=True, eta=0.5), w, loss)
  e = 0.1 * np.array([3.5**2 * 6, 4.5**2 * 8]) / np.hypot(21.0, 36.0)
  np.testing.assert_allclose(out, 2 * (np.array([3.0, 4.0]) + e), rtol=1e-6)
  np.testing.assert_allclose(state.perturbation_norm, np.linalg.norm(e), rtol=1e-6)
  # p = inf: e = rho sign(g).
  out, _ = sam_update(sam(0.1, p=math.inf), jnp.array([3.0, -4.0]), loss)
  np.testing.assert_allclose(out, 2 * np.array([3.1, -4.1]), rtol=1e-6)


def test_default_rho_is_0_05_for_sam_and_0_5_for_asam():
  loss = lambda w: jnp.sum(w**2)
  w = jnp.array([3.0, 4.0])
  for kwargs, rho in [({}, 0.05), ({"adaptive": True}, 0.5), ({"adaptive": True, "rho": 0.05},
                                                             0.05)]:
    g = jax.grad(loss)(w)
    e = reference_e(np.asarray(g, np.float64), np.asarray(w, np.float64), rho,
                    adaptive=kwargs.get("adaptive", False))
    _, state = sam_update(sam(**kwargs), w, loss)
    np.testing.assert_allclose(state.perturbation_norm, np.linalg.norm(e), rtol=1e-6)
    np.testing.assert_allclose(sam_perturbation(g, w, **kwargs), e, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rho": 0.05},
        {"rho": 0.3, "adaptive": True, "eta": 0.01},
        {"rho": 0.5, "adaptive": True, "eta": 0.2, "p": math.inf},
        {"rho": 0.1, "p": math.inf},
        {"rho": 0.1, "p": 3},
        {"rho": 0.1, "p": 1.5},
    ],
    ids=["l2", "asam", "asam_inf", "inf", "p3", "p1.5"],
)
def test_quadratic_against_reference(kwargs):
  params, loss, a, b = quadratic(len(str(kwargs)))  # a different problem per case
  w = flat64(params)
  g = a @ w + b
  e = reference_e(g, w, kwargs["rho"], kwargs.get("p", 2.0), kwargs.get("adaptive", False),
                  kwargs.get("eta", 0.01))
  expected = a @ (w + e) + b
  out, state = sam_update(sam(**kwargs), params, loss)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(flat64(out), expected, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(state.grad_norm, np.linalg.norm(g), rtol=1e-5)
  np.testing.assert_allclose(state.perturbation_norm, np.linalg.norm(e), rtol=1e-5)
  # The perturbation alone, and a traced p (general formula) give the same e.
  e_jax = sam_perturbation(jax.grad(loss)(params), params,
                           **{k: v for k, v in kwargs.items()})
  np.testing.assert_allclose(flat64(e_jax), e, rtol=1e-5, atol=1e-6 * kwargs["rho"])
  traced = {**kwargs, "p": jnp.float32(kwargs.get("p", 2.0))}
  e_traced = jax.jit(lambda g, w: sam_perturbation(g, w, **traced))(jax.grad(loss)(params),
                                                                      params)
  np.testing.assert_allclose(flat64(e_traced), e, rtol=2e-5, atol=1e-6 * kwargs["rho"])


def test_bf16_params_keep_dtype_and_match_reference():
  params, loss, a, b = quadratic(3, jnp.bfloat16)
  w = flat64(params)
  g = a @ w + b
  e = reference_e(g, w, 0.2)
  # grad_fn sees w + e unrounded (float32), so the SAM gradient is A (w + e) + b.
  expected = a @ (w + e) + b
  out, state = sam_update(sam(0.2), params, loss)
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == jnp.bfloat16
  # Incoming bf16 gradient and bf16 output: a few bf16 ulps.
  np.testing.assert_allclose(flat64(out), expected, atol=2e-2 * np.max(np.abs(expected)))
  assert state.grad_norm.dtype == jnp.float32


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_bf16_perturbation_norm_at_1e5_params(adaptive):
  # Rounded back to bf16, w + e moved by 0.017 instead of rho = 0.05 at 1e5
  # parameters; grad_fn must see a point within 5% of the intended distance.
  rng = np.random.default_rng(11)
  params = {"w": jnp.asarray(rng.standard_normal((200, 300)), jnp.bfloat16),
            "b": jnp.asarray(rng.standard_normal((4, 100, 100)), jnp.bfloat16)}
  grads = jax.tree.map(lambda w: jnp.asarray(rng.standard_normal(w.shape), jnp.bfloat16), params)
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jax.tree.map(jnp.zeros_like, p)

  rho = 0.05
  tx = sam(rho, adaptive=adaptive)
  tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  w, gv = flat64(params), flat64(grads)
  dist = np.linalg.norm(flat64(seen[0]) - w)
  expected = np.linalg.norm(reference_e(gv, w, rho, adaptive=adaptive))
  assert abs(dist - expected) <= 0.05 * expected, (dist, expected)
  # m-sharpness hands its grad_fn the same unrounded point.
  seen.clear()
  loss = lambda p, x: sum(jnp.sum(v.astype(jnp.float32) * g.astype(jnp.float32))
                          for v, g in zip(jax.tree.leaves(p), jax.tree.leaves(grads),
                                          strict=True)) * jnp.mean(x)

  def recording_loss(p, x):
    jax.debug.callback(lambda q: seen.append(q), p)
    return loss(p, x)

  m_sharpness_gradient(recording_loss, params, jnp.ones((2, 1)), num_groups=1, rho=rho,
                       adaptive=adaptive)
  dists = [np.linalg.norm(flat64(q) - w) for q in seen]
  assert abs(max(dists) - expected) <= 0.05 * expected, (dists, expected)


@pytest.mark.parametrize(
    "kwargs", [{}, {"adaptive": True}, {"p": math.inf}, {"p": 3}, {"p": jnp.float32(3)}],
    ids=["l2", "asam", "inf", "p3", "p3_traced"],
)
def test_zero_gradient_gives_zero_perturbation(kwargs):
  # At the minimiser of a quadratic the gradient is exactly zero: e = 0, no NaN.
  loss = lambda w: jnp.sum((w["x"] - 2.0) ** 2) + jnp.sum(w["y"] ** 2)
  params = {"x": jnp.full((3, 2), 2.0), "y": jnp.zeros(4)}
  out, state = sam_update(sam(0.5, **kwargs), params, loss)
  chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, params))
  assert float(state.perturbation_norm) == 0.0 and float(state.grad_norm) == 0.0


def test_rho_zero_is_plain_gradient():
  params, loss, _, _ = quadratic(4)
  params = jax.tree.map(lambda x: x + 0.5, params)
  out, _ = sam_update(sam(0.0), params, loss)
  chex.assert_trees_all_equal(out, jax.jit(jax.grad(loss))(params))


def test_one_grad_fn_call_and_no_parameter_sized_state():
  params, loss, _, _ = quadratic(5)
  calls = []

  def grad_fn(p):
    calls.append(1)
    return jax.grad(loss)(p)

  tx = sam(0.05)
  state = tx.init(params)
  tx.update(jax.grad(loss)(params), state, params, grad_fn=grad_fn)
  assert len(calls) == 1
  assert isinstance(state, SAMState)
  assert all(leaf.shape == () for leaf in jax.tree.leaves(state))


def test_stop_gradient_on_perturbation():
  # d g_sam / d w = A (1 + de/dw dropped): the Jacobian of the SAM gradient of a
  # quadratic is exactly A.
  params, loss, a, _ = quadratic(6)
  flat, unravel = ravel_pytree(params)
  tx = sam(0.1)

  def sam_grad(v):
    p = unravel(v)
    return ravel_pytree(tx.update(jax.grad(loss)(p), tx.init(p), p,
                                  grad_fn=jax.grad(loss))[0])[0]

  np.testing.assert_allclose(jax.jit(jax.jacfwd(sam_grad))(flat), a, rtol=1e-5, atol=1e-5)


def test_chained_first_schedule_counts_real_steps():
  params, loss, _, _ = quadratic(7)
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  tx = optax.chain(sam(0.05), optax.scale_by_schedule(schedule))
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss)))
  for _ in range(4):
    updates, state = step(params, state)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.01 * u, updates))
  assert int(state[0].count) == 4 and int(state[1].count) == 4


def test_matches_optax_contrib_sam_opaque():
  # One full SAM update of optax.contrib.sam (opaque mode, normalised-SGD
  # adversary) equals sam + sgd.
  params, loss, _, _ = quadratic(8)
  ours = optax.chain(sam(0.05), optax.sgd(0.1))
  anchor = optax.contrib.sam(optax.sgd(0.1),
                             optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
                             opaque_mode=True)
  g = jax.grad(loss)(params)
  u1, _ = ours.update(g, ours.init(params), params, grad_fn=jax.grad(loss))
  u2, _ = anchor.update(g, anchor.init(params), params,
                        grad_fn=lambda p, _: jax.grad(loss)(p))
  chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,bad",
    [({}, jnp.nan), ({}, jnp.inf), ({"adaptive": True}, jnp.nan), ({"p": math.inf}, jnp.inf),
     ({"p": 3}, jnp.nan)],
    ids=["l2-nan", "l2-inf", "asam-nan", "pinf-inf", "p3-nan"],
)
def test_non_finite_gradient_visible(kwargs, bad):
  params, loss, _, _ = quadratic(9)
  g = jax.grad(loss)(params)
  g = {**g, "v": g["v"].at[1].set(bad)}
  tx = sam(0.05, **kwargs)
  out, _ = tx.update(g, tx.init(params), params, grad_fn=jax.grad(loss))
  for leaf in jax.tree.leaves(out):
    assert bool(jnp.all(jnp.isnan(leaf)))


def test_bad_input():
  for kwargs, name in [({"rho": -0.1}, "rho"), ({"eta": -1.0}, "eta"), ({"p": 1}, "p"),
                       ({"p": 0.5}, "p")]:
    with pytest.raises(ValueError, match=name):
      sam(**kwargs)
  params, loss, _, _ = quadratic(10)
  tx = sam(0.05)
  g = jax.grad(loss)(params)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(g, tx.init(params), params)
  with pytest.raises(ValueError, match="params"):
    tx.update(g, tx.init(params), None, grad_fn=jax.grad(loss))
  with pytest.raises(ValueError, match="grad_fn returned"):
    tx.update(g, tx.init(params), params, grad_fn=lambda p: {"a": p["a"]})
  with pytest.raises(ValueError, match="params"):
    sam_perturbation(g, adaptive=True)


# ---------------------------------------------------------------------------
# m-sharpness
# ---------------------------------------------------------------------------


def mlp_batch_problem(batch_size=16, seed=0):
  """The shared tiny tanh MLP regression (3-6-2, no biases) with a batch dict:
  ``params, {"x", "y"}, loss(params, batch)``."""
  params, (x, y), mse = mlp_problem(seed, sizes=(3, 6, 2), batch=batch_size, bias=False)
  return params, {"x": x, "y": y}, lambda p, bt: mse(p, bt["x"], bt["y"])


def per_group_reference(loss, params, batch, num_groups, **kwargs):
  """Mean of SAM gradients computed one group at a time with the `sam` transform."""
  tx = sam(**kwargs)
  size = jax.tree.leaves(batch)[0].shape[0] // num_groups
  outs = []
  for k in range(num_groups):
    group = jax.tree.map(lambda x, k=k: x[k * size:(k + 1) * size], batch)
    grad_fn = lambda p, group=group: jax.grad(loss)(p, group)
    outs.append(tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0])
  return jax.tree.map(lambda *g: sum(g) / num_groups, *outs)


@pytest.mark.parametrize(
    "kwargs,groups_per_pass",
    [({"rho": 0.3}, None), ({"rho": 0.5, "adaptive": True}, 2)],
    ids=["sam-vmap_all", "asam-2_per_pass"],
)
def test_m_sharpness_is_mean_of_per_group_sam(kwargs, groups_per_pass):
  params, batch, loss = mlp_batch_problem()
  got = jax.jit(lambda p, bt: m_sharpness_gradient(
      loss, p, bt, num_groups=4, groups_per_pass=groups_per_pass, **kwargs))(params, batch)
  chex.assert_trees_all_close(got, per_group_reference(loss, params, batch, 4, **kwargs),
                              rtol=1e-5, atol=1e-6)
  # ...and differs from the global-batch perturbation.
  global_sam = per_group_reference(loss, params, batch, 1, **kwargs)
  diff = max(float(jnp.max(jnp.abs(a - b)))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(global_sam), strict=True))
  assert diff > 1e-3
  # num_groups=1 is plain SAM.
  chex.assert_trees_all_close(m_sharpness_gradient(loss, params, batch, num_groups=1, **kwargs),
                              global_sam, rtol=1e-5, atol=1e-6)


def test_m_sharpness_shard_map_per_device():
  mesh = jax.make_mesh((8,), ("data",))
  params, batch, loss = mlp_batch_problem(batch_size=16, seed=1)
  sharded = (jax.device_put(params, NamedSharding(mesh, P())),
             jax.device_put(batch, NamedSharding(mesh, P("data"))))
  f = jax.jit(jax.shard_map(
      lambda p, bt: m_sharpness_gradient(loss, p, bt, num_groups=1, rho=0.3, axis_name="data"),
      mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
  got = f(*sharded)
  chex.assert_trees_all_close(got, per_group_reference(loss, params, batch, 8, rho=0.3),
                              rtol=1e-5, atol=1e-6)
  # Two groups per device = 16 groups of one example.
  f2 = jax.jit(jax.shard_map(
      lambda p, bt: m_sharpness_gradient(loss, p, bt, num_groups=2, rho=0.3,
                                         groups_per_pass=1, axis_name="data"),
      mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
  chex.assert_trees_all_close(f2(*sharded),
                              per_group_reference(loss, params, batch, 16, rho=0.3),
                              rtol=1e-5, atol=1e-6)


def test_m_sharpness_bad_input():
  params, batch, loss = mlp_batch_problem(batch_size=6)
  with pytest.raises(ValueError, match="num_groups"):
    m_sharpness_gradient(loss, params, batch, num_groups=4)
  with pytest.raises(ValueError, match="num_groups"):
    m_sharpness_gradient(loss, params, batch, num_groups=0)
  with pytest.raises(ValueError, match="groups_per_pass"):
    m_sharpness_gradient(loss, params, batch, num_groups=3, groups_per_pass=2)
  with pytest.raises(ValueError, match="rho"):
    m_sharpness_gradient(loss, params, batch, num_groups=3, rho=-1.0)


# ---------------------------------------------------------------------------
# BatchNorm and dropout with flax nnx: stats from the unperturbed pass, same key.
# ---------------------------------------------------------------------------


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.lin1 = nnx.Linear(4, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.lin2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))


def nnx_sam_setup():
  model = Net(nnx.Rngs(params=0, dropout=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(2), (8, 4))
  y = jax.random.randint(jax.random.key(3), (8,), 0, 3)

  def loss_fn(params, rest):
    m = nnx.merge(graphdef, params, rest, copy=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    return loss, nnx.state(m, nnx.Not(nnx.Param))

  grad = jax.jit(jax.grad(loss_fn, has_aux=True))

  @jax.jit
  def step(params, rest, rho):
    tx = optax.chain(sam(rho), optax.sgd(0.1))
    grads, new_rest = grad(params, rest)
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=lambda p: grad(p, rest)[0])
    return new_rest, grads, updates

  return params, rest, step, grad


def test_nnx_batchnorm_dropout_pattern():
  params, rest, step, grad = nnx_sam_setup()
  new_rest, grads, updates = step(params, rest, 0.0)
  # Same dropout key (and same BatchNorm input statistics) in both passes: with
  # rho = 0 the SAM gradient is the first-pass gradient bit for bit.
  chex.assert_trees_all_equal(updates, jax.tree.map(lambda g: -0.1 * g, grads))
  # Negative control: the RNG state after the first pass gives another mask.
  other = grad(params, new_rest)[0]
  assert not all(bool(jnp.all(a == b))
                 for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(grads), strict=True))

  new_rest, grads, updates = step(params, rest, 0.5)
  # Statistics kept are those of the unperturbed pass, not of the perturbed one.
  unperturbed = grad(params, rest)[1]
  e = sam_perturbation(grads, rho=0.5)
  perturbed_grads, perturbed = grad(jax.tree.map(lambda w, d: w + d, params, e), rest)
  chex.assert_trees_all_close(new_rest["bn"], unperturbed["bn"])
  assert not np.allclose(new_rest["bn"]["mean"][...], perturbed["bn"]["mean"][...])
  # The RNG advanced by one pass only.
  chex.assert_trees_all_equal(new_rest["drop"], unperturbed["drop"])
  # SAM gradient (rho > 0) reproduces the documented formula with the same mask.
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.1 * g, perturbed_grads),
                              rtol=1e-5, atol=1e-6)
