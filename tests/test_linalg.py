"""optimizers.linalg against float64 NumPy references (SVD / eigh, computed the slow way)."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from _reference import rel_err, singular_values, with_spectrum
from optimizers import linalg
from optimizers.linalg import (
  hard_spectral_clip,
  inverse_sqrt_apply,
  orthogonalize,
  psd_top_eigenvalue_bound,
  soft_spectral_clip,
  symmetric_sign,
  top_right_singular_vectors,
)

SOFT = jax.jit(soft_spectral_clip)
HARD = jax.jit(hard_spectral_clip)
CLIPS = {"soft": SOFT, "hard": HARD}


# ---------------------------------------------------------------------------
# References.
# ---------------------------------------------------------------------------


def soft_ref(s, c):
  return s / np.sqrt(1.0 + (s / c) ** 2)


def hard_ref(s, c):
  return np.minimum(s, c)


REFS = {"soft": soft_ref, "hard": hard_ref}


def svd_map(x, f):
  """``U f(S) V^T`` per trailing matrix, float64."""
  u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return (u * f(s)[..., None, :]) @ vt


# ---------------------------------------------------------------------------
# Soft and hard clips vs SVD.
# ---------------------------------------------------------------------------

SHAPES = [(6, 10), (10, 6), (8, 8), (3, 2, 5, 7), (2, 9, 4)]


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_clip_matches_svd(mode, shape):
  rng = np.random.default_rng(sum(shape) + len(mode))
  x = rng.standard_normal(shape) * rng.uniform(0.3, 1.5)
  c = float(rng.uniform(0.5, 2.0))  # singular values on both sides of c
  got = CLIPS[mode](jnp.asarray(x, jnp.float32), c)
  assert got.shape == shape and got.dtype == jnp.float32
  expected = svd_map(x, lambda s: REFS[mode](s, c))
  assert rel_err(got, expected) < 2e-5


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=str)
def test_spiked_spectrum(mode, shape):
  """One singular value at 100c, the bulk near c: the bulk must come out right
  (soft: c/sqrt(2) ~ 0.71c for s = c; the unscaled reference iteration gives 0.49c)."""
  rng = np.random.default_rng(7)
  c = 0.3
  k = min(shape)
  s = np.concatenate([[100 * c], c * (1 + 0.02 * rng.standard_normal(k - 1))])
  x = with_spectrum(rng, *shape, s)
  got = singular_values(CLIPS[mode](jnp.asarray(x, jnp.float32), c))
  expected = np.sort(REFS[mode](s, c))[::-1]
  # float32 Gram accuracy at a 100c spike: ~1e-4 c soft, a few 1e-4 c hard (documented in linalg).
  np.testing.assert_allclose(got, expected, rtol=0, atol=(2e-4 if mode == "soft" else 1e-3) * c)
  if mode == "soft":
    assert abs(np.median(got) / c - 1 / math.sqrt(2)) < 0.02


def reference_spectra_soft_clip(x, c, steps=10):
  """The SPECTRA reference algorithm in float64: unscaled coupled Newton–Schulz
  on (I + XX^T/c^2) / alpha with alpha = min(Gershgorin, Frobenius)."""
  a = np.eye(x.shape[0]) + x @ x.T / c**2
  alpha = min(np.abs(a).sum(axis=1).max(), np.linalg.norm(a))
  y, z = a / alpha, np.eye(x.shape[0])
  for _ in range(steps):
    t = 0.5 * (3 * np.eye(x.shape[0]) - z @ y)
    y, z = y @ t, t @ z
  return z @ x / math.sqrt(alpha)


def test_spike_beats_unscaled_reference():
  rng = np.random.default_rng(11)
  s = np.concatenate([[100.0], np.ones(15)])
  x = with_spectrum(rng, 16, 32, s)
  bulk_ref = np.median(singular_values(reference_spectra_soft_clip(x, 1.0)))
  bulk_ours = np.median(singular_values(SOFT(jnp.asarray(x, jnp.float32), 1.0)))
  assert bulk_ref < 0.6  # the reference over-shrinks the bulk (~0.49c)
  assert abs(bulk_ours - 1 / math.sqrt(2)) < 1e-4


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_wide_spread_spectrum(mode):
  """Singular values from 1e-3 c to 1e2 c; accuracy is limited by the float32 Gram
  (relative ~1e-7 (s_max/c)^2 of c), not by convergence."""
  rng = np.random.default_rng(3)
  c = 2.0
  s = c * np.geomspace(1e-3, 1e2, 20)
  x = with_spectrum(rng, 20, 36, s)
  got = singular_values(CLIPS[mode](jnp.asarray(x, jnp.float32), c))
  expected = np.sort(REFS[mode](s, c))[::-1]
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-3 * c)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_singular_values_clustered_at_threshold(mode):
  """Hard clip's matrix sign works on the relative gap (s^2 - c^2)/(s^2 + c^2):
  values within 1e-6..1e-1 of c are right even next to a spike at 30c."""
  rng = np.random.default_rng(5)
  d = np.geomspace(1e-6, 0.1, 9)
  s = np.concatenate([[30.0], 1 + d, 1 - d])
  x = with_spectrum(rng, 19, 25, s)
  got = singular_values(CLIPS[mode](jnp.asarray(x, jnp.float32), 1.0))
  expected = np.sort(REFS[mode](s, 1.0))[::-1]
  np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_zeros_and_rank_deficient(mode):
  z = CLIPS[mode](jnp.zeros((3, 5, 7)), 1.0)
  assert bool(jnp.all(z == 0))
  rng = np.random.default_rng(2)
  x = np.zeros((8, 12))
  x[:3] = 3 * rng.standard_normal((3, 12))  # rank 3, big singular values
  got = CLIPS[mode](jnp.asarray(x, jnp.float32), 1.0)
  assert rel_err(got, svd_map(x, lambda s: REFS[mode](s, 1.0))) < 2e-5
  assert bool(jnp.all(got[3:] == 0))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_bf16(mode):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 12, 20)), jnp.bfloat16)
  got = CLIPS[mode](x, 2.0)
  assert got.dtype == jnp.bfloat16
  expected = svd_map(np.asarray(x, np.float64), lambda s: REFS[mode](s, 2.0))
  assert rel_err(np.asarray(got, np.float64), expected) < 1e-2


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_float64_input_computes_in_float64(mode):
  rng = np.random.default_rng(6)
  x = rng.standard_normal((6, 9))
  with jax.enable_x64(True):
    got = CLIPS[mode](jnp.asarray(x, jnp.float64), 1.5)
    assert got.dtype == jnp.float64
  # The hard clip's fixed sign-iteration count is tuned for float32: ~2e-7 in float64.
  tol = 1e-11 if mode == "soft" else 1e-6
  assert rel_err(got, svd_map(x, lambda s: REFS[mode](s, 1.5))) < tol


# ---------------------------------------------------------------------------
# Invariances and properties.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e4])
def test_scale_invariance(mode, scale):
  """H_{sc}(sX) = s H_c(X)."""
  rng = np.random.default_rng(8)
  x = rng.standard_normal((7, 11))
  base = np.asarray(CLIPS[mode](jnp.asarray(x, jnp.float32), 1.3), np.float64)
  scaled = np.asarray(CLIPS[mode](jnp.asarray(scale * x, jnp.float32), 1.3 * scale), np.float64)
  assert rel_err(scaled, scale * base) < 1e-5


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_transpose_equivariance(mode):
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((2, 7, 11)), jnp.float32)
  a = CLIPS[mode](jnp.swapaxes(x, -1, -2), 0.8)
  b = jnp.swapaxes(CLIPS[mode](x, 0.8), -1, -2)
  assert rel_err(a, b) < 1e-6


def test_hard_clip_idempotent_and_soft_contracts():
  rng = np.random.default_rng(10)
  x = jnp.asarray(3 * rng.standard_normal((9, 13)), jnp.float32)
  once = HARD(x, 1.0)
  assert rel_err(HARD(once, 1.0), once) < 2e-5
  assert singular_values(once).max() <= 1.0 + 1e-5
  soft = singular_values(SOFT(x, 1.0))
  assert np.all(soft < singular_values(x)) and soft.max() < 1.0


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_tiny_and_huge_inputs_finite(mode):
  rng = np.random.default_rng(12)
  x = rng.standard_normal((6, 10))
  tiny = CLIPS[mode](jnp.asarray(1e-30 * x, jnp.float32), 1.0)
  assert bool(jnp.all(jnp.isfinite(tiny)))
  assert rel_err(tiny, 1e-30 * x) < 1e-5  # far below c: identity
  huge = CLIPS[mode](jnp.asarray(1e30 * x, jnp.float32), 1.0)
  assert bool(jnp.all(jnp.isfinite(huge)))
  assert singular_values(huge).max() <= 1.0 + 1e-4
  # Huge inputs with a proportionate threshold are exact (overflow-safe normalisation).
  exact = CLIPS[mode](jnp.asarray(1e30 * x, jnp.float32), 1e30)
  assert rel_err(exact, 1e30 * svd_map(x, lambda s: REFS[mode](s, 1.0))) < 2e-5


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_nan_propagates(mode):
  x = jnp.ones((4, 6)).at[1, 2].set(jnp.nan)
  assert bool(jnp.all(jnp.isnan(CLIPS[mode](x, 1.0))))


def test_traced_threshold_matches_python_float():
  rng = np.random.default_rng(13)
  x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
  for fn in (soft_spectral_clip, hard_spectral_clip):
    traced = jax.jit(lambda x, c, fn=fn: fn(x, c))(x, jnp.float32(0.7))
    np.testing.assert_allclose(traced, fn(x, 0.7), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("c", [0.0, -1.0, float("nan")])
def test_bad_threshold(c):
  for fn in (soft_spectral_clip, hard_spectral_clip):
    with pytest.raises(ValueError, match="max_singular_value"):
      fn(jnp.ones((2, 3)), c)


def test_bad_steps():
  with pytest.raises(ValueError, match="ns_steps"):
    soft_spectral_clip(jnp.ones((2, 3)), 1.0, ns_steps=0)


# ---------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------


def random_spd(rng, m, cond, batch=()):
  q, _ = np.linalg.qr(rng.standard_normal(batch + (m, m)))
  lam = np.geomspace(1.0 / cond, 1.0, m)
  return (q * lam) @ np.swapaxes(q, -1, -2), lam


def inv_sqrt_ref(b):
  w, v = np.linalg.eigh(b)
  return (v / np.sqrt(w)[..., None, :]) @ np.swapaxes(v, -1, -2)


@pytest.mark.parametrize("cond,steps", [(2.0, 4), (1e2, 6), (1e4, 9)])
def test_inverse_sqrt_apply(cond, steps):
  rng = np.random.default_rng(int(cond))
  b, lam = random_spd(rng, 12, cond, batch=(2,))
  x = rng.standard_normal((2, 12, 5))
  got = inverse_sqrt_apply(jnp.asarray(b, jnp.float32), jnp.asarray(x, jnp.float32),
                           lam[0], lam[-1], steps)
  assert rel_err(got, inv_sqrt_ref(b) @ x) < 2e-5 * max(1.0, cond / 1e2)


def test_inverse_sqrt_apply_loose_bounds_need_more_steps():
  rng = np.random.default_rng(14)
  b, lam = random_spd(rng, 10, 1e3)
  x = rng.standard_normal((10, 3))
  args = (jnp.asarray(b, jnp.float32), jnp.asarray(x, jnp.float32))
  loose = inverse_sqrt_apply(*args, lam[0] / 100, lam[-1] * 10, 7)
  assert rel_err(loose, inv_sqrt_ref(b) @ x) > 1e-3  # not converged with 7 steps
  converged = inverse_sqrt_apply(*args, lam[0] / 100, lam[-1] * 10, 11)
  assert rel_err(converged, inv_sqrt_ref(b) @ x) < 1e-4


def test_symmetric_sign():
  rng = np.random.default_rng(15)
  q, _ = np.linalg.qr(rng.standard_normal((14, 14)))
  lam = rng.choice([-1, 1], 14) * np.geomspace(1e-3, 2.0, 14)
  d = (q * lam) @ q.T
  got = symmetric_sign(jnp.asarray(d, jnp.float32), 2.0, fast_steps=8, polish_steps=4)
  np.testing.assert_allclose(got, (q * np.sign(lam)) @ q.T, atol=1e-5)


def test_psd_top_eigenvalue_bound():
  rng = np.random.default_rng(16)
  for cond in (1.0, 1e3):
    b, lam = random_spd(rng, 16, cond, batch=(3,))
    b = jnp.asarray(b, jnp.float32)
    plain = psd_top_eigenvalue_bound(b)
    tight = psd_top_eigenvalue_bound(b, b @ b)
    assert plain.shape == tight.shape == (3, 1, 1)
    assert bool(jnp.all(tight >= lam[-1] * (1 - 1e-6))) and bool(jnp.all(tight <= plain))
    assert bool(jnp.all(tight <= 16 ** 0.25 * lam[-1] * (1 + 1e-5)))


def test_frobenius_norm_is_overflow_safe():
  x = jnp.full((3, 4), 1e30, jnp.float32)
  np.testing.assert_allclose(linalg.frobenius_norm(x)[0, 0], 1e30 * math.sqrt(12), rtol=1e-6)
  y = jnp.full((3, 4), 1e-30, jnp.float32)
  np.testing.assert_allclose(linalg.frobenius_norm(y)[0, 0], 1e-30 * math.sqrt(12), rtol=1e-6)
  assert float(linalg.frobenius_norm(jnp.zeros((2, 2)))[0, 0]) == 0.0


def test_orthogonalize_band_and_convergence():
  rng = np.random.default_rng(17)
  x = rng.standard_normal((3, 24, 40))
  s = singular_values(orthogonalize(jnp.asarray(x, jnp.float32)))  # Muon coefficients
  assert s.min() > 0.6 and s.max() < 1.2
  assert s.max() - s.min() > 0.05  # only roughly orthogonal
  polar = orthogonalize(jnp.asarray(x, jnp.float32), ns_steps=14, coeffs="quintic")
  np.testing.assert_allclose(polar, svd_map(x, np.ones_like), atol=2e-4)
  tall = orthogonalize(jnp.asarray(np.swapaxes(x, -1, -2), jnp.float32), ns_steps=14,
                       coeffs="quintic")
  np.testing.assert_allclose(tall, np.swapaxes(svd_map(x, np.ones_like), -1, -2), atol=2e-4)
  assert bool(jnp.all(orthogonalize(jnp.zeros((4, 6))) == 0))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_flop_count_matches_program(mode):
  """``spectral_clip_matmuls`` counts exactly the dot products in the program."""
  m, n = 6, 10

  def dot_flops(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        total += 2 * math.prod(out) * math.prod(lhs[a] for a in lc)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += dot_flops(sub)
    return total

  fn = soft_spectral_clip if mode == "soft" else hard_spectral_clip
  for shape in [(m, n), (n, m)]:
    jaxpr = jax.make_jaxpr(lambda x, fn=fn: fn(x, 1.0))(jnp.ones(shape)).jaxpr
    assert dot_flops(jaxpr) == linalg.spectral_clip_matmuls(*shape, mode)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_sharded_inputs(axis_type):
  """Both orientations with sharded rows and columns: same values, input sharding kept."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
  rng = np.random.default_rng(18)
  x = jnp.asarray(rng.standard_normal((4, 8, 12)), jnp.float32)
  expected = {k: f(x, 1.0) for k, f in CLIPS.items()}
  expected["orth"] = orthogonalize(x)
  fns = dict(CLIPS, orth=jax.jit(orthogonalize))
  with jax.set_mesh(mesh):
    for spec in [P(None, "data", "model"), P("data", "model", None), P(None, None, "model")]:
      xs = jax.device_put(x, NamedSharding(mesh, spec))
      for k, f in fns.items():
        got = f(xs) if k == "orth" else f(xs, 1.0)
        if axis_type == AxisType.Explicit:
          assert jax.typeof(got).sharding.spec == spec
        np.testing.assert_allclose(got, expected[k], rtol=1e-5, atol=1e-6)
        got_t = f(jnp.swapaxes(xs, -1, -2)) if k == "orth" else f(jnp.swapaxes(xs, -1, -2), 1.0)
        np.testing.assert_allclose(got_t, jnp.swapaxes(expected[k], -1, -2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (3, 5, 8), (2, 8, 5)])
def test_top_right_singular_vectors_span_numpys(shape):
  """The top-r right singular vectors (r = 3) span NumPy's float64 ones (projectors
  V V^T equal; the vectors themselves are defined up to sign); zero matrices give
  finite orthonormal columns."""
  x = np.random.default_rng(sum(shape)).standard_normal(shape)
  v = np.asarray(top_right_singular_vectors(jnp.asarray(x, jnp.float32).reshape(-1, *shape[-2:]),
                                            3), np.float64)
  _, _, vh = np.linalg.svd(x.reshape(-1, *shape[-2:]), full_matrices=False)
  want = vh[:, :3, :].transpose(0, 2, 1)
  np.testing.assert_allclose(v @ v.transpose(0, 2, 1), want @ want.transpose(0, 2, 1), atol=1e-5)
  z = np.asarray(top_right_singular_vectors(jnp.zeros((2, *shape[-2:])), 3))
  assert np.isfinite(z).all()
  np.testing.assert_allclose(z.transpose(0, 2, 1) @ z, np.broadcast_to(np.eye(3), (2, 3, 3)),
                             atol=1e-6)
