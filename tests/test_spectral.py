"""optimizers.spectral against float64 NumPy references (SVD, Adam written out by hand).

The matrix functions themselves (accuracy, invariances, sharding) are tested in
test_linalg.py; here: the transforms' matrix views (default, stacked, explicit
dims), dtypes, thresholds, the SPECTRA update rule (as documented in
``spectra_adamw``) and bad input. Every configuration is compiled once (compilation
dominates on CPU).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

from _reference import rel_err, singular_values, with_spectrum
from optimizers import MatrixDims, spectra_adamw, spectra_threshold_schedule, spectral_clip

# ---------------------------------------------------------------------------
# References.
# ---------------------------------------------------------------------------

SPECTRAL_MAPS = {
    "soft": lambda s, c: s / np.sqrt(1.0 + (s / c) ** 2),
    "hard": lambda s, c: np.minimum(s, c),
}


def clip_matrix_ref(x, c, mode):
  """``U h(S) V^T`` of one 2-D matrix, float64."""
  u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return (u * SPECTRAL_MAPS[mode](s, c)) @ vt


def clip_last_two_ref(x, c, mode):
  """Default view: every ``x[idx]`` over the leading indices is a matrix."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-2]):
    out[idx] = clip_matrix_ref(x[idx], c, mode)
  return out


# ---------------------------------------------------------------------------
# spectral_clip, default view: one compiled update per mode, checked leaf by leaf.
# ---------------------------------------------------------------------------

C = 1.0
SPIKE_SHAPE = (2, 20, 12)  # tall


def spiked_stack(rng):
  """Per matrix one singular value at 100c, the bulk within 2% of c."""
  k = min(SPIKE_SHAPE[1:])
  out = []
  for _ in range(SPIKE_SHAPE[0]):
    s = np.concatenate([[100 * C], C * (1 + 0.02 * rng.standard_normal(k - 1))])
    out.append(with_spectrum(rng, *SPIKE_SHAPE[1:], s))
  return np.stack(out)


def default_tree():
  """A wide matrix, square matrices stacked over two leading axes (one of them zero), a tall
  spiked stack, a bias and a scalar. Singular values of 0.5 N(0, 1) matrices of these shapes
  straddle c = 1."""
  rng = np.random.default_rng(0)
  x = {"wide": 0.5 * rng.standard_normal((5, 9)),
       "stacked": 0.5 * rng.standard_normal((2, 3, 6, 6)),
       "spiked": spiked_stack(rng),
       "bias": rng.standard_normal(9), "scalar": np.float64(rng.standard_normal())}
  x["stacked"][1, 2] = 0.0
  return x


MATRIX_LEAVES = ("wide", "stacked", "spiked")


@pytest.fixture(scope="module", params=["soft", "hard"])
def clipped(request):
  mode = request.param
  x = default_tree()
  tx = spectral_clip(C, mode=mode)
  update = jax.jit(tx.update)
  tree = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), x)
  state = tx.init(tree)
  out, new_state = update(tree, state)
  zeros_out, zeros_state = update(jax.tree.map(jnp.zeros_like, tree), state)
  return dict(mode=mode, x=x, out=out, state=new_state, zeros_out=zeros_out,
              zeros_state=zeros_state)


def test_default_view_matches_svd(clipped):
  """Rectangular both ways (the tall case is the spiked stack below), square, stacked."""
  x, out, mode = clipped["x"], clipped["out"], clipped["mode"]
  for name in ("wide", "stacked"):
    assert out[name].shape == x[name].shape and out[name].dtype == jnp.float32
    assert rel_err(out[name], clip_last_two_ref(x[name], C, mode)) < 2e-5, name
  s_in = np.concatenate([singular_values(x[n]).ravel() for n in ("wide", "stacked")])
  assert s_in.max() > C and np.sum(s_in < C) > 10  # the threshold is active and inactive


def test_non_matrix_leaves_untouched(clipped):
  x, out = clipped["x"], clipped["out"]
  for name in ("bias", "scalar"):
    assert out[name].shape == np.shape(x[name])
    np.testing.assert_array_equal(out[name], np.asarray(x[name], np.float32))


def test_spiked_spectrum(clipped):
  """The bulk next to a spike at 100c is clipped right (soft: 0.71c, not the 0.49c of the
  unscaled reference iteration; hard: c). Tolerance: the float32 Gram's ~1e-7 (100)^2."""
  x, out, mode = clipped["x"], clipped["out"], clipped["mode"]
  assert out["spiked"].shape == SPIKE_SHAPE
  for i in range(SPIKE_SHAPE[0]):
    got = singular_values(out["spiked"][i])
    expected = SPECTRAL_MAPS[mode](singular_values(x["spiked"][i]), C)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * C)
    if mode == "soft":
      assert abs(np.median(got) / C - 1 / math.sqrt(2)) < 0.01
  assert rel_err(out["spiked"], clip_last_two_ref(x["spiked"], C, mode)) < 1e-3


def test_zeros(clipped):
  """A zero matrix next to nonzero ones in a stack, and an all-zero tree, give zeros."""
  assert bool(jnp.all(clipped["out"]["stacked"][1, 2] == 0))
  for leaf in jax.tree.leaves(clipped["zeros_out"]):
    assert bool(jnp.all(leaf == 0))
  assert float(clipped["zeros_state"].norm_ratio) == 1.0


def test_state_counts_and_norm_ratio(clipped):
  x, out, state = clipped["x"], clipped["out"], clipped["state"]
  assert int(state.count) == 1 and state.count.dtype == jnp.int32
  sq_in = sum(np.sum(np.asarray(x[n], np.float64) ** 2) for n in MATRIX_LEAVES)
  sq_out = sum(np.sum(np.asarray(out[n], np.float64) ** 2) for n in MATRIX_LEAVES)
  np.testing.assert_allclose(float(state.norm_ratio), math.sqrt(sq_out / sq_in), rtol=1e-5)
  assert float(state.norm_ratio) < 1.0


# ---------------------------------------------------------------------------
# spectral_clip: explicit dims, dtypes, thresholds.
# ---------------------------------------------------------------------------


def test_explicit_dims_layer_axis_at_1():
  """MaxText-style (embed, layers, mlp) and (embed, layers, heads, head_dim) kernels (optax's
  MuonDimensionNumbers for one) and a 2-D leaf excluded by ``None``, in one pytree of dims."""
  rng = np.random.default_rng(1)
  x = {"mlp": rng.standard_normal((6, 3, 10)), "attn": rng.standard_normal((6, 2, 4, 3)),
       "norm": rng.standard_normal((3, 6))}
  dims = {"mlp": MuonDimensionNumbers(reduction_axis=0, output_axis=2),
          "attn": MatrixDims(reduction_axis=0, output_axis=(2, 3)), "norm": None}
  c = 1.5
  tx = spectral_clip(c, weight_dimension_numbers=dims)
  tree = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), x)
  out, _ = jax.jit(tx.update)(tree, tx.init(tree))
  for layer in range(3):
    expected = clip_matrix_ref(x["mlp"][:, layer, :], c, "soft")
    assert rel_err(out["mlp"][:, layer, :], expected) < 2e-5
  for layer in range(2):
    expected = clip_matrix_ref(x["attn"][:, layer].reshape(6, 12), c, "soft").reshape(6, 4, 3)
    assert rel_err(out["attn"][:, layer], expected) < 2e-5
  np.testing.assert_array_equal(out["norm"], np.asarray(x["norm"], np.float32))
  # The (6, 12) per-layer matrices differ from the default view's (4, 3) slices.
  assert rel_err(out["attn"], clip_last_two_ref(x["attn"], c, "soft")) > 1e-2


def test_callable_dims_see_params():
  """A callable is applied to the params (here: a leaf is a matrix iff its param is)."""
  rng = np.random.default_rng(2)
  grads = {"w": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32),
           "v": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)}
  params = {"w": jnp.zeros((4, 6)), "v": jnp.zeros((4, 6), jnp.bfloat16)}
  dims_fn = lambda p: jax.tree.map(lambda a: MatrixDims() if a.dtype == jnp.float32 else None, p)
  tx = spectral_clip(1.0, weight_dimension_numbers=dims_fn)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert rel_err(out["w"], clip_matrix_ref(grads["w"], 1.0, "soft")) < 2e-5
  np.testing.assert_array_equal(out["v"], grads["v"])


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_bf16_keeps_dtype_computes_in_float32(mode):
  rng = np.random.default_rng(3)
  c = 2.0
  tree = {"w": jnp.asarray(rng.standard_normal((2, 6, 10)), jnp.bfloat16),
          "b": jnp.asarray(rng.standard_normal(10), jnp.bfloat16)}
  tx = spectral_clip(c, mode=mode)
  out, state = jax.jit(tx.update)(tree, tx.init(tree))
  assert out["w"].dtype == out["b"].dtype == jnp.bfloat16
  assert state.norm_ratio.dtype == jnp.float32
  np.testing.assert_array_equal(out["b"], tree["b"])
  expected = clip_last_two_ref(np.asarray(tree["w"], np.float64), c, mode)
  got = np.asarray(out["w"], np.float64)
  # float32 compute then one rounding to bf16 (relative half-ulp 2^-9) per entry; a bf16
  # Newton–Schulz would be off by ~1e-2 of the norm.
  tol = 2.0**-8 * np.abs(expected) + 1e-5 * np.abs(expected).max()
  assert np.all(np.abs(got - expected) <= tol)


def test_threshold_as_schedule():
  """``max_singular_value`` as a schedule of the update count (a traced scalar threshold is
  checked by the conformance suite's inject_hyperparams case)."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((5, 8))
  tree = {"w": jnp.asarray(x, jnp.float32)}
  tx = spectral_clip(lambda count: 0.5 * (count + 1))
  update = jax.jit(tx.update)
  state = tx.init(tree)
  for step in range(3):
    out, state = update(tree, state)
    assert rel_err(out["w"], clip_matrix_ref(x, 0.5 * (step + 1), "soft")) < 2e-5
  assert int(state.count) == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_singular_value": 0.0}, "max_singular_value"),
        ({"max_singular_value": -1.0}, "max_singular_value"),
        ({"max_singular_value": float("nan")}, "max_singular_value"),
        ({"max_singular_value": float("inf")}, "max_singular_value"),
        ({"max_singular_value": 1.0, "mode": "medium"}, "mode"),
        ({"max_singular_value": 1.0, "ns_steps": 0}, "ns_steps"),
        ({"max_singular_value": 1.0, "ns_steps": 2.5}, "ns_steps"),
        ({"max_singular_value": 1.0, "sign_steps": (8,)}, "sign_steps"),
    ],
    ids=str,
)
def test_spectral_clip_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    spectral_clip(**kwargs)


def test_spectral_clip_rejects_integer_updates():
  tx = spectral_clip(1.0)
  tree = {"w": jnp.ones((2, 3), jnp.int32)}
  with pytest.raises(TypeError, match="spectral_clip"):
    tx.update(tree, tx.init(tree))


def test_zero_size_leaf_passes_through():
  tx = spectral_clip(1.0, mode="hard")
  tree = {"w": jnp.zeros((0, 5)), "v": jnp.zeros((3, 0, 4))}
  out, state = tx.update(tree, tx.init(tree))
  assert out["w"].shape == (0, 5) and out["v"].shape == (3, 0, 4)
  assert float(state.norm_ratio) == 1.0


# ---------------------------------------------------------------------------
# spectra_adamw against Adam written out in float64.
# ---------------------------------------------------------------------------

SHAPES = {"wide": (4, 12), "tall_stack": (2, 6, 3), "bias": (12,)}


def shape_factor(shape):
  """``a = sqrt(max(1, fan_out / fan_in))`` for the (in, out) = (m, n) default view."""
  return math.sqrt(max(1.0, shape[-1] / shape[-2]))


def spectra_adamw_ref(params, grads_seq, *, lr, c, b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=0.0, wd_mask=None, pre_clip=None, mode="soft",
                      use_shape_factor=True):
  """The SPECTRA updates step by step: ``-lr_t (a H_{c_t}(U_t) + wd W_t)`` per matrix,
  ``U_t`` the bias-corrected Adam direction of the (optionally pre-clipped) gradient."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  nu = {k: np.zeros_like(v) for k, v in params.items()}
  updates = []
  for t, grads in enumerate(grads_seq):
    step = {}
    for k, w in params.items():
      g = np.asarray(grads[k], np.float64)
      is_matrix = g.ndim >= 2
      if pre_clip is not None and is_matrix:
        g = clip_last_two_ref(g, pre_clip, mode)
      mu[k] = b1 * mu[k] + (1 - b1) * g
      nu[k] = b2 * nu[k] + (1 - b2) * g * g
      u = (mu[k] / (1 - b1 ** (t + 1))) / (np.sqrt(nu[k] / (1 - b2 ** (t + 1))) + eps)
      if is_matrix:
        u = clip_last_two_ref(u, c(t), mode)
        if use_shape_factor:
          u = shape_factor(w.shape) * u
      decay = weight_decay if wd_mask is None or wd_mask[k] else 0.0
      step[k] = -lr(t) * (u + decay * w)
    params = {k: params[k] + step[k] for k in params}
    updates.append(step)
  return updates


def make_problem(seed, steps, param_scale, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  params = {k: param_scale * rng.standard_normal(s) for k, s in shapes.items()}
  grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]
  return params, grads


def run_optimizer(opt, params, grads_seq):
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  state = opt.init(params)
  step = jax.jit(opt.update)
  updates = []
  for g in grads_seq:
    u, state = step({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
  return updates, step, state


# float32 vs float64: optax's bias correction 1 - b2^t in float32 loses ~5 digits to
# cancellation for b2 = 0.999 (relative error up to ~3e-5 in the Adam direction).
ADAM_RTOL = 1e-4


def assert_updates_close(got, expected, rtol=ADAM_RTOL):
  for t, (g, e) in enumerate(zip(got, expected, strict=True)):
    for k in e:
      assert rel_err(g[k], e[k]) < rtol, (t, k, rel_err(g[k], e[k]))


WARMUP = 3
LR = optax.warmup_cosine_decay_schedule(init_value=1e-3, peak_value=1e-2, warmup_steps=WARMUP,
                                        decay_steps=8)
C_POST = 2.0


def reference_threshold(t):
  """The SPECTRA threshold: ``c_t = c lr_peak / lr_t`` during the warm-up, ``c`` afterwards."""
  return C_POST * 1e-2 / float(LR(t)) if t < WARMUP else C_POST


@pytest.fixture(scope="module")
def soft_schedule_run():
  """Soft post-clip, warm-up schedule (threshold follows it), weight decay on big weights."""
  params, grads = make_problem(10, steps=6, param_scale=30.0)
  opt = spectra_adamw(LR, max_singular_value=C_POST, weight_decay=0.5)
  updates, step, _ = run_optimizer(opt, params, grads)
  return dict(opt=opt, params=params, grads=grads, updates=updates, step=step)


def test_spectra_adamw_matches_reference(soft_schedule_run):
  r = soft_schedule_run
  expected = spectra_adamw_ref(r["params"], r["grads"], lr=LR, c=reference_threshold,
                               weight_decay=0.5)
  assert_updates_close(r["updates"], expected)
  # The clip is active: without it the reference differs.
  unclipped = spectra_adamw_ref(r["params"], r["grads"], lr=LR, c=lambda t: 1e9,
                                weight_decay=0.5)
  assert rel_err(r["updates"][-1]["wide"], unclipped[-1]["wide"]) > 1e-2
  # During the warm-up the threshold is c lr_peak / lr_t, not c.
  constant_c = spectra_adamw_ref(r["params"], r["grads"], lr=LR, c=lambda t: C_POST,
                                 weight_decay=0.5)
  assert rel_err(r["updates"][1]["wide"], constant_c[1]["wide"]) > 1e-2


def test_weight_decay_is_not_clipped(soft_schedule_run):
  """Zero gradient: the Adam direction is 0, the update is exactly -lr wd W although
  wd W has singular values far above the threshold."""
  r = soft_schedule_run
  params = {k: jnp.asarray(v, jnp.float32) for k, v in r["params"].items()}
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, _ = r["step"](zeros, r["opt"].init(params), params)
  for k in SHAPES:
    np.testing.assert_allclose(u[k], -float(LR(0)) * 0.5 * r["params"][k], rtol=1e-6)
  assert singular_values(0.5 * r["params"]["wide"]).max() > 2 * reference_threshold(0)


def test_hard_preclip_masked_decay_no_shape_factor():
  params, grads = make_problem(11, steps=3, param_scale=3.0,
                               shapes={"wide": SHAPES["wide"], "bias": SHAPES["bias"]})
  mask = {"wide": True, "bias": False}
  opt = spectra_adamw(0.05, max_singular_value=1.5, weight_decay=0.1, mask=mask, pre_clip=0.1,
                      mode="hard", shape_factor=False)
  updates, _, state = run_optimizer(opt, params, grads)
  kwargs = dict(lr=lambda t: 0.05, c=lambda t: 1.5, weight_decay=0.1, wd_mask=mask, mode="hard",
                use_shape_factor=False)
  assert_updates_close(updates, spectra_adamw_ref(params, grads, pre_clip=0.1, **kwargs))
  # The pre-clip matters: raw N(0, 1) gradients have singular values far above 0.1.
  without = spectra_adamw_ref(params, grads, **kwargs)
  assert rel_err(updates[-1]["wide"], without[-1]["wide"]) > 1e-2
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------
# The warm-up threshold schedule.
# ---------------------------------------------------------------------------


def test_threshold_schedule_warmup_then_constant():
  detected = spectra_threshold_schedule(C_POST, LR)
  explicit = spectra_threshold_schedule(C_POST, LR, warmup_steps=WARMUP)
  for t in range(12):
    expected = reference_threshold(t)
    np.testing.assert_allclose(float(detected(t)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(explicit(t)), expected, rtol=1e-5)
  assert float(LR(8)) < 1e-2  # decaying after the peak: c stays c
  np.testing.assert_allclose(float(jax.jit(detected)(jnp.int32(1))), reference_threshold(1),
                             rtol=1e-5)


def test_threshold_schedule_linear_warmup_from_zero_and_no_warmup():
  linear = optax.linear_schedule(0.0, 1e-3, transition_steps=10)
  c_t = spectra_threshold_schedule(5.0, linear)
  assert np.isfinite(float(c_t(0))) and float(c_t(0)) >= 5.0 * 1e5
  for t in (1, 4, 9):
    np.testing.assert_allclose(float(c_t(t)), 5.0 * 1e-3 / float(linear(t)), rtol=1e-5)
  decay = optax.cosine_decay_schedule(1e-3, decay_steps=20)
  c_decay = spectra_threshold_schedule(5.0, decay)
  assert all(float(c_decay(t)) == 5.0 for t in (0, 5, 19))


# ---------------------------------------------------------------------------
# Bad input: ValueError at construction naming the argument.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_singular_value": 0.0}, "max_singular_value"),
        ({"max_singular_value": -5.0}, "max_singular_value"),
        ({"max_singular_value": float("inf")}, "max_singular_value"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"pre_clip": 0.0}, "pre_clip"),
        ({"mode": "soft_hard"}, "mode"),
        ({"ns_steps": 0}, "ns_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.0}, "warmup_steps"),
        ({"learning_rate": LR, "warmup_steps": -1}, "warmup_steps"),
    ],
    # Stable ids (a function's repr holds its address, which differs between xdist workers).
    ids=lambda v: v if isinstance(v, str) else ",".join(
        f"{k}={'schedule' if callable(x) else x}" for k, x in v.items()),
)
def test_spectra_adamw_bad_input(kwargs, match):
  kwargs = {"learning_rate": 1e-3, **kwargs}
  with pytest.raises(ValueError, match=match):
    spectra_adamw(**kwargs)
