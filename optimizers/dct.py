r"""The orthonormal DCT-II, SVD-free: explicit rows, the transform, and top-``r`` selection.

``C[f, j] = s_f cos(pi (2 j + 1) f / (2 d))`` with ``s_0 = sqrt(1/d)``,
``s_f = sqrt(2/d)``: rows are frequencies and ``C C^T = I``. The DCT projector
(:func:`optimizers.dct_projector`) keeps the ``r`` frequencies whose columns of
``G C^T`` score highest (:func:`top_columns`) and never stores the basis: it
rebuilds the ``r`` rows it needs from their indices (:func:`dct_rows`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from optimizers._checks import check_choice
from optimizers._trees import upcast

__all__ = ["DCT_METHODS", "dct_matrix", "dct_rows", "dct_transform", "top_columns"]

DCT_METHODS = ("auto", "matmul", "fft")
# Below this size of the projected dimension the explicit basis matmul beats
# jax.scipy.fft.dct (measured on CPU by bench/bench_subspace.py, see its JSON).
_DCT_FFT_MIN_SIZE = 512


def dct_rows(freqs: jax.Array, d: int) -> jax.Array:
  """Rows ``C[freqs, :]`` of the orthonormal DCT-II matrix of size ``d``.

  ``C[f, j] = s_f cos(pi (2 j + 1) f / (2 d))`` with ``s_0 = sqrt(1/d)`` and
  ``s_f = sqrt(2/d)``. The angle's integer part ``(2j+1) f mod 4d`` is reduced
  exactly in uint32 before the float conversion, so the entries are accurate to
  float32 rounding for every ``d`` (a plain float32 angle loses ~``d * 1e-7``).

  Args:
    freqs: integer array ``(..., r)`` of frequencies in ``[0, d)``.
    d: the transform size (static).

  Returns:
    float32 array ``(..., r, d)``.
  """
  if 2 * d * d >= 2**32:
    raise ValueError(f"DCT size d={d} too large (the exact angle reduction needs 2 d^2 < 2^32)")
  j = jnp.arange(d, dtype=jnp.uint32)
  f = freqs.astype(jnp.uint32)[..., None]
  phase = ((2 * j + 1) * f) % (4 * d)
  angle = (math.pi / (2 * d)) * phase.astype(jnp.float32)
  norm = jnp.where(f == 0, math.sqrt(1.0 / d), math.sqrt(2.0 / d)).astype(jnp.float32)
  return norm * jnp.cos(angle)


def dct_matrix(d: int) -> jax.Array:
  r"""The orthonormal DCT-II matrix ``C`` of size ``d`` (float32, rows = frequencies).

  ``C[f, j] = s_f cos(pi (2j + 1) f / (2d))``, ``s_0 = sqrt(1/d)``,
  ``s_f = sqrt(2/d)``; ``C C^T = I``. The DCT of the rows of ``X`` is
  ``X C^T``; the basis vector of frequency ``f`` is the row ``C[f]``.

  Args:
    d: size (a Python int).

  Returns:
    float32 array of shape ``(d, d)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import dct_matrix
    >>> c = dct_matrix(8)
    >>> bool(jnp.allclose(c @ c.T, jnp.eye(8), atol=1e-6))
    True

  References:
    Ahmed, Natarajan, Rao, "Discrete Cosine Transform", IEEE Trans. Computers 1974.
  """
  return dct_rows(jnp.arange(d), d)


def _resolve_dct_method(method: str, d: int) -> str:
  if method == "auto":
    return "matmul" if d < _DCT_FFT_MIN_SIZE else "fft"
  return method


def dct_transform(x: jax.Array, *, method: str = "auto") -> jax.Array:
  r"""Orthonormal DCT-II of ``x`` along its last axis, ``x C^T`` (float32).

  Two equal computations: ``method="matmul"`` multiplies by the explicit basis
  :func:`dct_matrix` (``O(k d^2)``, matmul speed), ``method="fft"`` uses
  ``jax.scipy.fft.dct(norm="ortho")`` (``O(k d log d)``). ``"auto"`` picks the
  matmul below ``d = 512`` and the FFT from there on: the crossover measured on
  CPU by ``bench/bench_subspace.py`` (the matmul wins at ``d <= 256``, both tie
  near 512, the FFT is 2-6x faster at ``d >= 1024``).

  Args:
    x: array ``(..., k, d)``.
    method: ``"auto"``, ``"matmul"`` or ``"fft"``.

  Returns:
    float32 array of the shape of ``x``.
  """
  check_choice("method", method, DCT_METHODS)
  x = upcast(x)
  d = x.shape[-1]
  if _resolve_dct_method(method, d) == "fft":
    return jax.scipy.fft.dct(x, type=2, axis=-1, norm="ortho")
  return x @ dct_matrix(d).T


def top_columns(t: jax.Array, r: int, score: str, *, axis_name: Any = None) -> jax.Array:
  """Sorted int32 indices of the ``r`` columns of ``t`` with the largest ``score``
  (``"l2"``: sum of squares, ``"l1"``: sum of magnitudes) along the second-last axis.

  ``t`` is divided by its largest magnitude per matrix first: the ranking is the
  same, and ``t * t`` neither underflows to 0 (``|t| ~ 1e-20``, which left every
  score 0 and the choice arbitrary) nor overflows (``|t| ~ 1e20``) in float32.
  ``axis_name``: inside :func:`optimizers.distributed.map_rows`, ``t`` holds a slice
  of the rows and the maximum and the scores are reduced over these devices.
  """
  from optimizers.distributed import row_pmax, row_psum

  amax = row_pmax(jnp.max(jnp.abs(t), axis=(-2, -1), keepdims=True), axis_name)
  t = t / jnp.where(amax > 0, amax, jnp.ones_like(amax))
  scores = row_psum(jnp.sum(t * t if score == "l2" else jnp.abs(t), axis=-2), axis_name)
  _, idx = jax.lax.top_k(scores, r)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)
