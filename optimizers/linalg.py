r"""Shared matrix numerics: Newton–Schulz iterations and SVD-free spectral maps.

Every function here acts on arrays of shape ``(..., m, n)`` (leading axes are
a batch), computes in float32 (or wider, if the input is wider) and returns the
input's dtype. No SVD, eigh or QR is used: only matrix products, so everything
runs at matmul speed on accelerators and shards like a matmul.

The spectral maps act on the singular values of ``X = U diag(s) V^T`` and keep
the singular vectors:

* :func:`orthogonalize`: ``s -> ~1`` (Muon's quintic Newton–Schulz).
* :func:`soft_spectral_clip`: ``s -> s / sqrt(1 + s^2 / c^2)``.
* :func:`hard_spectral_clip`: ``s -> min(s, c)``.

Both clips work on the small Gram side (``X`` oriented wide, ``m <= n``,
``A = X X^T`` with eigenvalues ``s^2``) and apply an ``m x m`` matrix function
of ``A`` to ``X``:

* soft: ``K X`` with ``K = c (c^2 I + A)^{-1/2}``;
* hard: ``sqrt(2) K (I + |M|)^{-1/2} X`` with the Cayley-type matrix
  ``M = I - 2 c^2 (c^2 I + A)^{-1} = I - 2 K^2``, whose eigenvalues
  ``mu = (s^2 - c^2) / (s^2 + c^2)`` lie in ``[-1, 1)``. Per singular value
  this is ``sqrt(1 - mu) / sqrt(1 + |mu|)``, which is ``1`` for ``s <= c`` and
  ``c / s`` for ``s >= c``, i.e. ``s -> min(s, c)``. ``|M| = M sign(M)`` comes
  from a Newton–Schulz matrix sign (:func:`symmetric_sign`); since ``mu`` is
  the *relative* gap of ``s^2`` to ``c^2``, the sign resolves singular values
  near ``c`` equally well whatever the largest singular value is (a sign of
  ``A - c^2 I`` scaled by ``s_max^2`` would not), and an unresolved sign only
  costs ``|mu| (1 - |sign|) / 2`` relative error, i.e. nothing where
  ``s ~ c``. ``(I + |M|)^{-1/2}`` has its spectrum in ``[1, 2]`` (4 steps).

Inverse square roots come from a *scaled* coupled Newton–Schulz iteration
(:func:`inverse_sqrt_apply`). The unscaled iteration of the SPECTRA reference
multiplies a small eigenvalue by only 9/4 per step, so with one singular value
at ``100 c`` the bulk is still far from converged after 10 steps and comes out
over-shrunk (0.49c instead of 0.71c). Scaling each step by
``mu = 3 / (u + sqrt(u l) + l)``, the value that balances the iteration map
over the current eigenvalue interval ``[l, u]``, multiplies small eigenvalues
by up to ~6.75 per step: condition number ``1e4`` converges to float32
accuracy in 9 steps. The top-eigenvalue bound that starts the iteration is
``min(Gershgorin, (tr A^4)^{1/4})``, where ``A^2`` is needed by the first step
anyway (the first step with ``Z_0 = I`` costs no extra product).

Accuracy. The Gram matrix squares the condition number: in float32 the
singular values come out with a relative error of about
``1e-7 * (s_max / c)^2`` (the SVD's is ``1e-7 * s_max / s``), i.e. 1e-5 for a
spike at ``10 c``, 1e-3 at ``100 c`` in the worst direction. Inputs are
normalised by ``max(c, ||X||_F)`` (an overflow-safe Frobenius norm), so any
finite input gives a finite output, and zero gives zero.

Sharding. Under ``AxisType.Explicit`` mesh axes the ``m x m`` work runs with
the matrix axes unsharded (the Gram product all-reduces over a sharded ``n``),
``X`` keeps the sharding of its long side, and the result gets the input's
sharding back. With ``Auto`` axes XLA chooses.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optimizers._checks import check_int, check_positive
from optimizers._lapack import per_matrix
from optimizers._sharding import ambient_spec, restore_spec, rows_unsharded
from optimizers._trees import compute_dtype

__all__ = [
    "NS_COEFFS",
    "gram",
    "orient_wide",
    "psd_top_eigenvalue_bound",
    "inverse_sqrt_apply",
    "symmetric_sign",
    "orthogonalize",
    "soft_spectral_clip",
    "hard_spectral_clip",
    "frobenius_norm",
    "spectral_clip_matmuls",
]

# Quintic Newton–Schulz presets: p(x) = a x + b x^3 + c x^5 on singular values.
NS_COEFFS = {
    # Muon (Jordan et al. 2024): maximal slope at 0; singular values land in
    # ~[0.7, 1.1] rather than converging to 1.
    "muon": (3.4445, -4.7750, 2.0315),
    # Convergent quintic (second-order Newton–Schulz): p(1) = 1, p'(1) = p''(1) = 0.
    "quintic": (15 / 8, -10 / 8, 3 / 8),
}

# Defaults, chosen with the evidence in bench/bench_spectral.py and tests/test_linalg.py:
# 10 scaled steps converge for a condition number (t + top bound) / t up to ~1e5, beyond
# which the float32 Gram rounding (error ~1e-7 * (s_max / c)^2) dominates anyway.
SOFT_NS_STEPS = 10
# (fast, polish) steps of the sign of M: |mu| is resolved to ~3e-6 absolute.
SIGN_STEPS = (8, 4)
# (I + |M|)^{-1/2}: spectrum in [1, 2] (bounded by 2.5), converged in 4 steps.
_ABS_STEPS = 4
_ABS_UPPER = 2.5


def _eye_like(a: jax.Array) -> jax.Array:
  return jnp.eye(a.shape[-1], dtype=a.dtype)


def _sym(a: jax.Array) -> jax.Array:
  return 0.5 * (a + a.mT)


def orient_wide(x: jax.Array) -> tuple[jax.Array, bool]:
  """Returns ``(x or x^T, transposed)`` with rows <= cols (a static choice)."""
  if x.shape[-2] > x.shape[-1]:
    return x.mT, True
  return x, False


def gram(x: jax.Array) -> jax.Array:
  """``x @ x^T`` over the last two axes.

  Under an Explicit mesh with the contracted (column) axis sharded, the product
  is all-reduced into ``x``'s batch and row sharding.
  """
  spec = ambient_spec(x)
  if spec is None or spec[-1] is None:
    return x @ x.mT
  return jnp.matmul(x, x.mT, out_sharding=P(*spec[:-2], spec[-2], None))


def frobenius_norm(x: jax.Array, *, axis_name: Any = None) -> jax.Array:
  """Overflow- and underflow-safe ``||x||_F`` over the last two axes, shape ``(..., 1, 1)``.

  Computed as ``max|x| * ||x / max|x|||_F``; NaN/Inf inputs give NaN/Inf.
  ``axis_name``: inside :func:`optimizers.distributed.map_rows`, ``x`` holds a slice of
  the rows and the maximum and the sum of squares are reduced over these devices.
  """
  from optimizers._owner_maps import row_pmax, row_psum

  amax = row_pmax(jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True), axis_name)
  safe = jnp.where(amax > 0, amax, jnp.ones_like(amax))
  y = x / safe
  return amax * jnp.sqrt(row_psum(jnp.sum(y * y, axis=(-2, -1), keepdims=True), axis_name))


def _gershgorin(a: jax.Array) -> jax.Array:
  return jnp.max(jnp.sum(jnp.abs(a), axis=-1, keepdims=True), axis=-2, keepdims=True)


def _fro(a: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(a * a, axis=(-2, -1), keepdims=True))


def psd_top_eigenvalue_bound(a: jax.Array, a_squared: jax.Array | None = None) -> jax.Array:
  """Guaranteed upper bound of the top eigenvalue of symmetric PSD ``a``.

  ``min(||a||_F, max_i sum_j |a_ij|)`` (Frobenius and Gershgorin bounds); with
  ``a_squared = a @ a`` also ``(tr a^4)^{1/4} = ||a^2||_F^{1/2}``, which
  over-estimates by at most ``m^{1/4}`` (the Frobenius bound by ``m^{1/2}``).
  Shape ``a.shape[:-2] + (1, 1)``.
  """
  bound = jnp.minimum(_fro(a), _gershgorin(a))
  if a_squared is not None:
    bound = jnp.minimum(bound, jnp.sqrt(_fro(a_squared)))
  return bound


def _next_lower(mlo: jax.Array) -> jax.Array:
  return jnp.minimum(mlo * (3.0 - mlo) ** 2 / 4.0, 1.0)


def _inverse_sqrt(
    b: jax.Array, lower: jax.Array, upper: jax.Array, steps: int,
    b_squared: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``(z, scale)`` with ``b^{-1/2} ~= scale * z`` (see :func:`inverse_sqrt_apply`).

  Step 1 (``Z_0 = I``) needs only ``b^2`` (given, or one product) and the last
  step skips the update of ``Y``: ``3 steps - 3`` products in all with
  ``b_squared``, ``3 steps - 2`` without.
  """
  check_int("ns_steps", steps)
  upper = jnp.maximum(upper, jnp.finfo(b.dtype).tiny)
  eye = _eye_like(b)
  lo = jnp.clip(lower / upper, 0.0, 1.0)
  mu = 3.0 / (1.0 + jnp.sqrt(lo) + lo)
  y = (mu / upper) * b
  y2 = (mu / upper) ** 2 * b_squared if b_squared is not None else y @ y
  z = 1.5 * eye - 0.5 * y
  y = 1.5 * y - 0.5 * y2
  log_beta = jnp.log(mu) - jnp.log(upper)
  lo = _next_lower(mu * lo)
  for k in range(1, steps):
    mu = 3.0 / (1.0 + jnp.sqrt(lo) + lo)
    y = mu * y
    t = 0.5 * (3.0 * eye - z @ y)
    if k < steps - 1:
      y = y @ t
    z = t @ z
    log_beta = log_beta + jnp.log(mu)
    lo = _next_lower(mu * lo)
  return z, jnp.exp(0.5 * log_beta)


def inverse_sqrt_apply(
    b: jax.Array, x: jax.Array, lower: jax.Array, upper: jax.Array, steps: int
) -> jax.Array:
  r"""Computes ``b^{-1/2} @ x`` by scaled coupled Newton–Schulz.

  Coupled iteration (Higham 2008, eq. 6.35) on ``Y_0 = b / upper, Z_0 = I``:
  ``Y <- mu_k Y; T = (3 I - Z Y) / 2; Y <- Y T; Z <- T Z``. With
  ``beta = prod(mu_k) / upper`` the invariant ``Y = beta b Z`` holds, ``Z Y`` is
  driven to ``I``, so ``Z -> (beta b)^{-1/2}`` and ``b^{-1/2} = sqrt(beta) Z``.
  The eigenvalues ``y`` of ``Z Y`` follow ``y <- f(mu y)``,
  ``f(y) = y (3 - y)^2 / 4``; with ``y`` in ``[l, u]`` the step size
  ``mu = 3 / (u + sqrt(u l) + l)`` makes ``f(mu l) = f(mu u)``, the largest
  guaranteed progress for the smallest eigenvalue, and keeps ``mu u < 3``.
  Steps needed for float32 accuracy: 4 for ``upper / lower = 2``, 6 for
  ``1e2``, 9 for ``1e4``, 11 for ``1e6``.

  Args:
    b: symmetric positive definite, shape ``(..., m, m)``.
    x: shape ``(..., m, n)``.
    lower: lower bound of ``b``'s smallest eigenvalue, broadcastable to
      ``(..., 1, 1)``. An over-estimate only slows convergence.
    upper: GUARANTEED upper bound of ``b``'s top eigenvalue (an under-estimate
      can diverge), broadcastable to ``(..., 1, 1)``.
    steps: number of iterations (static, >= 1).

  Returns:
    ``b^{-1/2} x``, shape of ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers.linalg import inverse_sqrt_apply
    >>> b = jnp.diag(jnp.array([1.0, 4.0]))
    >>> inverse_sqrt_apply(b, jnp.eye(2), 1.0, 4.0, steps=6).round(4).tolist()
    [[1.0, 0.0], [0.0, 0.5]]
  """
  z, scale = _inverse_sqrt(b, lower, upper, steps)
  return scale * (z @ x)


def symmetric_sign(
    d: jax.Array, scale: jax.Array | float, *, fast_steps: int, polish_steps: int
) -> jax.Array:
  """Matrix sign of symmetric ``d`` (eigenvalues mapped to their sign).

  ``d / scale`` (``scale`` >= spectral norm of ``d``) goes through
  ``fast_steps`` of Muon's quintic (slope 3.44 at 0, pulls small eigenvalues
  up fast) and ``polish_steps`` of the cubic ``x (3 - x^2) / 2``, which
  converges quadratically to 1 and never leaves ``[-1, 1]``. Eigenvalues with
  ``|d| / scale`` below ~``3.44^-fast_steps`` stay unresolved (near 0).
  Costs ``3 fast_steps + 2 polish_steps`` matrix products.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers.linalg import symmetric_sign
    >>> d = jnp.diag(jnp.array([0.5, -0.01]))
    >>> symmetric_sign(d, 1.0, fast_steps=6, polish_steps=4).round(4).tolist()
    [[1.0, 0.0], [0.0, -1.0]]
  """
  s = d / jnp.maximum(scale, jnp.finfo(d.dtype).tiny)
  a, b, c = NS_COEFFS["muon"]
  for _ in range(fast_steps):
    s2 = s @ s
    s = s @ (a * _eye_like(s) + b * s2 + c * (s2 @ s2))
  for _ in range(polish_steps):
    s = s @ (1.5 * _eye_like(s) - 0.5 * (s @ s))
  return s


def orthogonalize(
    x: jax.Array, *, ns_steps: int = 5, coeffs: str | tuple[float, float, float] = "muon",
    eps: float = 1e-7,
) -> jax.Array:
  r"""Newton–Schulz polar factor ``U V^T`` of ``X = U S V^T`` (Muon-style).

  ``X / (||X||_F + eps)`` goes through ``ns_steps`` of the quintic
  ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` on the wide orientation. With the
  default Muon coefficients the singular values land in roughly ``[0.7, 1.1]``
  (a fast approximate orthogonalisation, not a converged one); use
  ``coeffs="quintic"`` and more steps for a converged polar factor. This is
  the ``c -> 0`` limit direction of the spectral clips (up to the scale ``c``).

  Args:
    x: array of shape ``(..., m, n)``.
    ns_steps: number of iterations.
    coeffs: a preset name from :data:`NS_COEFFS` or ``(a, b, c)``.
    eps: added to the Frobenius norm (zero input gives zero output).

  Returns:
    Array of the shape and dtype of ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from optimizers import orthogonalize
    >>> x = jax.random.normal(jax.random.key(0), (4, 8))
    >>> s = jnp.linalg.svd(orthogonalize(x, ns_steps=12, coeffs="quintic"), compute_uv=False)
    >>> bool(jnp.allclose(s, 1.0, atol=1e-3))
    True

  References:
    Jordan et al., Muon (2024), https://kellerjordan.github.io/posts/muon/
  """
  a, b, c = NS_COEFFS[coeffs] if isinstance(coeffs, str) else coeffs
  if x.size == 0:  # nothing to orthogonalise (a zero-size axis)
    return x
  spec = ambient_spec(x)
  w, transposed = orient_wide(x.astype(compute_dtype(x)))
  w = rows_unsharded(w)
  w = w / (frobenius_norm(w) + eps)
  for _ in range(ns_steps):
    g = gram(w)
    w = a * w + (b * g + c * (g @ g)) @ w
  out = w.mT if transposed else w
  return restore_spec(out.astype(x.dtype), spec)


def _clip_setup(x: jax.Array, c: Any):
  """Common set-up of both clips on the wide, float32 (or wider) view of ``x``.

  With ``gamma = max(c, ||x||_F)``, ``g = (x / gamma)(x / gamma)^T`` has its
  top eigenvalue <= 1, ``t = (c / gamma)^2`` and ``B = g + t I =
  (c^2 I + x x^T) / gamma^2``, so ``K = c (c^2 I + x x^T)^{-1/2} =
  (c / gamma) B^{-1/2}``. Normalising by ``gamma`` keeps ``c^2`` and ``s^2``
  from overflowing for any finite input. Returns ``(w, spec, transposed,
  ratio, t, gamma)`` with ``ratio = c / gamma``.
  """
  check_positive("max_singular_value", c)
  spec = ambient_spec(x)
  w, transposed = orient_wide(x.astype(compute_dtype(x)))
  w = rows_unsharded(w)
  c = jnp.asarray(c, w.dtype)
  gamma = jnp.maximum(c, frobenius_norm(w))
  ratio = c / gamma
  t = jnp.maximum(ratio * ratio, jnp.finfo(w.dtype).tiny)
  return w, spec, transposed, ratio, t, gamma


def _soft_factor(
    w: jax.Array, gamma: jax.Array, ratio: jax.Array, t: jax.Array, steps: int
) -> tuple[jax.Array, jax.Array]:
  """``(z, scale)`` with ``K = c (c^2 I + w w^T)^{-1/2} = scale * z``."""
  # Divide by gamma itself: XLA rewrites w * ((c / gamma) / c) as w * (c / (gamma * c)),
  # and gamma * c overflows for c, ||w|| ~ 1e19 (the clip then silently did nothing).
  xs = w / gamma
  g = gram(xs)
  g2 = g @ g
  eye = _eye_like(g)
  b = g + t * eye
  b2 = g2 + (2.0 * t) * g + (t * t) * eye
  upper = t + psd_top_eigenvalue_bound(g, g2)
  z, scale = _inverse_sqrt(b, t, upper, steps, b2)
  return z, ratio * scale


def _finish(out: jax.Array, transposed: bool, spec: tuple | None, dtype) -> jax.Array:
  out = out.mT if transposed else out
  return restore_spec(out.astype(dtype), spec)


def soft_spectral_clip(
    x: jax.Array, c: float | jax.Array, *, ns_steps: int = SOFT_NS_STEPS
) -> jax.Array:
  r"""Soft spectral clip ``(I + X X^T / c^2)^{-1/2} X``, without an SVD.

  Each singular value ``s`` maps to ``s / sqrt(1 + s^2 / c^2)`` (``~s`` for
  ``s << c``, ``-> c`` for ``s >> c``); singular vectors are kept. Computed as
  ``c (c^2 I + X X^T)^{-1/2} X`` on the smaller side by the scaled
  Newton–Schulz iteration of :func:`inverse_sqrt_apply`, started from the
  bound ``c^2 + min(Gershgorin, (tr (XX^T)^4)^{1/4})``. The default 10 steps
  converge for ``s_max / c`` up to ~300 (a single spike at ``100 c`` leaves
  the bulk at ``c`` exactly at ``0.7071 c``); beyond, the float32 Gram
  rounding (see the module docstring) dominates. Cost: ``3 ns_steps - 3``
  products of ``m x m`` matrices plus two of ``m x m`` by ``m x n``.

  Args:
    x: array of shape ``(..., m, n)``.
    c: threshold, finite and ``> 0`` (scalar, may be traced).
    ns_steps: Newton–Schulz iterations (static).

  Returns:
    Array of the shape and dtype of ``x``; zero input gives zero output; a
    zero-size ``x`` is returned as is.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import soft_spectral_clip
    >>> x = jnp.diag(jnp.array([3.0, 0.5]))
    >>> soft_spectral_clip(x, 1.0).round(4).tolist()  # 3/sqrt(10), 0.5/sqrt(1.25)
    [[0.9487, 0.0], [0.0, 0.4472]]

  References:
    Jiang, Semenov, Stich, "SPECTRA: spectral clipping", arXiv 2603.14315,
    https://arxiv.org/abs/2603.14315
  """
  if x.size == 0:  # a zero-size axis: nothing to clip
    check_positive("max_singular_value", c)
    return x
  w, spec, transposed, ratio, t, gamma = _clip_setup(x, c)
  z, scale = _soft_factor(w, gamma, ratio, t, ns_steps)
  return _finish(scale * (z @ w), transposed, spec, x.dtype)


def hard_spectral_clip(
    x: jax.Array, c: float | jax.Array, *, ns_steps: int = SOFT_NS_STEPS,
    sign_steps: tuple[int, int] = SIGN_STEPS,
) -> jax.Array:
  r"""Hard spectral clip ``s -> min(s, c)``, without an SVD.

  With ``K = c (c^2 I + X X^T)^{-1/2}`` (as in :func:`soft_spectral_clip`) and
  ``M = I - 2 K^2`` (eigenvalues ``mu = (s^2 - c^2) / (s^2 + c^2)``), the
  result is ``sqrt(2) K (I + |M|)^{-1/2} X``: per singular value
  ``s sqrt(1 - mu) / sqrt(1 + |mu|) = min(s, c)``. ``|M| = M sign(M)`` comes
  from :func:`symmetric_sign` on ``M`` (spectrum in ``[-1, 1)``, no bound
  needed); a sign left unresolved for ``|mu| < ~3.44^-sign_steps[0]`` costs at
  most ``|mu| / 2`` relative error, independent of ``s_max / c``. Cost: that of
  the soft clip plus ``3 fast + 2 polish + 12`` products of ``m x m``
  matrices (45 with the defaults).

  Args:
    x: array of shape ``(..., m, n)``.
    c: threshold, finite and ``> 0`` (scalar, may be traced).
    ns_steps: iterations of the inverse square root of ``c^2 I + X X^T``.
    sign_steps: ``(fast, polish)`` iterations of the matrix sign of ``M``.

  Returns:
    Array of the shape and dtype of ``x``; zero input gives zero output; a
    zero-size ``x`` is returned as is.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import hard_spectral_clip
    >>> x = jnp.diag(jnp.array([3.0, 0.5]))
    >>> hard_spectral_clip(x, 1.0).round(4).tolist()
    [[1.0, 0.0], [0.0, 0.5]]

  References:
    Jiang, Semenov, Stich, "SPECTRA: spectral clipping", arXiv 2603.14315,
    https://arxiv.org/abs/2603.14315
  """
  fast, polish = sign_steps
  if x.size == 0:  # a zero-size axis: nothing to clip
    check_positive("max_singular_value", c)
    return x
  w, spec, transposed, ratio, t, gamma = _clip_setup(x, c)
  z, scale = _soft_factor(w, gamma, ratio, t, ns_steps)
  eye = _eye_like(z)
  m = eye - (2.0 * scale * scale) * _sym(z @ z)
  abs_m = _sym(m @ symmetric_sign(m, 1.0, fast_steps=fast, polish_steps=polish))
  zc, scale_c = _inverse_sqrt(eye + abs_m, 1.0, _ABS_UPPER, _ABS_STEPS)
  out = (math.sqrt(2.0) * scale * scale_c) * ((z @ zc) @ w)
  return _finish(out, transposed, spec, x.dtype)


def spectral_clip_matmuls(
    m: int, n: int, mode: str = "soft", *, ns_steps: int = SOFT_NS_STEPS,
    sign_steps: tuple[int, int] = SIGN_STEPS,
) -> int:
  """Matrix-product FLOPs (``2 m k n`` each) of one clip of an ``m x n`` matrix.

  Counts what :func:`soft_spectral_clip` / :func:`hard_spectral_clip` execute
  (Gram, ``A^2``, the Newton–Schulz products and the final application on the
  wide orientation); elementwise work is ignored.
  """
  m, n = min(m, n), max(m, n)
  square = 2 * m**3
  soft = 2 * (2 * m * m * n) + (3 * ns_steps - 3) * square
  if mode == "soft":
    return soft
  fast, polish = sign_steps
  extra = 1 + (3 * fast + 2 * polish) + (3 * _ABS_STEPS - 2) + 1
  return soft + extra * square


def top_right_singular_vectors(x: jax.Array, r: int) -> jax.Array:
  """The top-``r`` right singular vectors of whole matrices ``(q, k, d)``, ``(q, d, r)``
  (one matrix per LAPACK call on CPU, see :func:`optimizers._lapack.per_matrix`)."""
  _, _, vh = per_matrix(lambda a: jnp.linalg.svd(a, full_matrices=False), x)
  return vh[..., :r, :].mT
