r"""Sven: singular value descent, truncated-pseudoinverse steps on per-sample residuals.

For per-sample residuals ``R(theta)`` of shape ``(B,)`` and their Jacobian
``M = dR/dtheta`` (``B x P``, ``P`` = number of parameters), Sven steps along

.. math::

  \delta = \mathrm{pinv}_k(M) R = V_k S_k^{-1} U_k^T R,

the minimum-norm least-squares solution of ``M delta = R`` restricted to the top
``k`` singular triplets ``M ~ U_k S_k V_k^T``. Singular values with
``S_i <= rtol * S_0`` or ``S_i <= 1e-10`` are dropped. For ``R = f(x) - y`` this
is a Gauss-Newton step when ``M`` has full column rank (under-parametrised) and
the minimum-norm step that zeroes the linearised residuals otherwise.

Three ways to compute it (``method``):

* ``"gram"`` (exact; the natural choice when ``B << P``): the Jacobian blocks of
  every leaf (``jax.jacrev``, i.e. a ``vmap`` of VJPs, or ``jax.jacfwd`` when
  ``P < B``) give ``G = M M^T = sum_leaves M_l M_l^T`` (``B x B``);
  ``G = U S^2 U^T`` by ``eigh``; ``w = U_k S_k^{-2} U_k^T R`` and
  ``delta = M^T w``. With ``microbatch_size = b < B`` the Jacobian is never
  materialised: ``G`` is built ``b`` columns at a time as ``M (M^T C)`` from
  ``b`` VJPs and ``b`` JVPs (memory ``O(b P)``), and ``delta = M^T w`` is one
  VJP.
* ``"svd"`` (exact; when ``B`` is comparable to ``P``): SVD of the
  materialised ``M``.
* ``"matrix_free"``: top-``k`` eigenpairs of ``G`` by randomized subspace
  iteration (Halko, Martinsson & Tropp 2011) using only products
  ``G C = M (M^T C)`` (one VJP + one JVP per column, columns processed
  ``microbatch_size`` at a time, default one), so memory is
  ``O(P + B k)`` plus the activations of one linearisation: ``M`` is never
  formed. The Gaussian test matrix comes from a PRNG key kept in the state.
  With ``rank + oversampling >= B`` the whole of ``G`` is formed from ``B``
  products and the result is exact.

``"auto"`` (default) picks ``"svd"`` when the Jacobian is materialised and
``P <= 2 B``, else ``"gram"``.

Float32 accuracy of the Gram form. ``cond(G) = cond(M)^2``: rounding ``G`` (or
its ``eigh``) in float32 perturbs every eigenvalue by ``~eps * S_0^2``, i.e.
``S_i`` by a relative ``eps (S_0 / S_i)^2 / 2``: 6% at the default cutoff
``S_i = 1e-3 S_0``. (The reference implementation casts to float64, which TPUs
do not offer.) The cutoff is applied to singular values, i.e. eigenvalues
below ``rtol^2 * lambda_0`` are dropped. Whenever the kept spectrum is wider than float32
resolves (``eps * lambda_0 > 1e-5 * lambda_min_kept``), a second Gram pass
runs in the basis of the first (the CholeskyQR2 idea, Fukaya et al. 2014):
with ``T = U diag(max(lambda, eps lambda_0))^{-1/2}`` the rotated, whitened
rows ``X = T^T M`` are formed and ``X X^T = W Mu W^T`` (condition ~1 on the
resolved directions) is eigendecomposed; ``M = U diag(1/d) W Mu^{1/2} Q^T``
with orthonormal ``Q``, so the SVD of the ``B x B`` factor
``U diag(1/d) W Mu^{1/2}`` gives ``U_M`` and ``S_M`` with SVD-level accuracy
(absolute error ``~eps * S_0``). That pass costs one more Gram-sized matmul
(or ``B`` more VJP/JVP pairs when microbatched), and only when needed. The
matrix-free method works on ``G`` through its products and keeps the squared
conditioning: its small kept singular values carry the Gram-level error above.

RMSProp pre-scaling (``rms_decay``, as the reference offers): an EMA
``nu <- rms_decay * nu + (1 - rms_decay) g^2`` of the squared mean per-sample
gradient ``g = M^T 1 / B`` defines ``D = diag(1 / (sqrt(nu) + rms_eps))`` and
the step is the change of variables ``theta = D phi``:
``delta = D pinv_k(M D) R``. The reference applies ``pinv_k(M D) R`` without
the outer ``D``, which is not invariant to the scale of ``D``; with it the step
is invariant to rescaling ``nu`` (so no bias correction is needed).

Separable residuals. With ``example_residual_fn(params, example)`` (a scalar or
``(T,)`` per example) and ``batch`` (leading axis = examples) in place of
``residual_fn``, the rows of ``M`` come from ONE vmapped per-example forward +
backward pass (``B`` per-example backward passes, where ``jax.jacrev`` of a
whole-batch function runs ``B`` backward passes over the whole batch). The
per-example function is traced once to a jaxpr; a parameter leaf that enters it
exactly once, as an operand of a ``dot_general`` without batch dimensions
(possibly through a cast, transpose or reshape, possibly inside a ``jit``), is
*dense*: with the layer input ``a_{it}`` and output cotangent ``g_{it}`` of
example ``i`` at position ``t`` (``t`` runs over the activation's free axes,
e.g. a sequence), its per-example gradient is ``sum_t a_{it} g_{it}^T`` and

.. math::

  (M_l M_l^T)_{ij} = \sum_{t,s} (a_{it} \cdot a_{js}) (g_{it} \cdot g_{js})

(the "ghost" inner products of per-example gradient clipping; for ``T = 1`` it
is ``(A A^T) * (G G^T)``; when ``T^2`` outgrows the leaf the per-example
gradients are formed instead). The ``g`` are the gradients of the residuals with
respect to a zero added to the layer's output, so one backward pass gives all
of them and no per-example weight gradient is formed; the step's block for the
leaf is ``sum_{i,t} w_i a_{it} g_{it}^T``, one contraction. Leaves used any other
way (biases, norm scales, embeddings, weight-tied or reused kernels) take the
per-example pass; a leaf used inside control flow, a custom-derivative function
or a convolution does too, with a warning (once). :func:`sven_leaf_paths` lists
each leaf's path; ``dense_leaves`` declares it instead. The refinement pass of
the Gram form (above) forms the rotated rows of a dense leaf a block of its input
axis at a time, so it too never holds per-example gradients of a whole leaf. With
``rms_decay`` or ``param_fraction`` (a column scaling inside ``M``) every leaf takes
the per-example pass. ``"matrix_free"`` and microbatched ``"gram"`` use the
batch's residuals ``vmap(example_residual_fn)`` as ``residual_fn``.

The reference's options. Polyak step (``polyak``): the direction is scaled by
``eta = clip((mean R - f*) / (mean U_k U_k^T R + 1e-8), 0, polyak_max)``, where
``mean U_k U_k^T R = g . delta`` with ``g = M^T 1 / m``: the step length at which the
linearised mean residual reaches ``f*`` (the authors' Polyak rule
``(loss - f*) / (||g||^2 + eps)``, capped, with the Sven direction in place of the
gradient; meant for residuals that are per-sample losses, the reference's default;
``eta = 0`` when the direction does not decrease the mean residual). Row
reduction: ``row_group_size`` averages residuals (and rows) over consecutive
groups, as the authors' ``microbatch_size`` averages losses; ``row_fraction`` masks
all but a random ``int(row_fraction * n)`` rows each step. Parameter masking
(``param_fraction``): only ``int(param_fraction * P)`` parameters move each step,
``delta = D pinv_k(M D) R`` with ``D`` a 0/1 mask, drawn entry by entry or
(``mask_by_block``) as the authors draw blocks: leaves in random order, whole
until the next would reach the target, that one in part. The random draws come
from the state's key: ``key, draw = split(key)``, rows from ``fold_in(draw, 0)``,
parameters from ``fold_in(draw, 1)``.

The incoming ``updates`` are not used for the direction (only for the output
dtypes): Sven reads the residuals and ``params`` instead.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

from optimizers._checks import check_real_floating, reject_masked_nodes
from optimizers._trees import tree_upcast

__all__ = ["ScaleBySvenState", "scale_by_sven", "sven", "sven_leaf_paths"]

_METHODS = ("auto", "gram", "svd", "matrix_free")
# Singular values at or below this are always dropped (the reference's pinv default).
_ABS_TOL = 1e-10
# A second Gram pass runs when eps * lambda_0 > _GRAM_TOL * (smallest kept eigenvalue).
_GRAM_TOL = 1e-5
_HIGHEST = jax.lax.Precision.HIGHEST
# Extra test vectors of the randomized subspace iteration when oversampling=None.
_OVERSAMPLING = 4
# Added to the denominator of the Polyak step (as the reference's Polyak rule).
_POLYAK_EPS = 1e-8


class ScaleBySvenState(NamedTuple):
  """State of :func:`scale_by_sven`.

  Attributes:
    key: legacy ``uint32`` PRNG key data, shape ``(2,)``; advanced by
      ``method="matrix_free"`` on each update, unused by the exact methods.
    singular_values: ``(rank,)`` float32, the singular values of the (pre-scaled)
      Jacobian used by the last step, descending, zero-padded.
    effective_rank: int32 scalar, how many singular directions the last step used.
    nu: EMA of the squared mean per-sample gradient (same tree as params, stored
      in ``nu_dtype``, float32 by default) when ``rms_decay`` is set, else ``()``.
    step_size: float32 scalar, the Polyak step ``eta`` of the last update with
      ``polyak=True`` (else 1).
  """

  key: jax.Array
  singular_values: jax.Array
  effective_rank: jax.Array
  nu: optax.Params
  step_size: jax.Array


def _replicated() -> jax.sharding.PartitionSpec | None:
  """Out-sharding for contractions over (possibly sharded) parameter axes."""
  return None if jax.sharding.get_abstract_mesh().empty else jax.sharding.PartitionSpec()


def _gram_of_blocks(blocks: Any) -> jax.Array:
  """``M M^T = sum_l M_l M_l^T`` from per-leaf Jacobian blocks ``(B, *leaf_shape)``.

  Without a mesh each block is viewed as a ``(B, P_l)`` matrix (XLA's CPU dot runs a
  plain 2-D product markedly faster than the multi-axis contraction); on an explicit
  mesh the contraction keeps the leaf's own axes (and shardings).
  """
  rep = _replicated()
  if rep is None:
    mats = [jnp.reshape(j, (j.shape[0], -1)) for j in jax.tree.leaves(blocks)]
    terms = [jnp.matmul(m, m.T, precision=_HIGHEST) for m in mats]
  else:
    terms = [jnp.einsum("b...,c...->bc", j, j, precision=_HIGHEST, out_sharding=rep)
             for j in jax.tree.leaves(blocks)]
  return sum(terms[1:], terms[0])


def _rotated_gram_of_blocks(t: jax.Array, blocks: Any) -> jax.Array:
  """``(T^T M)(T^T M)^T`` from the per-leaf blocks, without an explicit mesh a block of
  columns at a time (the rotated rows never exist whole)."""
  if _replicated() is not None:
    return _gram_of_blocks(_rotate_blocks(t, blocks))
  c = t.shape[1]
  width = max(1, (1 << 18) // max(1, c))  # columns per chunk: ~1 MiB of rotated rows
  total = jnp.zeros((c, c), t.dtype)

  def gram(x):
    y = jnp.matmul(t.T, x, precision=_HIGHEST)
    return jnp.matmul(y, y.T, precision=_HIGHEST)

  for j in jax.tree.leaves(blocks):
    m = jnp.reshape(j, (j.shape[0], -1))
    cols = m.shape[1]
    full = cols // width
    if full > 1:
      total = jax.lax.fori_loop(
          0, full, lambda i, acc, m=m: acc + gram(
              jax.lax.dynamic_slice_in_dim(m, i * width, width, axis=1)), total)
      if cols % width:
        total = total + gram(m[:, full * width:])
    else:
      total = total + gram(m)
  return total


def _rotate_blocks(t: jax.Array, blocks: Any) -> Any:
  """Per-leaf rows of ``T^T M``."""
  return jax.tree.map(lambda j: jnp.einsum("bc,b...->c...", t, j, precision=_HIGHEST), blocks)


def _blocks_transpose_times(blocks: Any, w: jax.Array) -> Any:
  """``M^T w`` per leaf."""
  if _replicated() is None:
    return jax.tree.map(
        lambda j: jnp.matmul(w, jnp.reshape(j, (j.shape[0], -1)),
                             precision=_HIGHEST).reshape(j.shape[1:]), blocks)
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


def _check_config(rank, rtol, method, microbatch_size, rms_decay, rms_eps, power_iterations,
                  oversampling) -> None:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a Python int >= 1, got {rank!r}")
  if isinstance(rtol, (int, float)) and not rtol >= 0:
    raise ValueError(f"rtol must be >= 0, got {rtol!r}")
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
  if microbatch_size is not None and (
      isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int)
      or microbatch_size < 1):
    raise ValueError(f"microbatch_size must be None or a Python int >= 1, got {microbatch_size!r}")
  if method == "svd" and microbatch_size is not None:
    raise ValueError("microbatch_size is not supported with method='svd' (it needs the full "
                     "Jacobian); use method='gram'")
  if isinstance(rms_decay, (int, float)) and not 0 <= rms_decay < 1:
    raise ValueError(f"rms_decay must be None or in [0, 1), got {rms_decay!r}")
  if isinstance(rms_eps, (int, float)) and not rms_eps > 0:
    raise ValueError(f"rms_eps must be > 0, got {rms_eps!r}")
  if isinstance(power_iterations, int) and power_iterations < 0:
    raise ValueError(f"power_iterations must be >= 0, got {power_iterations!r}")
  if oversampling is not None and (
      isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0):
    raise ValueError(f"oversampling must be None or a Python int >= 0, got {oversampling!r}")


def _check_options(nu_dtype, ghost, polyak, polyak_f_star, polyak_max, row_fraction,
                   row_group_size, param_fraction, mask_by_block, rms_decay) -> None:
  if nu_dtype is not None and not jnp.issubdtype(jnp.dtype(nu_dtype), jnp.floating):
    raise ValueError(f"nu_dtype must be None or a floating dtype, got {nu_dtype!r}")
  if nu_dtype is not None and rms_decay is None:
    raise ValueError("nu_dtype needs rms_decay (there is no nu state without it)")
  for name, flag in (("ghost", ghost), ("polyak", polyak), ("mask_by_block", mask_by_block)):
    if not isinstance(flag, bool):
      raise ValueError(f"{name} must be a bool, got {flag!r}")
  if isinstance(polyak_max, (int, float)) and not polyak_max > 0:
    raise ValueError(f"polyak_max must be > 0, got {polyak_max!r}")
  if not isinstance(polyak_f_star, (int, float, jax.Array)):
    raise ValueError(f"polyak_f_star must be a number, got {polyak_f_star!r}")
  for name, frac in (("row_fraction", row_fraction), ("param_fraction", param_fraction)):
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float))
                             or not 0 < frac <= 1):
      raise ValueError(f"{name} must be None or a Python float in (0, 1], got {frac!r}")
  if row_group_size is not None and (isinstance(row_group_size, bool)
                                     or not isinstance(row_group_size, int)
                                     or row_group_size < 1):
    raise ValueError(f"row_group_size must be None or a Python int >= 1, got "
                     f"{row_group_size!r}")
  if row_fraction is not None and row_group_size is not None:
    raise ValueError("row_fraction and row_group_size cannot be combined (choose one way of "
                     "reducing the rows)")
  if mask_by_block and param_fraction is None:
    raise ValueError("mask_by_block needs param_fraction (the fraction of parameters kept)")


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


def scale_by_sven(
    rank: int,
    *,
    rtol: float | jax.Array = 1e-3,
    method: str = "auto",
    microbatch_size: int | None = None,
    rms_decay: float | jax.Array | None = None,
    rms_eps: float | jax.Array = 1e-8,
    nu_dtype: Any = None,
    power_iterations: int | jax.Array = 1,
    oversampling: int | None = None,
    seed: int | jax.Array = 0,
    ghost: bool = True,
    dense_leaves: Any = None,
    polyak: bool = False,
    polyak_f_star: float | jax.Array = 0.0,
    polyak_max: float | jax.Array = 1.0,
    row_fraction: float | None = None,
    row_group_size: int | None = None,
    param_fraction: float | None = None,
    mask_by_block: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Sven direction: truncated pseudoinverse of the residual Jacobian times the residuals.

  With residuals ``R`` (``n`` rows) and ``M = dR/dparams`` (``n x P``), returns

  .. math::

    \mathrm{pinv}_k(M) R = V_k S_k^{-1} U_k^T R = M^T U_k S_k^{-2} U_k^T R,

  with the top ``k = rank`` singular triplets of ``M`` and singular values
  ``S_i <= rtol * S_0`` or ``<= 1e-10`` dropped (no damping, no ``1/B``). The
  direction has the gradient's sign (for ``R = f - y`` it is aligned with the
  gradient of ``0.5 ||R||^2``); chain a learning rate or use :func:`sven`. See
  the module docstring for the methods, the separable (per-example) mode and its
  ghost Gram, their float32 accuracy, the RMSProp pre-scaling
  ``delta = D pinv_k(M D) R`` and the reference's options.

  ``update`` takes the residuals one of two ways (keywords):

  * ``residual_fn(params) -> (B,)``: residuals of the whole batch (rows by
    ``jax.jacrev``, i.e. ``B`` backward passes over the whole batch);
  * ``example_residual_fn(params, example) -> () or (T,)`` with ``batch`` (a
    pytree of arrays whose leading axis indexes the examples): the separable
    form. ``R`` is ``vmap(example_residual_fn)`` over the batch, flattened
    example-major (``n = B T``); rows come from ONE vmapped per-example backward
    pass, and with ``ghost=True`` the leaves that enter through a matmul
    (:func:`sven_leaf_paths` lists them) contribute to ``M M^T`` from their
    inputs and output cotangents without per-example gradients.

  The incoming ``updates`` are NOT used for the direction, only for the output
  dtypes. Parameters are upcast to float32 (at least) before the residuals are
  differentiated; the output has the updates' dtypes. Non-finite residuals
  or Jacobians give a non-finite output (so ``optax.apply_if_finite`` can skip
  the step); a zero Jacobian gives a zero step. Integer or complex leaves raise
  ``TypeError``; inside ``optax.masked``/``optax.partition`` (the residuals need
  the full params) ``ValueError``; an empty params tree gives an empty step.

  Args:
    rank: ``k``, the number of singular directions kept (Python int >= 1).
    rtol: relative cutoff; singular values ``<= rtol * S_0`` are dropped.
    method: ``"auto"``, ``"gram"``, ``"svd"`` or ``"matrix_free"``.
    microbatch_size: ``"gram"``: build ``G`` from this many VJP/JVP pairs at a
      time instead of materialising the Jacobian (``None``: materialise).
      ``"matrix_free"``: columns per Gram product (``None``: 1, the
      ``O(P + B k)`` memory regime). Not allowed with ``"svd"``.
    rms_decay: ``None`` (off) or the EMA decay of the RMSProp pre-scaling.
    rms_eps: added to ``sqrt(nu)`` in the pre-scaling.
    nu_dtype: dtype in which ``nu`` is stored (``None``: float32). As optax's
      ``nu_dtype``: the EMA and the step are computed in float32 from the stored
      value, and only the new state is rounded to ``nu_dtype``.
    power_iterations: subspace iterations of ``"matrix_free"`` (may be traced).
    oversampling: extra test vectors of ``"matrix_free"``: subspace size
      ``min(B, rank + oversampling)``; ``None`` means 4. A Python int (it fixes
      shapes; ``None`` keeps ``optax.inject_hyperparams`` from tracing it).
    seed: seed of the PRNG key (``"matrix_free"`` and the random masks).
    ghost: separable mode only: use the ghost Gram for dense leaves
      (``False``: every leaf's rows come from the per-example pass).
    dense_leaves: separable mode only: ``None`` (find dense leaves in the
      per-example residual's jaxpr) or a pytree like params (or a callable
      ``params -> pytree``) of ``True`` (must be dense: ``ValueError`` naming
      the leaf otherwise), ``False`` (per-example rows) or ``None`` (automatic).
    polyak: scale the direction by the Polyak step ``eta`` (module docstring);
      ``state.step_size`` records it.
    polyak_f_star: the Polyak rule's target mean residual (``0`` for losses of
      an interpolating model).
    polyak_max: upper bound of ``eta``.
    row_fraction: row masking: each step uses a random ``int(row_fraction * n)``
      of the ``n`` residual rows (at least one).
    row_group_size: row reduction as the reference's ``microbatch_size``:
      residuals (and Jacobian rows) averaged over consecutive groups of this size.
    param_fraction: random parameter masking: each step only ``int(param_fraction
      * P)`` parameters move (``delta = D pinv_k(M D) R`` with ``D`` a 0/1 mask).
    mask_by_block: draw the parameter mask by whole leaves (random leaf order,
      the last one in part) instead of entry by entry.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params`` and either ``residual_fn`` or ``example_residual_fn`` and ``batch``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optimizers import scale_by_sven
    >>> x = jnp.linspace(-1.0, 1.0, 8)
    >>> residual_fn = lambda p: p["w"] * x + p["b"] - (2.0 * x + 1.0)
    >>> params = {"w": jnp.zeros(()), "b": jnp.zeros(())}
    >>> tx = optax.chain(scale_by_sven(rank=2), optax.scale(-1.0))
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: 0.5 * jnp.sum(residual_fn(p) ** 2))(params)
    >>> updates, state = tx.update(grads, state, params, residual_fn=residual_fn)
    >>> new = optax.apply_updates(params, updates)  # one Gauss-Newton step solves it
    >>> print(f"{float(new['w']):.4f} {float(new['b']):.4f}")
    2.0000 1.0000
    >>> # the same step from a per-example residual (x_i, y_i) -> scalar
    >>> example_fn = lambda p, xy: p["w"] * xy[0] + p["b"] - xy[1]
    >>> updates, _ = tx.update(grads, state, params, example_residual_fn=example_fn,
    ...                        batch=(x, 2.0 * x + 1.0))
    >>> new = optax.apply_updates(params, updates)
    >>> print(f"{float(new['w']):.4f} {float(new['b']):.4f}")
    2.0000 1.0000

  References:
    Bright-Thonney, Harvey, Lukas, Thaler, "Sven: Singular Value Descent as a
    Computationally Efficient Natural Gradient Method", 2026,
    https://arxiv.org/abs/2604.01279

    Goodfellow, "Efficient Per-Example Gradient Computations", 2015,
    https://arxiv.org/abs/1510.01799 (per-example gradient norms of dense layers)

    Li, Tramer, Liang, Hashimoto, "Large Language Models Can Be Strong
    Differentially Private Learners", 2021, https://arxiv.org/abs/2110.05679
    (ghost norms with a sequence axis)
  """
  _check_config(rank, rtol, method, microbatch_size, rms_decay, rms_eps, power_iterations,
                oversampling)
  _check_options(nu_dtype, ghost, polyak, polyak_f_star, polyak_max, row_fraction,
                 row_group_size, param_fraction, mask_by_block, rms_decay)
  store = jnp.float32 if nu_dtype is None else jnp.dtype(nu_dtype)

  def init_fn(params):
    nu = () if rms_decay is None else jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=store), params)
    # `+ zeros` gives the key the sharding spec P(None,) that a jitted update
    # returns; a bare PRNGKey carries P(), which would retrace under explicit meshes.
    return ScaleBySvenState(
        key=jnp.zeros((2,), jnp.uint32) + jax.random.PRNGKey(seed),
        singular_values=jnp.zeros((rank,), jnp.float32),
        effective_rank=jnp.zeros((), jnp.int32),
        nu=nu,
        step_size=jnp.ones((), jnp.float32),
    )

  def update_fn(updates, state, params=None, *, residual_fn=None, example_residual_fn=None,
                batch=None, **extra_args):
    del extra_args
    if (residual_fn is None) == (example_residual_fn is None):
      raise ValueError("scale_by_sven requires exactly one of the keyword arguments "
                       "residual_fn(params) -> (B,) or example_residual_fn(params, example) "
                       "(with batch)")
    if example_residual_fn is not None and batch is None:
      raise ValueError("example_residual_fn needs the keyword argument batch (a pytree of "
                       "arrays with a leading example axis)")
    if residual_fn is not None and batch is not None:
      raise ValueError("batch goes with example_residual_fn, not with residual_fn")
    if params is None:
      raise ValueError("scale_by_sven requires params (the residuals are differentiated at "
                       "params)")
    reject_masked_nodes(params, owner="scale_by_sven", reason="residual_fn needs the full params.")
    check_real_floating(params, owner="scale_by_sven", name="params")
    check_real_floating(updates, owner="scale_by_sven")
    if not jax.tree.leaves(params):  # nothing to optimise: an empty step
      return updates, state
    params_c = tree_upcast(params)
    separable = example_residual_fn is not None
    if separable:
      num_examples = _batch_size(batch)
      t_out = _example_out_size(example_residual_fn, params_c, batch)
      num_res = num_examples * t_out

      def whole_fn(p):
        out = jax.vmap(lambda ex: jnp.reshape(example_residual_fn(p, ex), (-1,)))(batch)
        return out.reshape(num_res)
    else:
      out_shape = jax.eval_shape(residual_fn, params_c)
      if not hasattr(out_shape, "shape") or len(out_shape.shape) != 1 or out_shape.shape[0] < 1:
        raise ValueError("residual_fn must return a 1-D array of per-sample residuals, got "
                         f"{out_shape}")
      num_res = out_shape.shape[0]
      whole_fn = residual_fn
    num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params_c))

    key, nu = state.key, state.nu
    if row_fraction is not None or param_fraction is not None:
      key, draw = jax.random.split(key)
    rows = _row_reduction(num_res, row_fraction, row_group_size,
                          jax.random.fold_in(draw, 0) if row_fraction is not None else None)
    num_kept = num_res if rows is None else rows.count
    row_apply = (lambda x: x) if rows is None else rows.apply
    row_t = (lambda w: w) if rows is None else rows.transpose
    pmask = None if param_fraction is None else _param_mask(
        jax.random.fold_in(draw, 1), params_c, param_fraction, mask_by_block)
    scaled = rms_decay is not None or pmask is not None

    def scaling(mean_grad):
      """``(nu, D)``: the new EMA and the column scaling (RMS times mask), or D None."""
      new_nu, d = nu, None
      if rms_decay is not None:
        new_nu, d = _rms(nu, mean_grad, rms_decay, rms_eps)
      if pmask is not None:
        d = pmask if d is None else jax.tree.map(jnp.multiply, d, pmask)
      return new_nu, d

    materialise = method in ("gram", "svd", "auto") and (
        microbatch_size is None or microbatch_size >= num_res)
    chosen = method
    if method == "auto":
      chosen = "svd" if materialise and num_params <= 2 * num_res else "gram"

    analysis = None
    if separable and materialise:
      flat = jax.tree.leaves(params_c)
      names = _leaf_names(params_c)
      analysis = _analyse(_trace(example_residual_fn, params_c, batch), len(flat),
                          ghost and chosen == "gram" and not scaled,
                          _declared_flags(dense_leaves, params_c, len(flat)), names)

    if analysis is not None and analysis.dense:  # ghost Gram + per-example rows for the rest
      leaves, treedef = jax.tree.flatten(params_c)
      r, free_rows, acts, cots = _per_example_pass(analysis, leaves, batch, t_out)
      uses = list(analysis.dense.values())
      factors = [_ghost_factors(u, a, c) for u, a, c in zip(uses, acts, cots, strict=True)]
      grams = [_ghost_gram(a, g) for a, g in factors]
      if free_rows:
        grams.append(_gram_of_blocks(free_rows))
      g = sum(grams[1:], grams[0])
      if rows is not None:
        g = rows.apply(rows.apply(g).T).T
      r_used = row_apply(r)

      def rotated_gram(t):  # (T^T M)(T^T M)^T from rotated rows, dense leaves in chunks
        t = jax.vmap(row_t, in_axes=1, out_axes=1)(t)
        terms = [_ghost_rotated_gram(a, gc, t) for a, gc in factors]
        if free_rows:
          terms.append(_rotated_gram_of_blocks(t, free_rows))
        return sum(terms[1:], terms[0])

      u, s = _spectrum(*_sorted_eigh(g), rank, rtol, rotated_gram)
      check = g
      keep = _keep_mask(s, rank, rtol)
      w = row_t(_pinv_weights(u, s, keep, r_used))
      out = [None] * len(leaves)
      for use, (a, gc) in zip(uses, factors, strict=True):
        out[use.leaf] = _ghost_transpose_times(use, leaves[use.leaf], a, gc, w)
      for i, rws in zip(free_rows, _blocks_transpose_times(list(free_rows.values()), w),
                        strict=True):
        out[i] = rws
      delta = jax.tree.unflatten(treedef, out)
      d = None
    elif materialise:
      if separable:
        leaves, treedef = jax.tree.flatten(params_c)
        if analysis is None:
          analysis = _Analysis(_trace(example_residual_fn, params_c, batch), {}, {}, {}, set())
        r, free_rows, _, _ = _per_example_pass(analysis, leaves, batch, t_out)
        blocks = jax.tree.unflatten(treedef, [free_rows[i] for i in range(len(leaves))])
      else:
        r, blocks = _jacobian(residual_fn, params_c, num_res, num_params)
      nu, d = scaling(jax.tree.map(lambda j: jnp.mean(j, axis=0), blocks)) if scaled else (nu,
                                                                                          None)
      if d is not None:
        blocks = jax.tree.map(lambda j, dl: j * dl.astype(j.dtype), blocks, d)
      if rows is not None:
        blocks = jax.tree.map(rows.apply, blocks)
      r_used = row_apply(r)
      m_rows = r_used.shape[0]
      if chosen == "svd":
        m = jnp.concatenate(
            [jnp.reshape(j, (m_rows, -1), out_sharding=_replicated())
             for j in jax.tree.leaves(blocks)], axis=1)
        u, s, _ = jnp.linalg.svd(m, full_matrices=False)
        check = m
      else:
        g = _gram_of_blocks(blocks)
        u, s = _spectrum(*_sorted_eigh(g), rank, rtol,
                         lambda t: _rotated_gram_of_blocks(t, blocks))
        check = g
      keep = _keep_mask(s, rank, rtol)
      delta = _blocks_transpose_times(blocks, _pinv_weights(u, s, keep, r_used))
    else:
      r, jvp_fn = jax.linearize(whole_fn, params_c)
      vjp_fn = jax.linear_transpose(jvp_fn, params_c)
      mt = lambda v: vjp_fn(v)[0]
      d = None
      if scaled:
        mean_grad = mt(jnp.full_like(r, 1.0 / num_res)) if rms_decay is not None else None
        nu, d = scaling(mean_grad)
        d2 = jax.tree.map(lambda dl: dl * dl, d)
        mt = lambda v, mt=mt: jax.tree.map(lambda x, dl: x * dl.astype(x.dtype), mt(v), d2)
      if rows is not None:
        jvp0, mt0 = jvp_fn, mt
        jvp_fn = lambda t, jvp0=jvp0: row_apply(jvp0(t))
        mt = lambda v, mt0=mt0: mt0(row_t(v))
      r_used = row_apply(r)
      m_rows = r_used.shape[0]
      eye = jnp.eye(m_rows, dtype=r.dtype)
      chunk = (microbatch_size or 1) if chosen == "matrix_free" else microbatch_size
      gram_times = lambda c: _gram_times(jvp_fn, mt, c, chunk)
      sub = min(m_rows, rank + (_OVERSAMPLING if oversampling is None else oversampling))
      if chosen == "matrix_free" and sub < m_rows:
        key, draw_mf = jax.random.split(key)
        lam, u, check = _subspace_iteration(gram_times, draw_mf, m_rows, sub, power_iterations,
                                            r.dtype)
      else:  # the whole of G from B products
        check = gram_times(eye)
        lam, u = _sorted_eigh(check)
      u, s = _spectrum(lam, u, rank, rtol,
                       lambda t: jnp.matmul(t.T, gram_times(t), precision=_HIGHEST))
      keep = _keep_mask(s, rank, rtol)
      delta = mt(_pinv_weights(u, s, keep, r_used))
      d = None  # mt already carries D^2 = D (D pinv(M D) R = D^2 M^T w)

    if d is not None:
      delta = jax.tree.map(lambda x, dl: x * dl.astype(x.dtype), delta, d)
    step_size = state.step_size
    if polyak:
      step_size = _polyak(u, s, keep, r_used, num_kept, polyak_f_star, polyak_max)
      delta = jax.tree.map(lambda x: x * step_size.astype(x.dtype), delta)
    finite = jnp.all(jnp.isfinite(r)) & jnp.all(jnp.isfinite(check))
    delta = jax.tree.map(lambda x: jnp.where(finite, x, jnp.nan), delta)
    delta = jax.tree.map(lambda x, ref: x.astype(ref.dtype), delta,
                         params if updates is None else updates)
    if rms_decay is not None:
      nu = jax.tree.map(lambda v: v.astype(store), nu)
    singular_values, effective_rank = _diagnostics(s, keep, rank)
    return delta, ScaleBySvenState(key, singular_values, effective_rank, nu, step_size)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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


def sven(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    rtol: float | jax.Array = 1e-3,
    method: str = "auto",
    microbatch_size: int | None = None,
    rms_decay: float | jax.Array | None = None,
    rms_eps: float | jax.Array = 1e-8,
    nu_dtype: Any = None,
    power_iterations: int | jax.Array = 1,
    oversampling: int | None = None,
    seed: int | jax.Array = 0,
    ghost: bool = True,
    dense_leaves: Any = None,
    polyak: bool = False,
    polyak_f_star: float | jax.Array = 0.0,
    polyak_max: float | jax.Array = 1.0,
    row_fraction: float | None = None,
    row_group_size: int | None = None,
    param_fraction: float | None = None,
    mask_by_block: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Sven optimizer: ``-learning_rate * pinv_k(dR/dparams) R``.

  :func:`scale_by_sven` followed by ``optax.scale_by_learning_rate``: the
  update is

  .. math::

    \Delta\theta = -\eta \, V_k S_k^{-1} U_k^T R,

  added to the params by ``optax.apply_updates``. With ``R = f(x) - y`` and
  ``learning_rate = 1`` a step solves the linearised residual equations
  (Gauss-Newton / minimum norm); the paper uses learning rates 0.05 to 1.
  ``update`` requires ``params`` and either ``residual_fn(params) -> (B,)`` or
  ``example_residual_fn(params, example)`` with ``batch`` (see
  :func:`scale_by_sven`; with ``polyak=True`` the step is ``-learning_rate * eta
  * direction``).

  Args:
    learning_rate: scalar or schedule.
    rank: number of singular directions kept.
    rtol: relative singular-value cutoff.
    method: ``"auto"``, ``"gram"``, ``"svd"`` or ``"matrix_free"``.
    microbatch_size: see :func:`scale_by_sven`.
    rms_decay: ``None`` or the decay of the RMSProp pre-scaling.
    rms_eps: epsilon of the pre-scaling.
    nu_dtype: storage dtype of the pre-scaling's ``nu`` (``None``: float32).
    power_iterations: subspace iterations of ``"matrix_free"``.
    oversampling: extra test vectors of ``"matrix_free"`` (``None``: 4).
    seed: PRNG seed of ``"matrix_free"`` and the random masks.
    ghost: ghost Gram for dense leaves in the separable mode.
    dense_leaves: declaration of the dense leaves (``None``: found automatically).
    polyak: scale by the Polyak step ``eta``.
    polyak_f_star: target mean residual of the Polyak step.
    polyak_max: upper bound of the Polyak step.
    row_fraction: random row masking (fraction of residual rows used per step).
    row_group_size: residuals averaged over groups of this size.
    param_fraction: random parameter masking (fraction of parameters moved).
    mask_by_block: draw the parameter mask by whole leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optimizers import sven
    >>> x = jnp.linspace(-1.0, 1.0, 16)
    >>> residual_fn = lambda p: p["a"] * jnp.exp(p["c"] * x) - 2.0 * jnp.exp(0.5 * x)
    >>> params = {"a": jnp.array(1.0), "c": jnp.array(0.0)}
    >>> opt = sven(learning_rate=1.0, rank=2)
    >>> state = opt.init(params)
    >>> for _ in range(10):
    ...   grads = jax.grad(lambda p: 0.5 * jnp.sum(residual_fn(p) ** 2))(params)
    ...   updates, state = opt.update(grads, state, params, residual_fn=residual_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{float(params['a']):.3f} {float(params['c']):.3f}")
    2.000 0.500

  References:
    Bright-Thonney, Harvey, Lukas, Thaler, "Sven: Singular Value Descent as a
    Computationally Efficient Natural Gradient Method", 2026,
    https://arxiv.org/abs/2604.01279
  """
  return optax.chain(
      scale_by_sven(
          rank, rtol=rtol, method=method, microbatch_size=microbatch_size, rms_decay=rms_decay,
          rms_eps=rms_eps, nu_dtype=nu_dtype, power_iterations=power_iterations,
          oversampling=oversampling, seed=seed, ghost=ghost, dense_leaves=dense_leaves,
          polyak=polyak, polyak_f_star=polyak_f_star, polyak_max=polyak_max,
          row_fraction=row_fraction, row_group_size=row_group_size,
          param_fraction=param_fraction, mask_by_block=mask_by_block),
      optax.scale_by_learning_rate(learning_rate),
  )


# ======================================================================================
# Separable residuals: per-example rows and the ghost Gram of dense leaves
# ======================================================================================

# Primitives that carry their own sub-programs: a parameter used inside one of them is
# not looked into (its rows come from the per-example pass) and this is said once.
_INLINED = ("pjit", "jit", "closed_call", "core_call")
# Unary layout ops through which a parameter still counts as "the same leaf".
_ALIASING = ("convert_element_type", "transpose", "reshape", "copy", "copy_p")
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _WARNED:
    _WARNED.add(message)
    warnings.warn(message, stacklevel=3)


class _DenseUse(NamedTuple):
  """A parameter leaf entering the residual through one ``dot_general``."""

  leaf: int  # index in the flattened params
  eqn: Any  # the dot_general equation
  side: int  # operand position of the parameter (0: lhs, 1: rhs)
  chain: tuple  # the aliasing equations from the leaf to the dot operand, in order


class _Analysis(NamedTuple):
  jaxpr: Any  # ClosedJaxpr of f(flat_params, example)
  dense: dict  # leaf -> _DenseUse, the leaves that take the ghost path
  reasons: dict  # leaf -> why it takes the per-example path
  ghost_eqns: dict  # id(eqn) -> position in `dense` order
  inline: set  # id(eqn) of call equations that contain a ghost equation


def _is_literal(v) -> bool:
  return isinstance(v, jax.extend.core.Literal)


def _subjaxprs(eqn) -> list:
  return list(jax.extend.core.jaxprs_in_params(eqn.params))


def _analyse(closed, num_leaves: int, ghost: bool, declared: Sequence[bool | None],
             names: Sequence[str]) -> _Analysis:
  """Which leaves enter only through one ``dot_general`` with an activation."""
  uses: dict[int, list] = {i: [] for i in range(num_leaves)}
  contains: dict[int, set] = {}  # id(call eqn) -> ids of dot eqns inside

  def walk(jaxpr, alias: dict, calls: tuple) -> None:
    for eqn in jaxpr.eqns:
      hit = [k for k, v in enumerate(eqn.invars) if not _is_literal(v) and v in alias]
      if not hit:
        continue
      name = eqn.primitive.name
      if name in _ALIASING and len(eqn.invars) == 1:
        leaf, chain = alias[eqn.invars[0]]
        alias[eqn.outvars[0]] = (leaf, chain + (eqn,))
        continue
      if name in _INLINED:
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        inner = getattr(inner, "jaxpr", inner)
        sub = {inner.invars[k]: alias[eqn.invars[k]] for k in hit}
        walk(inner, sub, calls + (id(eqn),))
        continue
      if name == "dot_general" and len(hit) == 1:
        side = hit[0]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        leaf, chain = alias[eqn.invars[side]]
        if not (lb or rb):
          uses[leaf].append(("dot", eqn, side, chain, calls))
          continue
        uses[leaf].append(("batched dot_general", None, None, None, calls))
        continue
      for k in hit:
        uses[alias[eqn.invars[k]][0]].append((name, None, None, None, calls))
    for v in jaxpr.outvars:
      if not _is_literal(v) and v in alias:
        uses[alias[v][0]].append(("output", None, None, None, ()))

  top = closed.jaxpr
  walk(top, {v: (i, ()) for i, v in enumerate(top.invars[:num_leaves])}, ())

  dense, reasons = {}, {}
  for leaf in range(num_leaves):
    found = uses[leaf]
    ok = len(found) == 1 and found[0][0] == "dot"
    if declared[leaf] is True and not ok:
      kinds = sorted({u[0] for u in found}) or ["nothing"]
      raise ValueError(
          f"dense_leaves declares {names[leaf]} dense, but the per-example residual uses it "
          f"through {', '.join(kinds)} (a dense leaf must enter exactly once, as an operand "
          "of a matmul / dot_general with no batch dimensions)")
    if not ghost:
      reasons[leaf] = "ghost=False"
    elif declared[leaf] is False:
      reasons[leaf] = "declared not dense"
    elif ok:
      _, eqn, side, chain, calls = found[0]
      dense[leaf] = _DenseUse(leaf, eqn, side, chain)
      for call in calls:
        contains.setdefault(call, set()).add(id(eqn))
    else:
      kinds = sorted({u[0] for u in found})
      if len(found) > 1 and all(u[0] == "dot" for u in found):
        reasons[leaf] = f"used by {len(found)} matmuls"
      else:
        reasons[leaf] = "used by " + (", ".join(kinds) or "nothing")
      opaque = [u[0] for u in found if u[0] not in ("dot", "output")
                and (u[0] in ("conv_general_dilated", "batched dot_general")
                     or u[0] in _OPAQUE_NAMES)]
      if opaque:
        _warn_once(f"Sven ghost Gram: {names[leaf]} is used inside '{opaque[0]}', which the "
                   "ghost Gram does not look into; its Jacobian rows come from the "
                   "per-example pass")
  # A jitted helper applied to several leaves shares one inner equation: not per leaf.
  shared = {k for k, v in collections.Counter(id(u.eqn) for u in dense.values()).items() if v > 1}
  for leaf in [leaf for leaf, use in dense.items() if id(use.eqn) in shared]:
    del dense[leaf]
    reasons[leaf] = "matmul in a sub-function shared with other leaves"
  contains = {call: ids - shared for call, ids in contains.items() if ids - shared}
  ghost_eqns = {id(use.eqn): pos for pos, use in enumerate(dense.values())}
  return _Analysis(closed, dense, reasons, ghost_eqns, set(contains))


# Primitives with sub-programs (control flow, custom derivatives, remat) or convolutions:
# a parameter used there falls back to per-example rows, with a warning.
_OPAQUE_NAMES = ("scan", "while", "cond", "custom_jvp_call", "custom_vjp_call",
                 "custom_vjp_call_jaxpr", "checkpoint", "remat", "shard_map", "custom_lin")


def _leaf_names(params) -> list[str]:
  return [jax.tree_util.keystr(path) or "<root>"
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _declared_flags(dense_leaves, params, num_leaves: int) -> list[bool | None]:
  if dense_leaves is None:
    return [None] * num_leaves
  tree = dense_leaves(params) if callable(dense_leaves) else dense_leaves
  try:
    flags = jax.tree.structure(params).flatten_up_to(
        jax.tree.map(lambda f: f, tree, is_leaf=lambda x: x is None))
  except (ValueError, TypeError) as err:
    raise ValueError("dense_leaves must be a pytree with the structure of params (bool per "
                     f"leaf, None for automatic detection): {err}") from None
  out = []
  for f in flags:
    if f is not None and not isinstance(f, bool):
      raise ValueError(f"dense_leaves entries must be True, False or None, got {f!r}")
    out.append(f)
  return out


def _example_avals(batch) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)


def _batch_size(batch) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch must be a pytree of arrays with a leading example axis, got no "
                     "arrays")
  sizes = {x.shape[0] if getattr(x, "ndim", 0) >= 1 else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    shapes = [getattr(x, "shape", ()) for x in leaves]
    raise ValueError("batch leaves must share a leading example axis (the examples of the "
                     f"batch), got shapes {shapes}")
  return sizes.pop()


def _example_out_size(example_residual_fn, params, batch) -> int:
  out = jax.eval_shape(example_residual_fn, params, _example_avals(batch))
  if not hasattr(out, "shape") or len(out.shape) > 1:
    raise ValueError("example_residual_fn must return a scalar or a 1-D array of residuals "
                     f"for one example, got {out}")
  if len(out.shape) == 1 and out.shape[0] < 1:
    raise ValueError("example_residual_fn returned an empty residual vector for an example")
  return 1 if not out.shape else out.shape[0]


def _trace(example_residual_fn, params, batch):
  flat, treedef = jax.tree.flatten(params)

  def f(flat_params, example):
    return example_residual_fn(jax.tree.unflatten(treedef, flat_params), example)

  return jax.make_jaxpr(f)(flat, _example_avals(batch))


def _eval_tapped(jaxpr, consts, args, analysis: _Analysis, zs: Sequence, taps: dict):
  """Evaluates ``jaxpr``; each ghost ``dot_general`` gets ``+ z`` and records its activation."""
  env: dict = {}

  def read(v):
    return v.val if _is_literal(v) else env[v]

  for v, val in zip(jaxpr.constvars, consts, strict=True):
    env[v] = val
  for v, val in zip(jaxpr.invars, args, strict=True):
    env[v] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    key = id(eqn)
    if key in analysis.inline:
      inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      consts_in = getattr(inner, "consts", [])
      inner = getattr(inner, "jaxpr", inner)
      outs = _eval_tapped(inner, consts_in, invals, analysis, zs, taps)
    else:
      params = eqn.primitive.get_bind_params(eqn.params)
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
      if key in analysis.ghost_eqns:
        pos = analysis.ghost_eqns[key]
        use = list(analysis.dense.values())[pos]
        taps[pos] = invals[1 - use.side]
        outs = [outs[0] + zs[pos].astype(outs[0].dtype)]
    for v, val in zip(eqn.outvars, outs, strict=True):
      env[v] = val
  return [read(v) for v in jaxpr.outvars]


def _dense_layout(use: _DenseUse):
  """For the ghost dot: activation contracting/free axes and the output's axis order."""
  (lc, rc), _ = use.eqn.params["dimension_numbers"]
  act_contract = lc if use.side == 1 else rc
  act = use.eqn.invars[1 - use.side].aval
  w = use.eqn.invars[use.side].aval
  w_contract = rc if use.side == 1 else lc
  act_free = [a for a in range(act.ndim) if a not in act_contract]
  w_free = [a for a in range(w.ndim) if a not in w_contract]
  return act_contract, act_free, w_contract, w_free


def _ghost_factors(use: _DenseUse, act: jax.Array, cot: jax.Array):
  """Rows of the dense leaf's per-example gradient ``sum_t a_t g_t^T`` as ``(A, G)``.

  ``act``: ``(B, *activation)``; ``cot``: ``(n, *dot_output)`` with ``n = B * T_out``.
  Returns ``A`` of shape ``(n, T, K)`` and ``G`` of shape ``(n, T, N)``, ``T`` the
  product of the activation's free ("token") axes, ``K`` of its contracting axes, ``N``
  of the leaf's free axes.
  """
  act_contract, act_free, _, w_free = _dense_layout(use)
  b = act.shape[0]
  n = cot.shape[0]
  t = math.prod(act.shape[1 + a] for a in act_free)
  k = math.prod(act.shape[1 + a] for a in act_contract)
  a = jnp.transpose(act, [0] + [1 + x for x in act_free] + [1 + x for x in act_contract])
  a = a.reshape(b, 1, t, k)
  a = jnp.broadcast_to(a, (b, n // b, t, k)).reshape(n, t, k)
  nf = len(act_free)
  nw = len(w_free)
  if use.side == 0:  # output axes: (w_free..., act_free...) -> (act_free..., w_free...)
    perm = [0] + [1 + nw + x for x in range(nf)] + [1 + x for x in range(nw)]
    cot = jnp.transpose(cot, perm)
  g = cot.reshape(n, t, -1)
  return a, g


def _ghost_gram(a: jax.Array, g: jax.Array) -> jax.Array:
  """``sum_{t,s} (a_it . a_js)(g_it . g_js)`` (``n x n``), the cheaper of two ways."""
  n, t, k = a.shape
  nn = g.shape[2]
  rep = _replicated()
  if t == 1:
    aa = jnp.einsum("ik,jk->ij", a[:, 0], a[:, 0], precision=_HIGHEST, out_sharding=rep)
    gg = jnp.einsum("ik,jk->ij", g[:, 0], g[:, 0], precision=_HIGHEST, out_sharding=rep)
    return aa * gg
  if (n * t) ** 2 * (k + nn) <= n * t * k * nn + n * n * k * nn:
    aa = jnp.einsum("itk,jsk->itjs", a, a, precision=_HIGHEST, out_sharding=rep)
    gg = jnp.einsum("itk,jsk->itjs", g, g, precision=_HIGHEST, out_sharding=rep)
    return jnp.sum(aa * gg, axis=(1, 3))
  rows = jnp.einsum("itk,itn->ikn", a, g, precision=_HIGHEST)  # per-example gradients
  return jnp.einsum("ikn,jkn->ij", rows, rows, precision=_HIGHEST, out_sharding=rep)


def _ghost_rotated_gram(a: jax.Array, g: jax.Array, t: jax.Array) -> jax.Array:
  """``X X^T`` for the rotated rows ``X_c = sum_i t_ic (per-example gradient i)`` of a
  dense leaf, formed a block of the leaf's input axis at a time (the refinement pass:
  rounding relative to the whitened rows, never the ``n x P_l`` rows at once)."""
  n, tt, k = a.shape
  nn = g.shape[2]
  c = t.shape[1]
  length = n * tt
  budget = 1 << 18  # floats per intermediate (1 MiB): temporaries stay small
  kc = int(max(1, min(k, budget // max(1, c * nn), budget // max(1, c * length))))
  steps = -(-k // kc)
  a = jnp.pad(a.reshape(length, k), ((0, 0), (0, steps * kc - k)))
  a = a.reshape(length, steps, kc).transpose(1, 0, 2)
  weights = jnp.repeat(t, tt, axis=0)  # (n * T, c): row i's weight on each token
  gl = g.reshape(length, nn)

  def body(acc, a_chunk):
    x = jnp.einsum("lc,lk,ln->ckn", weights, a_chunk, gl, precision=_HIGHEST)
    x = x.reshape(c, -1)
    return acc + jnp.matmul(x, x.T, precision=_HIGHEST), None

  return jax.lax.scan(body, jnp.zeros((c, c), g.dtype), a)[0]


def _ghost_transpose_times(use: _DenseUse, leaf: jax.Array, a: jax.Array, g: jax.Array,
                           w: jax.Array) -> jax.Array:
  """``M_l^T w`` for a dense leaf: ``sum_i w_i sum_t a_it g_it^T`` back in the leaf's layout."""
  _, _, w_contract, w_free = _dense_layout(use)
  d = jnp.einsum("itk,itn->kn", a, g * w[:, None, None].astype(g.dtype), precision=_HIGHEST,
                 out_sharding=_replicated())
  operand = use.eqn.invars[use.side].aval
  order = list(w_contract) + list(w_free)
  d = d.reshape([operand.shape[x] for x in order])
  d = jnp.transpose(d, np.argsort(order))

  def chain(p):  # the aliasing ops from the leaf to the dot operand
    for eqn in use.chain:
      with eqn.ctx.manager:
        p = eqn.primitive.bind(p, **eqn.primitive.get_bind_params(eqn.params))
    return p

  _, pullback = jax.vjp(chain, leaf)
  out = pullback(d.astype(operand.dtype))[0]
  if _replicated() is not None:  # back to the leaf's own sharding
    out = jax.sharding.reshard(out, jax.typeof(leaf).sharding.spec)
  return out


def _per_example_pass(analysis: _Analysis | None, flat_params: list, batch, t_out: int):
  """One vmapped forward + backward over the examples.

  Returns ``(r, rows, acts, cots)``: residuals ``(n,)``, per-example Jacobian rows of the
  non-dense leaves (``{leaf: (n, *shape)}``), and for each dense leaf its activations
  ``(B, ...)`` and output cotangents ``(n, ...)``; ``n = B * T_out``, example-major.
  """
  jaxpr = analysis.jaxpr
  dense = analysis.dense
  free = [i for i in range(len(flat_params)) if i not in dense]
  uses = list(dense.values())

  def one(example):
    zs0 = [jnp.zeros(u.eqn.outvars[0].aval.shape, u.eqn.outvars[0].aval.dtype) for u in uses]

    def f(free_params, zs):
      full = list(flat_params)
      for i, p in zip(free, free_params, strict=True):
        full[i] = p
      taps: dict = {}
      (out,) = _eval_tapped(jaxpr.jaxpr, jaxpr.consts, full + jax.tree.leaves(example),
                            analysis, zs, taps)
      return jnp.reshape(out, (-1,)), [taps[k] for k in range(len(uses))]

    r, pullback, acts = jax.vjp(f, [flat_params[i] for i in free], zs0, has_aux=True)
    rows, cots = jax.vmap(pullback)(jnp.eye(t_out, dtype=r.dtype))
    return r, rows, acts, cots

  r, rows, acts, cots = jax.vmap(one)(batch)
  n = r.shape[0] * t_out
  flatten = lambda x: x.reshape((n,) + x.shape[2:])
  rows = {i: flatten(x) for i, x in zip(free, rows, strict=True)}
  return r.reshape(n), rows, acts, [flatten(c) for c in cots]


def sven_leaf_paths(example_residual_fn: Callable[[Any, Any], jax.Array], params: Any,
                    batch: Any, *, dense_leaves: Any = None, ghost: bool = True
                    ) -> dict[str, str]:
  """Which path each parameter leaf takes in :func:`scale_by_sven`'s separable mode.

  ``"ghost"``: the leaf enters the per-example residual exactly once, as an operand of
  a ``dot_general`` (a Dense/Linear kernel, an attention projection), so its block of
  ``M M^T`` comes from the layer's inputs and output cotangents without per-example
  gradients. ``"per_example (...)"``: its Jacobian rows come from the vmapped
  per-example backward pass (biases, norm scales, embeddings, weight-tied or
  otherwise reused leaves), with the reason.

  Args:
    example_residual_fn: ``(params, example) -> scalar or (T,)``.
    params: the parameter pytree.
    batch: pytree of arrays with a leading example axis (only shapes are used).
    dense_leaves: as in :func:`scale_by_sven`.
    ghost: as in :func:`scale_by_sven`.

  Returns:
    ``{leaf path: path}`` in the params' leaf order.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import sven_leaf_paths
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "v": jnp.ones(4)}
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]
    >>> for leaf, path in sven_leaf_paths(fn, params, jnp.ones((8, 3))).items():
    ...   print(leaf, path)
    ['b'] per_example (used by add)
    ['v'] ghost
    ['w'] ghost
  """
  params_c = tree_upcast(params)
  _batch_size(batch)
  _example_out_size(example_residual_fn, params_c, batch)
  names = _leaf_names(params_c)
  flat = jax.tree.leaves(params_c)
  analysis = _analyse(_trace(example_residual_fn, params_c, batch), len(flat), ghost,
                      _declared_flags(dense_leaves, params_c, len(flat)), names)
  return {name: "ghost" if i in analysis.dense else f"per_example ({analysis.reasons[i]})"
          for i, name in enumerate(names)}
