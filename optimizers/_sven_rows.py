"""Sven's linear algebra: Jacobian rows and blocks, the Gram matrix and its spectrum.

Private to :mod:`optimizers.sven`. ``M`` is the (row-reduced, column-scaled)
residual Jacobian, held as per-leaf blocks ``(B, *leaf_shape)``; ``G = M M^T``.
The truncated pseudoinverse is applied as ``M^T w`` with
``w = U_k S_k^{-2} U_k^T R``; the row and parameter reductions, the RMSProp
pre-scaling and the Polyak step live here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Singular values at or below this are always dropped (the reference's pinv default).
_ABS_TOL = 1e-10
# A second Gram pass runs when eps * lambda_0 > _GRAM_TOL * (smallest kept eigenvalue).
_GRAM_TOL = 1e-5
_HIGHEST = jax.lax.Precision.HIGHEST
# Extra test vectors of the randomized subspace iteration when oversampling=None.
_OVERSAMPLING = 4
# Added to the denominator of the Polyak step (as the reference's Polyak rule).
_POLYAK_EPS = 1e-8


def _replicated() -> jax.sharding.PartitionSpec | None:
  """Out-sharding for contractions over (possibly sharded) parameter axes."""
  return None if jax.sharding.get_abstract_mesh().empty else jax.sharding.PartitionSpec()


def _gram_of_blocks(blocks: Any) -> jax.Array:
  """``M M^T = sum_l M_l M_l^T`` from per-leaf Jacobian blocks ``(B, *leaf_shape)``.

  Without a mesh a block of ~1 MiB at a time (:func:`_chunked_gram`); on an explicit
  mesh the contraction keeps the leaf's own axes (and shardings).
  """
  rep = _replicated()
  if rep is None:
    return _chunked_gram(jax.tree.leaves(blocks))
  terms = [jnp.einsum("b...,c...->bc", j, j, precision=_HIGHEST, out_sharding=rep)
           for j in jax.tree.leaves(blocks)]
  return sum(terms[1:], terms[0])


# Floats per block of rows that the chunked products below read at a time (1 MiB).
_CHUNK = 1 << 18


def _chunking(j: jax.Array, rows: int) -> tuple[jax.Array, int, int]:
  """``(j, kc, full)``: a block ``(B, *leaf)`` (scalar leaves as ``(B, 1)``), the slice
  length ``kc`` along its axis 1 for ~1 MiB pieces of ``rows`` rows, and the number of
  whole pieces."""
  if j.ndim == 1:
    j = j[:, None]
  kc = max(1, min(j.shape[1], _CHUNK // max(1, rows * math.prod(j.shape[2:]))))
  return j, kc, j.shape[1] // kc


def _chunked_gram(blocks: list[jax.Array], t: jax.Array | None = None) -> jax.Array:
  """``sum_l X_l X_l^T`` for ``X_l = M_l`` (or ``T^T M_l``), ``M_l`` the block
  ``(B, *leaf)`` viewed as ``(B, P_l)``, ~1 MiB of it at a time: a ``fori_loop`` over
  slices along the leaf's first axis, each flattened to ``(B, .)``.

  The blocks are read in their own shape, never flattened whole: every use (this Gram,
  the refinement's, ``M^T w``) slices the same buffer, so XLA forms the rows once (with
  a flattened view per use it picked a layout per use and formed them two or three
  times, and writing the rows straight into a flattened ``(B, P_l)`` buffer cost ~2.5x
  the time of writing them in the leaf's shape, the per-example outer products indexed
  through a division per entry). The rotated rows ``T^T M`` never exist whole; and XLA's
  CPU dot ran the blocked Gram ~2.5x faster than one ``(B, P) x (P, B)`` product
  (``B = 32``, ``P = 786432``: 36 ms against 96 ms).
  """
  num = blocks[0].shape[0]
  c = num if t is None else t.shape[1]
  total = jnp.zeros((c, c), blocks[0].dtype if t is None else t.dtype)

  def gram(x):
    x = jnp.reshape(x, (num, -1))
    y = x if t is None else jnp.matmul(t.T, x, precision=_HIGHEST)
    return jnp.matmul(y, y.T, precision=_HIGHEST)

  for j in blocks:
    j, kc, full = _chunking(j, max(num, c))
    if full > 1:
      total = jax.lax.fori_loop(
          0, full, lambda i, acc, j=j, kc=kc: acc + gram(
              jax.lax.dynamic_slice_in_dim(j, i * kc, kc, axis=1)), total)
      if j.shape[1] % kc:
        total = total + gram(j[:, full * kc:])
    else:
      total = total + gram(j)
  return total


def _chunked_transpose_times(j: jax.Array, w: jax.Array) -> jax.Array:
  """``M_l^T w`` for one block ``(B, *leaf)``, ~1 MiB of it at a time (as
  :func:`_chunked_gram`, so that the block is read in its own shape)."""
  shape = j.shape[1:]
  j, kc, full = _chunking(j, j.shape[0])
  dot = lambda x: jnp.tensordot(w, x, axes=1, precision=_HIGHEST)
  if full <= 1:
    return dot(j).reshape(shape)
  out = jax.lax.fori_loop(
      0, full, lambda i, o: jax.lax.dynamic_update_slice_in_dim(
          o, dot(jax.lax.dynamic_slice_in_dim(j, i * kc, kc, axis=1)), i * kc, axis=0),
      jnp.zeros(j.shape[1:], jnp.result_type(w, j)))
  if j.shape[1] % kc:
    out = out.at[full * kc:].set(dot(j[:, full * kc:]))
  return out.reshape(shape)


def _rotated_gram_of_blocks(t: jax.Array, blocks: Any) -> jax.Array:
  """``(T^T M)(T^T M)^T`` from the per-leaf blocks, without an explicit mesh a block of
  ~1 MiB at a time (the rotated rows never exist whole)."""
  if _replicated() is not None:
    return _gram_of_blocks(_rotate_blocks(t, blocks))
  return _chunked_gram(jax.tree.leaves(blocks), t)


def _rotate_blocks(t: jax.Array, blocks: Any) -> Any:
  """Per-leaf rows of ``T^T M``."""
  return jax.tree.map(lambda j: jnp.einsum("bc,b...->c...", t, j, precision=_HIGHEST), blocks)


def _blocks_transpose_times(blocks: Any, w: jax.Array) -> Any:
  """``M^T w`` per leaf."""
  if _replicated() is None:
    return jax.tree.map(lambda j: _chunked_transpose_times(j, w), blocks)
  return jax.tree.map(lambda j: jnp.einsum("b,b...->...", w, j, precision=_HIGHEST,
                                           out_sharding=_trailing_spec(j)), blocks)


def _trailing_spec(j: jax.Array) -> jax.sharding.PartitionSpec:
  """The sharding of ``j`` without its leading (row) axis, on an explicit mesh."""
  return jax.sharding.PartitionSpec(*tuple(jax.typeof(j).sharding.spec)[1:])


def _sorted_eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenpairs of the symmetric part of ``a``, eigenvalues descending."""
  lam, u = jnp.linalg.eigh(0.5 * (a + a.T))
  return lam[::-1], u[:, ::-1]


def _keep_mask(s: jax.Array, rank: int, rtol: jax.Array) -> jax.Array:
  """Top ``rank`` of descending ``s`` with ``s > rtol * s_0`` and ``s > 1e-10``."""
  idx = jnp.arange(s.shape[0])
  return (idx < rank) & (s > rtol * s[0]) & (s > _ABS_TOL)


def _pinv_weights(u: jax.Array, s: jax.Array, keep: jax.Array, r: jax.Array) -> jax.Array:
  """``w = U_k S_k^{-2} U_k^T r``, so that ``M^T w = V_k S_k^{-1} U_k^T r``."""
  inv2 = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0) ** 2, 0.0)
  return jnp.matmul(u, inv2 * jnp.matmul(r, u, precision=_HIGHEST), precision=_HIGHEST)


def _refine(lam, u, rotated_gram: Callable[[jax.Array], jax.Array]):
  """Second Gram pass in the whitened eigenbasis of the first; returns ``(U_M, S_M)``.

  ``u`` (``B x n``, orthonormal columns, ``n <= B``) and ``lam`` are eigenpairs
  of ``G = M M^T`` (or of its restriction to ``span(u)``). With
  ``T = u diag(max(lam, eps lam_0))^{-1/2}``, ``rotated_gram(T)`` must return
  ``(T^T M)(T^T M)^T`` computed from the rotated rows (so its rounding is
  relative to the whitened scale) or as ``T^T (G T)`` from operator products.
  ``u u^T M = u diag(1/d) W Mu^{1/2} Q^T`` with orthonormal ``Q``, so the SVD of
  the ``B x n`` factor gives the singular pairs of ``u u^T M``.
  """
  eps = jnp.finfo(lam.dtype).eps
  floor = jnp.maximum(eps * lam[0], jnp.finfo(lam.dtype).tiny)
  scale = jnp.sqrt(jnp.maximum(lam, floor))  # 1 / d
  mu, w = _sorted_eigh(rotated_gram(u / scale))
  factor = jnp.matmul(u * scale, w * jnp.sqrt(jnp.maximum(mu, 0.0)), precision=_HIGHEST)
  u_m, s_m, _ = jnp.linalg.svd(factor, full_matrices=False)
  return u_m, s_m


def _spectrum(lam, u, rank, rtol, rotated_gram):
  """Singular pairs ``(U, S)`` of ``M`` from eigenpairs ``(lam desc, u)`` of ``G = M M^T``.

  Refines with :func:`_refine` (under ``lax.cond``) when the kept spectrum is
  wider than the working precision resolves through ``G``.
  """
  s = jnp.sqrt(jnp.maximum(lam, 0.0))
  keep = _keep_mask(s, rank, rtol)
  lam_min_kept = jnp.min(jnp.where(keep, lam, jnp.inf))
  eps = jnp.finfo(lam.dtype).eps
  refine = jnp.any(keep) & (eps * lam[0] > _GRAM_TOL * lam_min_kept)
  return jax.lax.cond(refine, lambda: _refine(lam, u, rotated_gram), lambda: (u, s))


def _gram_times(jvp_fn, mt_fn, c: jax.Array, chunk: int) -> jax.Array:
  """``G C = M (D^2 M^T C)`` for ``C`` of shape ``(B, m)``, ``chunk`` columns at a time.

  The columns are zero-padded to a multiple of ``chunk`` so that a single loop body
  (one vmapped VJP + JVP) is compiled.
  """
  num, m = c.shape
  steps = -(-m // chunk)
  cols = jnp.pad(c.T, ((0, steps * chunk - m), (0, 0))).reshape(steps, chunk, num)
  out = jax.lax.map(jax.vmap(lambda v: jvp_fn(mt_fn(v))), cols)
  return out.reshape(steps * chunk, num)[:m].T


def _diagnostics(s: jax.Array, keep: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  kept = jnp.where(keep, s, 0.0).astype(jnp.float32)
  n = kept.shape[0]
  kept = kept[:rank] if n >= rank else jnp.concatenate([kept, jnp.zeros(rank - n, jnp.float32)])
  return kept, jnp.sum(keep).astype(jnp.int32)



class _Rows(NamedTuple):
  """The row reduction ``R' = A R`` (random row mask or group means) and its transpose."""

  apply: Callable[[jax.Array], jax.Array]  # (n, ...) -> (m, ...)
  transpose: Callable[[jax.Array], jax.Array]  # (m,) -> (n,)
  count: int | jax.Array  # rows that take part (for means)


def _row_reduction(num: int, row_fraction, row_group_size, key) -> _Rows | None:
  if row_group_size is not None:
    if num % row_group_size:
      raise ValueError(f"row_group_size={row_group_size} must divide the number of residual "
                       f"rows ({num})")
    g = row_group_size
    m = num // g
    apply = lambda x: jnp.mean(x.reshape((m, g) + x.shape[1:]), axis=1)
    transpose = lambda w: jnp.repeat(w / g, g, axis=0)
    return _Rows(apply, transpose, m)
  if row_fraction is not None:
    keep = max(1, int(row_fraction * num))
    mask = jnp.zeros((num,), jnp.float32).at[jax.random.permutation(key, num)[:keep]].set(1.0)

    def apply(x):
      return x * mask.reshape((num,) + (1,) * (x.ndim - 1)).astype(x.dtype)

    return _Rows(apply, lambda w: w * mask.astype(w.dtype), keep)
  return None


def _param_mask(key, params, fraction: float, by_block: bool):
  """0/1 masks (same tree as params) keeping ``int(fraction * P)`` entries.

  Elementwise: a uniformly random subset. By block: the leaves in a random order, each
  taken whole until the next would reach the target, which is then taken in part (its
  first entries in row-major order), as the Sven authors' code does.
  """
  leaves, treedef = jax.tree.flatten(params)
  sizes = np.array([math.prod(p.shape) for p in leaves], np.int64)
  total = int(sizes.sum())
  target = int(fraction * total)
  if by_block:
    order = jax.random.permutation(key, len(leaves))
    before = jnp.cumsum(jnp.asarray(sizes)[order]) - jnp.asarray(sizes)[order]
    start = jnp.zeros(len(leaves), before.dtype).at[order].set(before)
    masks = [(jnp.arange(int(s)) < jnp.clip(target - start[i], 0, int(s))).reshape(p.shape)
             for i, (s, p) in enumerate(zip(sizes, leaves, strict=True))]
  else:
    flat = jnp.zeros((total,), bool).at[jax.random.permutation(key, total)[:target]].set(True)
    bounds = np.cumsum(sizes)[:-1]
    masks = [m.reshape(p.shape) for m, p in zip(jnp.split(flat, bounds), leaves, strict=True)]
  return jax.tree.unflatten(treedef, [m.astype(jnp.float32) for m in masks])


def _polyak(u, s, keep, r, count, f_star, max_step):
  """``eta = clip((mean R - f*) / (mean U_k U_k^T R + eps), 0, max)``.

  ``mean U_k U_k^T R = g . delta`` with ``g = M^T 1 / m`` the gradient of the mean
  residual and ``delta`` the direction: the step length at which the linearised mean
  residual reaches ``f*`` (the reference's Polyak rule with the Sven direction in
  place of the gradient).
  """
  proj = jnp.matmul(u, jnp.where(keep, jnp.matmul(r, u, precision=_HIGHEST), 0.0),
                    precision=_HIGHEST)
  den = jnp.sum(proj) / count
  num = jnp.sum(r) / count - f_star
  eta = jnp.where(den > 0, num / (den + _POLYAK_EPS), 0.0)
  return jnp.clip(eta, 0.0, max_step).astype(jnp.float32)



def _jacobian(residual_fn, params, num_res: int, num_params: int):
  """``(R, blocks)``: residuals and per-leaf Jacobian blocks ``(B, *leaf_shape)``.

  Reverse mode (a vmap of ``B`` VJPs) unless there are fewer parameters than
  residuals, then forward mode (``P`` JVPs).
  """
  def with_aux(p):
    r = residual_fn(p)
    return r, r

  jac = jax.jacfwd if num_params < num_res else jax.jacrev
  blocks, r = jac(with_aux, has_aux=True)(params)
  return r, blocks


def _rms(nu, mean_grad, decay, eps):
  """EMA of the squared mean gradient and the pre-scaling ``D = 1 / (sqrt(nu) + eps)``."""
  nu = jax.tree.map(
      lambda v, g: decay * v.astype(jnp.float32)
      + (1.0 - decay) * jnp.square(g.astype(jnp.float32)), nu, mean_grad)
  d = jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v) + eps), nu)
  return nu, d


def _subspace_iteration(gram_times, key, num_res: int, sub: int, power_iterations: int, dtype):
  """Top eigenpairs of PSD ``G`` (``B x B``) from products ``G C`` only.

  Randomized subspace iteration with QR re-orthonormalisation, then
  Rayleigh-Ritz on the ``sub``-dimensional basis ``Q``: ``Q^T G Q = W Mu W^T``,
  eigenvectors ``Q W``. Returns ``(eigenvalues desc, eigenvectors, Q^T G Q)``.
  """
  q = jnp.linalg.qr(jax.random.normal(key, (num_res, sub), dtype))[0]
  q = jax.lax.fori_loop(0, power_iterations + 1, lambda _, q: jnp.linalg.qr(gram_times(q))[0], q)
  h = jnp.matmul(q.T, gram_times(q), precision=_HIGHEST)
  mu, w = _sorted_eigh(h)
  return mu, jnp.matmul(q, w, precision=_HIGHEST), h

