"""Multi-step float64 NumPy references for the low-rank optimizers with non-default options.

``dct_adamw``, ``online_subspace_descent`` and ``trion`` are run for several steps on a
small tree (a rectangular matrix, stacked matrices and a vector) with their options away
from the defaults (refresh period, moment handling on a refresh, column score, projected
side, the basis optimizer's weight decay, initial basis, low-precision moments), and every
update is compared with a slow, obvious float64 implementation of the same algorithm
written from its description. Parameters move by the updates, so weight decay and
schedules act on a real trajectory.

Tolerances: float32 against float64 over 6 steps, ``atol = 2e-5`` relative to the
update's scale (measured error ~1e-6); a dropped option changes the updates by ~1e-2 or
more from the first step it acts on.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import optimizers as opt

B1, B2, EPS = 0.9, 0.999, 1e-8
SHAPES = {"w": (6, 10), "stack": (2, 9, 5), "b": (10,)}
MUON_COEFFS = (3.4445, -4.7750, 2.0315)


# ---------------------------------------------------------------------------
# NumPy float64 building blocks.
# ---------------------------------------------------------------------------


def np_dct(d: int) -> np.ndarray:
  """Orthonormal DCT-II matrix, rows = frequencies: C[f, j] = s_f cos(pi (2j+1) f / (2d))."""
  f = np.arange(d)[:, None]
  j = np.arange(d)[None, :]
  s = np.where(f == 0, np.sqrt(1.0 / d), np.sqrt(2.0 / d))
  return s * np.cos(np.pi * (2 * j + 1) * f / (2 * d))


def project_m(m: int, n: int, side: str) -> bool:
  """Whether the row dimension m is the projected one (ties: the columns n)."""
  return {"smaller": m < n, "larger": m > n, "reduction": True, "output": False}[side]


def oriented(x: np.ndarray, side: str) -> np.ndarray:
  """(k, d) view with the projected dimension d last."""
  return x.T if project_m(*x.shape, side) else x


def unoriented(y: np.ndarray, shape, side: str) -> np.ndarray:
  return y.T if project_m(*shape, side) else y


def top_columns(t: np.ndarray, r: int, score: str) -> np.ndarray:
  s = (t**2).sum(0) if score == "l2" else np.abs(t).sum(0)
  return np.sort(np.argsort(-s, kind="stable")[:r])


class NpAdam:
  """Adam on one array; moments optionally rounded to a storage dtype after each step."""

  def __init__(self, shape, mu_dtype=None, nu_dtype=None):
    self.mu, self.nu, self.count = np.zeros(shape), np.zeros(shape), 0
    self.mu_dtype, self.nu_dtype = mu_dtype, nu_dtype

  def step(self, g: np.ndarray, b1=B1, b2=B2, eps=EPS) -> np.ndarray:
    self.count += 1
    mu = b1 * self.mu + (1 - b1) * g
    nu = b2 * self.nu + (1 - b2) * g * g
    out = (mu / (1 - b1**self.count)) / (np.sqrt(nu / (1 - b2**self.count)) + eps)
    self.mu = _stored(mu, self.mu_dtype)
    self.nu = _stored(nu, self.nu_dtype)
    return out


def _stored(x: np.ndarray, dtype) -> np.ndarray:
  return x if dtype is None else np.asarray(x.astype(dtype), np.float64)


def slices(shape):
  """Index tuples of the leading (stacked) axes of a leaf."""
  return list(itertools.product(*map(range, shape[:-2])))


# ---------------------------------------------------------------------------
# References of the three optimizers.
# ---------------------------------------------------------------------------


def np_dct_adamw(params, grads, *, lr, rank, weight_decay, scale, update_every, score,
                 on_refresh, side, mu_dtype=None, nu_dtype=None):
  """DCT-AdamW: Adam moments on the top-r DCT columns of every matrix, decoupled decay."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  state = {}  # (leaf, slice) -> [indices, NpAdam]
  vec_adam = {k: NpAdam(v.shape, mu_dtype, nu_dtype) for k, v in params.items() if v.ndim < 2}
  out = []
  for t, g_tree in enumerate(grads):
    updates = {}
    for name, w in params.items():
      g = np.asarray(g_tree[name], np.float64)
      if w.ndim < 2:
        updates[name] = vec_adam[name].step(g)
        continue
      full = np.zeros_like(g)
      for b in slices(g.shape):
        x = oriented(g[b], side)
        k, d = x.shape
        r = min(rank, *g.shape[-2:])
        c = np_dct(d)
        if (name, b) not in state:
          state[name, b] = [np.arange(r), NpAdam((k, r), mu_dtype, nu_dtype)]
        idx, adam = state[name, b]
        if t % update_every == 0:
          new = top_columns(x @ c.T, r, score)
          if on_refresh == "reset":
            adam.mu, adam.nu = 0 * adam.mu, 0 * adam.nu
          elif on_refresh == "rotate":  # moments follow their frequencies; new ones start at 0
            rot = (idx[:, None] == new[None, :]).astype(float)
            adam.mu, adam.nu = adam.mu @ rot, adam.nu @ rot
          idx = state[name, b][0] = new
        u = adam.step(x @ c[idx].T)
        full[b] = unoriented(scale * u @ c[idx], g.shape[-2:], side)
      updates[name] = full
    step_lr = lr(t)
    updates = {k: -step_lr * (u + weight_decay * params[k]) for k, u in updates.items()}
    params = {k: params[k] + updates[k] for k in params}
    out.append(updates)
  return out


def np_pca_grad(q: np.ndarray, gn: np.ndarray) -> np.ndarray:
  """Gradient of ||gn Q Q^T - gn||_F^2 with respect to Q, from the expanded loss."""
  e = gn @ q @ q.T - gn
  return 2 * (gn.T @ e @ q + e.T @ gn @ q)


def np_online_subspace_descent(params, grads, *, lr, rank, weight_decay, scale,
                               projector_lr, projector_weight_decay, update_every, on_refresh,
                               side, init, reference_lr, mu_dtype=None, nu_dtype=None):
  """Online Subspace Descent: Adam in a basis that takes one AdamW step on the online-PCA
  loss of G / ||G|| after each projection; the first basis from the first gradient."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  state = {}  # (leaf, slice) -> dict(q, qadam, adam)
  vec_adam = {k: NpAdam(v.shape, mu_dtype, nu_dtype) for k, v in params.items() if v.ndim < 2}
  out = []
  for t, g_tree in enumerate(grads):
    updates = {}
    for name, w in params.items():
      g = np.asarray(g_tree[name], np.float64)
      if w.ndim < 2:
        updates[name] = vec_adam[name].step(g)
        continue
      full = np.zeros_like(g)
      for b in slices(g.shape):
        x = oriented(g[b], side)
        k, d = x.shape
        r = min(rank, *g.shape[-2:])
        refresh = t % update_every == 0
        if t == 0:
          if init == "svd":
            q = np.linalg.svd(x, full_matrices=False)[2][:r].T
          else:
            q = np_dct(d)[top_columns(x @ np_dct(d).T, r, "l2")].T
          state[name, b] = {"q": q, "qadam": NpAdam(q.shape), "adam": NpAdam((k, r), mu_dtype,
                                                                           nu_dtype)}
        s = state[name, b]
        used = s["q"]
        nxt = used
        if refresh and t > 0:
          gn = x / np.linalg.norm(x)
          direction = s["qadam"].step(np_pca_grad(used, gn)) + projector_weight_decay * used
          nxt = used - projector_lr * lr(t) / reference_lr * direction
        if refresh and on_refresh == "reset":
          s["adam"].mu, s["adam"].nu = 0 * s["adam"].mu, 0 * s["adam"].nu
        u = s["adam"].step(x @ used)
        if refresh and on_refresh == "rotate":  # lagged: after the inner update, used -> next
          rot = used.T @ nxt
          s["adam"].mu, s["adam"].nu = s["adam"].mu @ rot, s["adam"].nu @ rot**2
        s["q"] = nxt
        full[b] = unoriented(scale * u @ used.T, g.shape[-2:], side)
      updates[name] = full
    step_lr = lr(t)
    updates = {k: -step_lr * (u + weight_decay * params[k]) for k, u in updates.items()}
    params = {k: params[k] + updates[k] for k in params}
    out.append(updates)
  return out


def np_newton_schulz(x: np.ndarray, steps: int = 5, coeffs=MUON_COEFFS, eps=1e-7) -> np.ndarray:
  """Muon's quintic iteration on the wide orientation, after dividing by ||x||_F + eps."""
  a, b, c = coeffs
  tall = x.shape[0] > x.shape[1]
  y = x.T if tall else x
  y = y / (np.linalg.norm(y) + eps)
  for _ in range(steps):
    s = y @ y.T
    y = a * y + (b * s + c * s @ s) @ y
  return y.T if tall else y


def np_trion(params, grads, *, lr, rank, momentum, weight_decay, score, update_every, side,
             adam_lr, adam_b1, adam_b2, adam_eps, ns_steps=5, mu_dtype=None):
  """Trion: a full-size momentum M (error feedback) accumulates the gradient; the top-r DCT
  columns of M are orthogonalised by Newton-Schulz and back-projected; M keeps everything
  outside the selected columns and decays by ``momentum`` inside them. Shape factor
  sqrt(max(1, n / m)); AdamW for the vectors."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mom = {k: np.zeros(v.shape) for k, v in params.items() if v.ndim >= 2}
  idx = {}
  vec_adam = {k: NpAdam(v.shape) for k, v in params.items() if v.ndim < 2}
  out = []
  for t, g_tree in enumerate(grads):
    updates = {}
    for name, w in params.items():
      g = np.asarray(g_tree[name], np.float64)
      if w.ndim < 2:
        u = vec_adam[name].step(g, adam_b1, adam_b2, adam_eps)
        updates[name] = -adam_lr(t) * (u + weight_decay * w)
        continue
      m_, n_ = g.shape[-2:]
      full = np.zeros_like(g)
      mom[name] = mom[name] + g  # float32 sum of the stored buffer and the gradient
      for b in slices(g.shape):
        x = oriented(mom[name][b], side)
        d = x.shape[1]
        r = min(rank, m_, n_)
        c = np_dct(d)
        if t % update_every == 0:
          idx[name, b] = top_columns(x @ c.T, r, score)
        low = x @ c[idx[name, b]].T
        ortho = np_newton_schulz(low, ns_steps) @ c[idx[name, b]]
        x_new = x - (1 - momentum) * low @ c[idx[name, b]]
        mom[name][b] = unoriented(x_new, (m_, n_), side)
        full[b] = unoriented(ortho, (m_, n_), side)
      mom[name] = _stored(mom[name], mu_dtype)
      updates[name] = -lr(t) * (np.sqrt(max(1.0, n_ / m_)) * full + weight_decay * w)
    params = {k: params[k] + updates[k] for k in params}
    out.append(updates)
  return out


# ---------------------------------------------------------------------------
# Harness.
# ---------------------------------------------------------------------------


def make_tree(seed: int, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}


def make_grads(seed: int, steps: int) -> list[dict]:
  """Gradients with a slowly drifting dominant subspace plus noise (so selections change
  between steps, and the PCA basis has something to track)."""
  rng = np.random.default_rng(seed)
  out = []
  base = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  for _ in range(steps):
    g = {}
    for k, s in SHAPES.items():
      base[k] = 0.8 * base[k] + 0.6 * rng.standard_normal(s)
      g[k] = jnp.asarray(base[k] + 0.3 * rng.standard_normal(s), jnp.float32)
    out.append(g)
  return out


@functools.cache
def _stepper(tx):
  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return u, s, optax.apply_updates(p, u)

  return jax.jit(step)


def run(tx, params, grads):
  """Our updates along the trajectory ``params_{t+1} = params_t + update_t``."""
  state = tx.init(params)
  ups, states = [], []
  for g in grads:
    u, state, params = _stepper(tx)(g, state, params)
    ups.append(u)
    states.append(state)
  return ups, states


def assert_updates_close(ours, ref, atol_rel=2e-5):
  for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
    for name in SHAPES:
      want = np.asarray(b[name])
      got = np.asarray(a[name], np.float64)
      scale = np.abs(want).max()
      np.testing.assert_allclose(got, want, atol=atol_rel * scale, rtol=0,
                                 err_msg=f"step {t}, leaf {name}")


def linear_decay(peak: float, steps: int = 20):
  return lambda t: peak * (1.0 - 0.5 * t / steps)


# ---------------------------------------------------------------------------
# dct_adamw.
# ---------------------------------------------------------------------------

DCT_OPTIONS = [
    dict(update_every=3, on_refresh="keep", score="l2", side="smaller"),
    dict(update_every=2, on_refresh="rotate", score="l1", side="larger"),
    dict(update_every=1, on_refresh="reset", score="l1", side="reduction"),
    dict(update_every=3, on_refresh="rotate", score="l2", side="output"),
]


@pytest.mark.parametrize("options", DCT_OPTIONS,
                         ids=["-".join(map(str, o.values())) for o in DCT_OPTIONS])
def test_dct_adamw_multistep_matches_numpy(options):
  steps, rank, wd, scale = 6, 3, 0.1, 0.5
  sched = optax.linear_schedule(0.02, 0.01, 20)
  params, grads = make_tree(0), make_grads(1, steps)
  tx = opt.dct_adamw(sched, rank, weight_decay=wd, scale=scale, **options)
  ours, _ = run(tx, params, grads)
  ref = np_dct_adamw(params, grads, lr=linear_decay(0.02), rank=rank, weight_decay=wd,
                     scale=scale, **options)
  assert_updates_close(ours, ref)


# ---------------------------------------------------------------------------
# online_subspace_descent.
# ---------------------------------------------------------------------------

OSD_OPTIONS = [
    dict(update_every=1, on_refresh="keep", projector_weight_decay=0.5, side="smaller",
         init="dct"),
    dict(update_every=2, on_refresh="rotate", projector_weight_decay=0.0, side="larger",
         init="dct"),
    dict(update_every=1, on_refresh="reset", projector_weight_decay=0.2, side="reduction",
         init="svd"),
    dict(update_every=3, on_refresh="keep", projector_weight_decay=0.3, side="output",
         init="svd"),
]


@pytest.mark.parametrize("options", OSD_OPTIONS,
                         ids=["-".join(map(str, o.values())) for o in OSD_OPTIONS])
def test_online_subspace_descent_multistep_matches_numpy(options):
  """A warm-up from exactly 0: the projector's rate follows lr_t / peak with no extra
  argument (the peak is 0.02 here)."""
  steps, rank, wd, scale, plr = 6, 3, 0.05, 0.25, 0.05
  sched = optax.linear_schedule(0.0, 0.02, 4)
  warmup = lambda t: 0.02 * min(t, 4) / 4
  params, grads = make_tree(2), make_grads(3, steps)
  tx = opt.online_subspace_descent(sched, rank, weight_decay=wd, scale=scale,
                                   projector_learning_rate=plr, **options)
  ours, _ = run(tx, params, grads)
  ref = np_online_subspace_descent(params, grads, lr=warmup, rank=rank, weight_decay=wd,
                                   scale=scale, projector_lr=plr, reference_lr=0.02, **options)
  assert_updates_close(ours, ref, atol_rel=5e-5)


def _basis_path(tx, params, grads):
  _, states = run(tx, params, grads)
  return [np.asarray(s[0].projector_state.basis["w"], np.float64) for s in states]


def test_projector_rate_under_warmup_follows_the_peak():
  """With a warm-up the basis moves at most as fast as with the constant peak learning rate
  (within 2x over 40 steps); dividing by the warm-up's first value instead (the old default)
  moves it ~9x as far here (the basis change saturates), which this check rejects."""
  steps = 40
  params = make_tree(4)
  grads = make_grads(5, steps)
  warmup = optax.linear_schedule(1e-4, 1e-2, 100)
  moved = {}
  for name, lr, extra in [("constant", 1e-2, {}), ("warmup", warmup, {}),
                          ("first_value", warmup, {"schedule_reference": 1e-4})]:
    path = _basis_path(opt.online_subspace_descent(lr, 3, **extra), params, grads)
    moved[name] = np.linalg.norm(path[-1] - path[0])
  assert moved["constant"] > 0
  assert moved["warmup"] <= 2.0 * moved["constant"], moved
  assert moved["first_value"] > 4.0 * moved["constant"], moved  # the bound can fail


def test_warmup_from_zero_needs_no_extra_argument():
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100)
  tx = opt.online_subspace_descent(sched, 2)
  ups, _ = run(tx, make_tree(6), make_grads(7, 3))
  for u in ups:
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_svd_init_is_the_first_gradient_principal_subspace():
  """init="svd": the first basis spans the top-r right singular vectors of the first
  (oriented) gradient, so a rank-r gradient is projected without loss at step 0; the DCT
  initialisation loses a large part of it."""
  rng = np.random.default_rng(8)
  g = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 8))  # rank 3, 8 projected
  grads = [{"w": jnp.asarray(g, jnp.float32)}]
  params = {"w": jnp.zeros((12, 8))}
  lost = {}
  for init in ("svd", "dct"):
    tx = opt.subspace(optax.identity(), opt.online_pca_projector(3, init=init))
    (u,), (state,) = run(tx, params, grads)
    lost[init] = np.linalg.norm(g - np.asarray(u["w"], np.float64)) ** 2 / np.linalg.norm(g) ** 2
    q = np.asarray(state.projector_state.basis["w"], np.float64)
    if init == "svd":
      v = np.linalg.svd(g)[2][:3].T
      np.testing.assert_allclose(np.abs(q.T @ v), np.eye(3), atol=1e-5)
  assert lost["svd"] < 1e-9 and lost["dct"] > 0.1, lost


# ---------------------------------------------------------------------------
# Low-precision moments.
# ---------------------------------------------------------------------------


def _state_bytes(state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


@pytest.mark.parametrize("factory", ["dct_adamw", "online_subspace_descent"])
def test_bf16_moments_match_rounded_numpy_and_halve_the_state(factory):
  """mu and nu stored in bfloat16, the update computed in float32 from the stored values:
  the reference rounds the moments to bfloat16 after every step and nothing else."""
  steps, rank = 4, 3
  params, grads = make_tree(9), make_grads(10, steps)
  bf16 = ml_dtypes.bfloat16
  make = getattr(opt, factory)
  low = make(1e-2, rank, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  ours, states = run(low, params, grads)
  moments = states[-1][0].inner_state
  assert moments.mu["w"].dtype == jnp.bfloat16 and moments.nu["stack"].dtype == jnp.bfloat16
  assert moments.mu["b"].dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(ours))
  kw = dict(lr=lambda t: 1e-2, rank=rank, weight_decay=1e-4 if factory == "dct_adamw" else 0.0,
            mu_dtype=bf16, nu_dtype=bf16)
  if factory == "dct_adamw":
    ref = np_dct_adamw(params, grads, scale=1.0, update_every=1, score="l2",
                       on_refresh="rotate", side="smaller", **kw)
  else:
    ref = np_online_subspace_descent(params, grads, scale=0.25, projector_lr=0.005,
                                     projector_weight_decay=0.01, update_every=1,
                                     on_refresh="keep", side="smaller", init="svd",
                                     reference_lr=1e-2, **kw)
  assert_updates_close(ours, ref, atol_rel=1e-4)
  # bf16 moments at <= 0.52x the float32 state (rank-shaped moments dominate a real model;
  # here the projector's state is part of the total, so measure the moments alone too)
  big = {"w": jnp.zeros((256, 512)), "b": jnp.zeros((512,))}
  full = make(1e-2, 32)
  ratio_moments = (_state_bytes(low.init(big)[0].inner_state)
                   / _state_bytes(full.init(big)[0].inner_state))
  assert ratio_moments <= 0.52, ratio_moments
  if factory == "dct_adamw":
    assert _state_bytes(low.init(big)) <= 0.52 * _state_bytes(full.init(big))


@pytest.mark.parametrize("dtype", ["int32", "float0"])
def test_non_floating_moment_dtype_raises(dtype):
  for make in (opt.dct_adamw, opt.online_subspace_descent):
    with pytest.raises(ValueError, match="mu_dtype"):
      make(1e-2, 2, mu_dtype=dtype)
    with pytest.raises(ValueError, match="nu_dtype"):
      make(1e-2, 2, nu_dtype=dtype)


# ---------------------------------------------------------------------------
# Trion.
# ---------------------------------------------------------------------------

TRION_OPTIONS = [
    dict(score="l1", update_every=1, side="smaller", momentum=0.95),
    dict(score="l2", update_every=2, side="larger", momentum=0.8),
]


@pytest.mark.parametrize("options", TRION_OPTIONS,
                         ids=["-".join(map(str, o.values())) for o in TRION_OPTIONS])
def test_trion_multistep_matches_numpy(options):
  steps, rank, wd = 5, 3, 0.1
  params, grads = make_tree(11), make_grads(12, steps)
  lr, adam_lr = 0.02, 3e-3
  tx = opt.trion(lr, rank, weight_decay=wd, adam_learning_rate=adam_lr, **options)
  ours, states = run(tx, params, grads)
  ref = np_trion(params, grads, lr=lambda t: lr, rank=rank, weight_decay=wd,
                 adam_lr=lambda t: adam_lr, adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, **options)
  assert_updates_close(ours, ref, atol_rel=1e-4)
  # the buffer is full size, the subspace state r int32 indices per matrix
  st = states[-1][0]
  assert st.momentum["w"].shape == SHAPES["w"]
  assert st.subspace.projector_state.indices["stack"].shape == (2, 3)


def test_trion_error_feedback_keeps_what_the_projection_drops():
  """A gradient outside the selected columns is kept whole in the buffer; the selected part
  decays by momentum (the negative control: a plain low-rank momentum would lose it)."""
  d, k, r = 8, 12, 2
  c = np_dct(d)
  g = 5.0 * np.outer(np.ones(k), c[1]) + 1.0 * np.outer(np.arange(k) / k, c[6])  # 2 freqs
  tx = opt.trion(0.1, r - 1, momentum=0.9)  # keeps 1 column: frequency 1
  params = {"w": jnp.zeros((k, d))}
  _, (state,) = run(tx, params, [{"w": jnp.asarray(g, jnp.float32)}])
  buf = np.asarray(state[0].momentum["w"], np.float64)
  np.testing.assert_allclose(buf @ c[6], g @ c[6], atol=1e-5)  # dropped: kept whole
  np.testing.assert_allclose(buf @ c[1], 0.9 * g @ c[1], atol=1e-5)  # selected: decays


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (2, 4, 7)])
def test_trion_rank_above_min_dim_clamps(shape):
  """rank > min(m, n) keeps min(m, n) columns: the whole basis, so the direction is the
  orthogonalised full buffer (Muon with error feedback at full rank)."""
  g = np.random.default_rng(13).standard_normal(shape)
  tx = opt.trion(1.0, 50, shape_factor=False)
  (u,), (state,) = run(tx, {"w": jnp.zeros(shape)}, [{"w": jnp.asarray(g, jnp.float32)}])
  assert state[0].subspace.projector_state.indices["w"].shape[-1] == min(shape[-2:])
  for b in slices(shape):
    np.testing.assert_allclose(np.asarray(u["w"][b], np.float64), -np_newton_schulz(g[b]),
                               atol=2e-5)


def test_trion_bf16_state_and_bad_input():
  params = make_tree(14)
  low = opt.trion(0.02, 3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  full = opt.trion(0.02, 3)
  big = {"w": jnp.zeros((256, 512)), "b": jnp.zeros((512,))}
  s_low, s_full = low.init(big), full.init(big)
  assert s_low[0].momentum["w"].dtype == jnp.bfloat16
  assert s_low[0].nu["b"].dtype == jnp.bfloat16
  assert _state_bytes(s_low) <= 0.52 * _state_bytes(s_full)
  ours, _ = run(low, params, make_grads(15, 3))
  ref = np_trion(params, make_grads(15, 3), lr=lambda t: 0.02, rank=3, momentum=0.95,
                 weight_decay=0.0, score="l1", update_every=1, side="smaller",
                 adam_lr=lambda t: 0.02, adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8,
                 mu_dtype=ml_dtypes.bfloat16)
  for t in range(3):  # the buffer is rounded to bf16 each step; Adam moments too
    np.testing.assert_allclose(np.asarray(ours[t]["w"], np.float64), ref[t]["w"],
                               atol=2e-3 * np.abs(ref[t]["w"]).max())
  for kwargs, name in [({"ns_steps": -1}, "ns_steps"), ({"ns_coeffs": "cubic"}, "ns_coeffs"),
                       ({"score": "l3"}, "score"), ({"mu_dtype": "int8"}, "mu_dtype"),
                       ({"rank": 0}, "rank"), ({"side": "left"}, "side")]:
    with pytest.raises(ValueError, match=name):
      opt.trion(0.02, **{"rank": 2, **kwargs})


# ---------------------------------------------------------------------------
# Flax nnx state (parameters held in nnx.Param variables).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: opt.dct_adamw(1e-2, 2, on_refresh="rotate", update_every=2),
    lambda: opt.online_subspace_descent(1e-2, 2, on_refresh="rotate"),
    lambda: opt.trion(2e-2, 2),
], ids=["dct_adamw", "online_subspace_descent", "trion"])
def test_trains_an_nnx_state_like_a_plain_dict(make):
  """``nnx.split`` params keep nnx.Param variables in the tree: the updates equal those on
  the same params as a plain dict, over refreshes that rotate the moments."""
  from flax import nnx

  model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  _, state = nnx.split(model, nnx.Param)
  plain = nnx.to_pure_dict(state)
  rng = np.random.default_rng(16)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), plain)
           for _ in range(3)]
  tx = make()
  ups_plain, _ = run(tx, plain, grads)
  boxed_grads = []
  for g in grads:
    s = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(s, g)
    boxed_grads.append(s)
  ups_boxed, _ = run(tx, state, boxed_grads)
  for a, b in zip(ups_plain, ups_boxed, strict=True):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("factory", ["trion", "dct_adamw", "online_subspace_descent"])
def test_weight_decay_mask(factory):
  """``mask`` selects the leaves that decay: a masked-in leaf gets the undecayed update
  minus ``lr * weight_decay * w``, a masked-out leaf exactly the undecayed update."""
  rng = np.random.default_rng(27)
  params = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(6), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  lr, wd = 0.1, 0.5
  make = getattr(opt, factory)
  base = make(lr, 2, weight_decay=0.0)
  masked = make(lr, 2, weight_decay=wd, mask={"w": True, "b": False})
  u0, _ = base.update(grads, base.init(params), params)
  u1, _ = masked.update(grads, masked.init(params), params)
  np.testing.assert_allclose(u1["w"], u0["w"] - lr * wd * params["w"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(u1["b"], u0["b"])
