r"""Low-rank subspace optimizers: one projection wrapper and three projectors.

:func:`subspace` runs any params-free optax transformation (``scale_by_adam``,
``scale_by_lion``, ...) on low-rank projections of the matrix leaves of the
gradient and maps its output back to the full space. *Where* the subspace
comes from is a :class:`Projector`, a NamedTuple of pure functions:

* :func:`dct_projector`: SVD-free. A fixed orthonormal DCT-II basis of the
  projected dimension; every refresh keeps the ``r`` basis vectors with the
  largest scores (column norms of the transformed gradient). The ONLY state is
  ``r`` sorted int32 indices per matrix (Modoranu et al., arXiv 2505.17967).
* :func:`online_pca_projector`: Online Subspace Descent. The basis is updated
  every step by one AdamW step on the online-PCA loss of the normalised
  gradient; never an SVD (Liang et al., arXiv 2408.12857).
* :func:`svd_projector`: GaLore-style top-``r`` singular vectors, recomputed
  every ``update_every`` steps by an SVD (the baseline; Zhao et al., arXiv
  2403.03507).

Conventions. A matrix leaf is viewed as ``(*batch, m, n)`` by
:mod:`optimizers.matrices` (default: the last two axes, leading axes are
stacked layers). One of the two dimensions is *projected* (reduced to the rank
``r``), the other is *kept*; internally every matrix is oriented as
``(*batch, k, d)`` with the projected dimension ``d`` last, so a basis is
``Q`` of shape ``(*batch, d, r)`` with orthonormal columns, the low-rank
gradient is ``G Q`` of shape ``(*batch, k, r)`` and the back-projection of a
low-rank update ``U`` is ``U Q^T``.

Sharding. Low-rank tensors (the inner optimizer's moments) keep the
parameter's sharding on the batch and kept axes and are replicated along the
rank axis; projector arrays (indices, bases) are sharded like the parameter's
batch axes and replicated otherwise. Under ``AxisType.Explicit`` mesh axes the
gradient is resharded so that the projected axis is unsharded before the
transforms (FFT, top-k and SVD need it whole), and the update is resharded back
to the gradient's sharding. :func:`subspace_partition_specs` returns the
PartitionSpecs of any optimizer state built on this module from the params'
PartitionSpecs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optimizers.linalg import frobenius_norm
from optimizers.matrices import (
    WeightDimensionNumbers,
    check_real_floating,
    concrete_hyperparameter,
    from_matrix,
    matrix_shape,
    resolve_matrix_dims,
    to_matrix,
)

__all__ = [
    "Projector",
    "SubspaceState",
    "DctProjectorState",
    "SvdProjectorState",
    "OnlinePcaProjectorState",
    "subspace",
    "dct_projector",
    "svd_projector",
    "online_pca_projector",
    "dct_adamw",
    "online_subspace_descent",
    "subspace_partition_specs",
    "dct_matrix",
    "dct_transform",
    "online_pca_loss",
    "online_pca_gradient",
]

_SIDES = ("smaller", "larger", "reduction", "output")
_ON_REFRESH = ("keep", "reset", "rotate")
_DCT_METHODS = ("auto", "matmul", "fft")
# Below this size of the projected dimension the explicit basis matmul beats
# jax.scipy.fft.dct (measured on CPU by bench/bench_subspace.py, see its JSON).
_DCT_FFT_MIN_SIZE = 512


# ---------------------------------------------------------------------------
# Sharding helpers (only act under AxisType.Explicit mesh axes).
# ---------------------------------------------------------------------------


def _named_sharding(x: Any) -> NamedSharding | None:
  sharding = x.sharding if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).sharding
  return sharding if isinstance(sharding, NamedSharding) else None


def _explicit_mesh(x: Any) -> Any:
  """The mesh of ``x``'s sharding if it has Explicit axes (the array's own type, so
  this works with or without a ``jax.set_mesh`` context), else None."""
  sharding = _named_sharding(x)
  if sharding is None or sharding.mesh.empty:
    return None
  return sharding.mesh if AxisType.Explicit in sharding.mesh.axis_types else None


def _padded(spec: Any, ndim: int) -> tuple:
  spec = tuple(spec) if spec is not None else ()
  return spec + (None,) * (ndim - len(spec))


def _spec_of(x: Any) -> tuple:
  """The (padded) PartitionSpec entries of an array, tracer or ShapeDtypeStruct."""
  sharding = _named_sharding(x)
  return _padded(None if sharding is None else sharding.spec, len(x.shape))


def _reshard(x: jax.Array, spec: tuple, mesh: Any) -> jax.Array:
  """Reshards ``x`` to ``spec`` on the Explicit ``mesh`` (no-op when ``mesh`` is None)."""
  if mesh is None:
    return x
  spec = _padded(spec, x.ndim)
  if _explicit_mesh(x) == mesh and _spec_of(x) == spec:
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, P(*spec)))


def _reshard_like(new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: _reshard(n, _spec_of(o), _explicit_mesh(o)), new, old)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b``; under Explicit axes, a contraction over an axis sharded in both
  operands is all-reduced into ``a``'s batch and row sharding and ``b``'s columns."""
  mesh = _explicit_mesh(a) or _explicit_mesh(b)
  sa, sb = _spec_of(a), _spec_of(b)
  if mesh is None or sa[-1] is None or sa[-1] != sb[-2]:
    return a @ b
  col = None if sb[-1] is not None and sb[-1] == sa[-2] else sb[-1]
  return jnp.matmul(a, b, out_sharding=NamedSharding(mesh, P(*sa[:-2], sa[-2], col)))


def _unshard_axes(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Reshards ``x`` (Explicit axes only) so that ``axes`` are not sharded."""
  spec = list(_spec_of(x))
  for a in axes:
    spec[a % x.ndim] = None
  return _reshard(x, tuple(spec), _explicit_mesh(x))


# ---------------------------------------------------------------------------
# DCT-II numerics.
# ---------------------------------------------------------------------------


def _dct_rows(freqs: jax.Array, d: int) -> jax.Array:
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
  return _dct_rows(jnp.arange(d), d)


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
  if method not in _DCT_METHODS:
    raise ValueError(f"method must be one of {_DCT_METHODS}, got {method!r}")
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  d = x.shape[-1]
  if _resolve_dct_method(method, d) == "fft":
    return jax.scipy.fft.dct(x, type=2, axis=-1, norm="ortho")
  return x @ dct_matrix(d).T


def online_pca_loss(basis: jax.Array, g: jax.Array) -> jax.Array:
  r"""Online-PCA loss ``||g Q Q^T - g||_F^2`` per matrix.

  Args:
    basis: ``Q``, shape ``(..., d, r)``.
    g: shape ``(..., k, d)`` (Online Subspace Descent passes the normalised
      gradient ``G / ||G||_F``).

  Returns:
    array of shape ``(...)``.
  """
  e = (g @ basis) @ jnp.swapaxes(basis, -1, -2) - g
  return jnp.sum(e * e, axis=(-2, -1))


def online_pca_gradient(basis: jax.Array, g: jax.Array) -> jax.Array:
  r"""Closed-form gradient of :func:`online_pca_loss` with respect to ``Q``.

  With ``B = g Q`` and ``C = g^T B``:
  ``dL/dQ = 2 (C Q^T Q - 2 C + Q B^T B)``. It vanishes when the columns of
  ``Q`` are orthonormal eigenvectors of ``g^T g``. Cost ``2 k d r`` multiply-adds
  plus ``O((k + d) r^2)``; no ``d x d`` or ``k x k`` matrix is formed.

  Args:
    basis: ``Q``, shape ``(..., d, r)``.
    g: shape ``(..., k, d)``.

  Returns:
    array of the shape of ``basis``.
  """
  return _pca_gradient(basis, g, g @ basis)


def _pca_gradient(basis: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
  """:func:`online_pca_gradient` given ``b = g @ basis``."""
  c = _matmul(_mT(g), b)
  return 2.0 * (c @ (_mT(basis) @ basis) - 2.0 * c + basis @ _matmul(_mT(b), b))


# ---------------------------------------------------------------------------
# The projector interface.
# ---------------------------------------------------------------------------


class Projector(NamedTuple):
  """A projection policy: pure functions on oriented matrices ``(*batch, k, d)``.

  ``d`` (last axis) is the projected dimension and ``r <= d`` the rank. The
  per-matrix state is a NamedTuple of arrays whose leading axes are ``batch``.

  Attributes:
    rank: the requested rank (clamped to ``min(m, n)`` per matrix by
      :func:`subspace`).
    update_every: refresh period ``T`` (a Python int, or an integer array under
      ``optax.inject_hyperparams``); :func:`subspace` calls ``refresh`` when
      ``count % T == 0`` (under ``lax.cond``) and ``project`` otherwise.
    init: ``(batch_shape, k, d, r) -> state``.
    refresh: ``(g, state, count) -> (g_low, used, next)``: from the gradient
      ``g`` (float32), the state ``used`` that projects ``g`` (``g_low``) and
      back-projects this step's update, and the state ``next`` stored for the
      following steps. Selection-type projectors (DCT, SVD) pick the new
      subspace first: ``used`` is ``next``. A *lagged* projector (online PCA)
      projects on its current basis and then moves it: ``used`` is the old
      state.
    project: ``(g, state) -> g_low`` of shape ``(*batch, k, r)``.
    back_project: ``(u, state, d) -> u_full`` of shape ``(*batch, k, d)``.
    change_of_basis: ``(old_state, new_state) -> R = Q_old^T Q_new``, shape
      ``(*batch, r, r)`` (used by ``on_refresh="rotate"``).
    lagged: whether ``next`` differs from ``used``; the moments are then rotated
      after the inner update (from ``used`` to ``next``) instead of before it
      (from the old state to ``used``).
  """

  rank: int
  update_every: int
  init: Callable[..., Any]
  refresh: Callable[..., Any]
  project: Callable[..., jax.Array]
  back_project: Callable[..., jax.Array]
  change_of_basis: Callable[..., jax.Array]
  lagged: bool = False


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_period(name: str, value: Any) -> None:
  """A period is a Python int >= 1 or an integer array (``optax.inject_hyperparams``)."""
  array = isinstance(value, (jax.Array, jax.ShapeDtypeStruct))
  if array and jnp.issubdtype(value.dtype, jnp.integer):
    return
  _check_int(name, value)


def _check_nonnegative(name: str, value: Any) -> None:
  concrete = concrete_hyperparameter(value, name)
  if concrete is not None and not np.all((concrete >= 0) & np.isfinite(concrete)):
    raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _top_columns(t: jax.Array, r: int, score: str) -> jax.Array:
  """Sorted int32 indices of the ``r`` columns of ``t`` with the largest scores.

  ``t`` is divided by its largest magnitude per matrix first: the ranking is the
  same, and ``t * t`` neither underflows to 0 (``|t| ~ 1e-20``, which left every
  score 0 and the choice arbitrary) nor overflows (``|t| ~ 1e20``) in float32.
  """
  amax = jnp.max(jnp.abs(t), axis=(-2, -1), keepdims=True)
  t = t / jnp.where(amax > 0, amax, jnp.ones_like(amax))
  scores = jnp.sum(t * t if score == "l2" else jnp.abs(t), axis=-2)
  _, idx = jax.lax.top_k(scores, r)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# DCT projector.
# ---------------------------------------------------------------------------


class DctProjectorState(NamedTuple):
  """Per matrix: the kept DCT frequencies, sorted ascending, int32 ``(*batch, r)``."""

  indices: jax.Array


def dct_projector(
    rank: int, *, update_every: int = 1, score: str = "l2", method: str = "auto"
) -> Projector:
  r"""SVD-free low-rank projector on a fixed orthonormal DCT-II basis.

  With ``C`` the DCT-II matrix of the projected dimension ``d`` (rows are
  frequencies, ``Q = C^T``), a refresh computes ``T = G C^T`` (the DCT of each
  row of ``G``), scores every frequency by the norm of its column of ``T`` and
  keeps the ``r`` best, sorted:

  ``l2``: ``s_f = sum_i T_if^2``; keeping the top-``r`` is the optimal subset of
  the basis, with relative error ``||G - G Q_S Q_S^T||^2 / ||G||^2 = 1 - sum_S s_f
  / sum_f s_f``. ``l1``: ``s_f = sum_i |T_if|`` (the reference's choice).

  The low-rank gradient is ``T[:, S]`` (no second product), the back-projection
  ``U C[S, :]`` with the ``r`` rows built from the indices (``k r d``
  multiply-adds). On steps without a refresh the projection is ``G C[S, :]^T``.
  The basis is never stored: ``T`` comes from an explicit basis matmul or an
  FFT (:func:`dct_transform`, chosen per size). No SVD, eigh or QR is used; the
  change of basis between two index sets is a partial permutation.

  Args:
    rank: number of kept frequencies ``r`` per matrix (a Python int >= 1).
    update_every: refresh period ``T`` (reference default 1: every step, since a
      refresh is one transform plus a top-k).
    score: ``"l2"`` (optimal subset) or ``"l1"``.
    method: how the DCT is applied: ``"auto"``, ``"matmul"`` or ``"fft"``.

  Returns:
    A :class:`Projector` whose only state is ``r`` int32 indices per matrix.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optimizers import subspace, dct_projector
    >>> tx = subspace(optax.scale_by_adam(), dct_projector(4))
    >>> state = tx.init({"w": jnp.ones((16, 32))})
    >>> state.projector_state.indices["w"].dtype, state.projector_state.indices["w"].shape
    (dtype('int32'), (4,))

  References:
    Modoranu et al., "SVD-free low-rank adaptive gradient optimization for
    large language models", https://arxiv.org/abs/2505.17967
  """
  _check_int("rank", rank)
  _check_period("update_every", update_every)
  if score not in ("l1", "l2"):
    raise ValueError(f"score must be 'l1' or 'l2', got {score!r}")
  if method not in _DCT_METHODS:
    raise ValueError(f"method must be one of {_DCT_METHODS}, got {method!r}")

  def init(batch_shape, k, d, r):
    del k, d
    return DctProjectorState(jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (*batch_shape, r)))

  def refresh(g, state, count):
    del count
    r = state.indices.shape[-1]
    t = dct_transform(g, method=method)
    idx = _top_columns(t, r, score)
    low = jnp.take_along_axis(t, idx[..., None, :], axis=-1)
    new = DctProjectorState(idx)
    return low, new, new

  def project(g, state):
    return g @ _mT(_dct_rows(state.indices, g.shape[-1]))

  def back_project(u, state, d):
    return u @ _dct_rows(state.indices, d)

  def change_of_basis(old, new):
    return (old.indices[..., :, None] == new.indices[..., None, :]).astype(jnp.float32)

  return Projector(rank, update_every, init, refresh, project, back_project, change_of_basis)


# ---------------------------------------------------------------------------
# SVD projector (GaLore baseline).
# ---------------------------------------------------------------------------


class SvdProjectorState(NamedTuple):
  """Per matrix: the top-``r`` right singular vectors, float32 ``(*batch, d, r)``."""

  basis: jax.Array


def svd_projector(rank: int, *, update_every: int = 200) -> Projector:
  r"""GaLore-style projector: the top-``r`` singular vectors of the gradient.

  Every ``update_every`` steps ``G = U S V^T`` (float32 SVD) and ``Q = V[:, :r]``
  (the projected dimension's singular vectors); in between ``Q`` is kept.
  ``g = G Q``, back-projection ``u Q^T``. The baseline for :func:`dct_projector`
  and :func:`online_pca_projector` inside the same wrapper.

  Args:
    rank: rank ``r`` (a Python int >= 1).
    update_every: SVD period ``T`` (GaLore's default 200).

  Returns:
    A :class:`Projector` storing ``d r`` float32 values per matrix.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optimizers import subspace, svd_projector
    >>> tx = subspace(optax.scale_by_adam(), svd_projector(4))
    >>> tx.init({"w": jnp.ones((16, 32))}).projector_state.basis["w"].shape
    (16, 4)

  References:
    Zhao et al., "GaLore: Memory-efficient LLM training by gradient low-rank
    projection", https://arxiv.org/abs/2403.03507
  """
  _check_int("rank", rank)
  _check_period("update_every", update_every)

  def init(batch_shape, k, d, r):
    del k
    return SvdProjectorState(jnp.zeros((*batch_shape, d, r), jnp.float32))

  def refresh(g, state, count):
    del count
    r = state.basis.shape[-1]
    _, _, vh = jnp.linalg.svd(_unshard_axes(g, (-2, -1)), full_matrices=False)
    new = SvdProjectorState(_reshard_like(_mT(vh[..., :r, :]), state.basis))
    return g @ new.basis, new, new

  def project(g, state):
    return g @ state.basis

  def back_project(u, state, d):
    del d
    return u @ _mT(state.basis)

  def change_of_basis(old, new):
    return _mT(old.basis) @ new.basis

  return Projector(rank, update_every, init, refresh, project, back_project, change_of_basis)


# ---------------------------------------------------------------------------
# Online PCA projector (Online Subspace Descent).
# ---------------------------------------------------------------------------


class OnlinePcaProjectorState(NamedTuple):
  """Per matrix: the basis ``Q`` and its AdamW moments, float32 ``(*batch, d, r)``."""

  basis: jax.Array
  mu: jax.Array
  nu: jax.Array


def online_pca_projector(
    rank: int,
    *,
    learning_rate: float | jax.Array = 0.005,
    weight_decay: float | jax.Array = 0.01,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    update_every: int = 1,
    schedule: optax.Schedule | None = None,
    schedule_reference: float | jax.Array | None = None,
) -> Projector:
  r"""Online Subspace Descent projector: one AdamW step on the online-PCA loss per step.

  At step ``t`` the gradient is projected on the current basis ``Q_t`` (``d x r``)
  and the low-rank update is back-projected on ``Q_t``; then, with
  ``Gn = G / ||G||_F``, ``Q`` takes one AdamW step (``optax.scale_by_adam`` then
  ``optax.add_decayed_weights``) on ``L(Q) = ||Gn Q Q^T - Gn||_F^2``, giving
  ``Q_{t+1}`` (the reference code's order). The closed-form gradient
  (:func:`online_pca_gradient`) reuses ``G Q_t`` from the projection, so a step
  costs three ``k d r`` products (projection, ``Gn^T (Gn Q)``, back-projection)
  plus ``O((k + d) r^2)``; no SVD, eigh or QR. ``Q`` is never
  re-orthonormalised: the loss keeps it near the top-``r`` principal subspace.

  * Learning rate: ``lr_Q(t) = learning_rate * schedule(t) / schedule_reference``
    when the weights' ``schedule`` is given (``schedule_reference`` defaults to
    ``schedule(0)``; pass the peak value for a warm-up from zero), else
    ``learning_rate``. The reference sets ``lr_Q = (1 / T_galore) * lr_t / lr_0``
    with ``T_galore = 200``, hence the default ``0.005``.
  * Zero-gradient guard: when ``||G||_F`` is zero or not finite the step is
    skipped (``Q`` and its moments are kept), so ``Q`` never decays to zero on
    a frozen layer and a NaN gradient does not poison it (the NaN still reaches
    the update through the projection). ``||G||_F`` is computed overflow- and
    underflow-safe, so a finite ``G`` of any magnitude takes the same step.
  * Initialisation without an SVD: ``init`` stores the ``r`` lowest-frequency
    DCT-II vectors (orthonormal); at step 0 ``Q`` is replaced by the ``r`` DCT
    vectors with the largest ``l2`` scores for the first gradient (the optimal
    DCT subset, see :func:`dct_projector`) before that gradient is projected:
    the SVD-free analogue of the reference's SVD of the first gradient. PCA
    steps start at step ``update_every``.

  Args:
    rank: rank ``r`` (a Python int >= 1).
    learning_rate: AdamW learning rate of ``Q``.
    weight_decay: AdamW decoupled weight decay of ``Q`` (reference: 0.01).
    b1: Adam ``beta1`` of ``Q``.
    b2: Adam ``beta2`` of ``Q``.
    eps: Adam ``eps`` of ``Q``.
    update_every: take a PCA step every ``T`` steps (reference: every step).
    schedule: the weights' learning-rate schedule (``count -> lr``) or None.
    schedule_reference: the schedule value that maps to ``learning_rate``.

  Returns:
    A :class:`Projector` storing ``3 d r`` float32 values per matrix (``Q`` and
    its two AdamW moments).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optimizers import subspace, online_pca_projector
    >>> tx = subspace(optax.scale_by_adam(), online_pca_projector(4))
    >>> tx.init({"w": jnp.ones((16, 32))}).projector_state.basis["w"].shape
    (16, 4)

  References:
    Liang et al., "Memory-efficient LLM training with online subspace descent",
    NeurIPS 2024, https://arxiv.org/abs/2408.12857
  """
  _check_int("rank", rank)
  _check_period("update_every", update_every)
  _check_nonnegative("learning_rate", learning_rate)
  _check_nonnegative("weight_decay", weight_decay)
  if schedule is not None and not callable(schedule):
    raise ValueError(f"schedule must be a callable count -> learning rate, got {schedule!r}")
  if schedule is not None and schedule_reference is None:
    first = schedule(0)
    if isinstance(first, jax.core.Tracer):
      raise ValueError(
          "schedule(0) is traced (the schedule closes over traced values), so a warm-up from "
          "zero cannot be ruled out: pass schedule_reference (e.g. the peak learning rate)."
      )
    if float(first) == 0.0:
      raise ValueError(
          "schedule(0) is 0 (a warm-up from zero), so the ratio schedule(t) / schedule(0) is "
          "undefined: pass schedule_reference (e.g. the peak learning rate)."
      )
  if isinstance(schedule_reference, (int, float)) and not schedule_reference > 0:
    raise ValueError(f"schedule_reference must be > 0, got {schedule_reference!r}")
  basis_optimizer = optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.add_decayed_weights(weight_decay)
  )

  def step_size(count):
    if schedule is None:
      return learning_rate
    reference = schedule(0) if schedule_reference is None else schedule_reference
    return learning_rate * schedule(count) / reference

  def init(batch_shape, k, d, r):
    del k
    basis = _mT(_dct_rows(jnp.broadcast_to(jnp.arange(r), (*batch_shape, r)), d))
    return OnlinePcaProjectorState(basis, jnp.zeros_like(basis), jnp.zeros_like(basis))

  def first_basis(g, state):
    r = state.basis.shape[-1]
    idx = _top_columns(dct_transform(g), r, "l2")
    return state._replace(basis=_reshard_like(_mT(_dct_rows(idx, g.shape[-1])), state.basis))

  def pca_step(g, state, count):
    norm = frobenius_norm(g)  # safe for |G| ~ 1e-30 and ~ 1e30 (sum G^2 would under/overflow)
    ok = jnp.isfinite(norm) & (norm > 0)
    safe_norm = jnp.where(ok, norm, 1.0)
    gn = g / safe_norm
    b = gn @ state.basis
    grad = _pca_gradient(state.basis, gn, b)
    steps_before = count // update_every - 1  # PCA steps already taken
    adam_state = optax.ScaleByAdamState(steps_before.astype(jnp.int32), state.mu, state.nu)
    direction, (adam_state, _) = basis_optimizer.update(
        grad, (adam_state, optax.EmptyState()), state.basis
    )
    new = OnlinePcaProjectorState(
        state.basis - step_size(count) * direction, adam_state.mu, adam_state.nu
    )
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b).astype(b.dtype), new, state)
    return safe_norm * b, state, _reshard_like(new, state)

  def first_step(g, state):
    new = first_basis(g, state)
    return g @ new.basis, new, new

  def refresh(g, state, count):
    return jax.lax.cond(
        count == 0, lambda: first_step(g, state), lambda: pca_step(g, state, count)
    )

  def project(g, state):
    return g @ state.basis

  def back_project(u, state, d):
    del d
    return u @ _mT(state.basis)

  def change_of_basis(old, new):
    return _mT(old.basis) @ new.basis

  return Projector(rank, update_every, init, refresh, project, back_project, change_of_basis,
                   lagged=True)


# ---------------------------------------------------------------------------
# The wrapper.
# ---------------------------------------------------------------------------


class SubspaceState(NamedTuple):
  """State of :func:`subspace`.

  Attributes:
    count: number of updates so far, int32 scalar.
    inner_state: the inner transformation's state, built on the low-rank tree
      (matrix leaves ``(*batch, k, r)``, other leaves full size).
    projector_state: the projector's per-matrix state NamedTuple; each field is
      a tree with the params' structure (a dummy int32/float32 scalar for
      leaves that are not projected).
  """

  count: jax.Array
  inner_state: optax.OptState
  projector_state: Any


class _Plan(NamedTuple):
  dims: Any
  project_m: bool  # True: the reduction dimension m is projected
  batch_shape: tuple[int, ...]
  k: int
  d: int
  r: int


def _plans(tree: Any, weight_dimension_numbers: WeightDimensionNumbers, rank: int, side: str):
  leaves, treedef = jax.tree.flatten(tree)
  dims = treedef.flatten_up_to(resolve_matrix_dims(weight_dimension_numbers, tree))
  plans = []
  for x, d in zip(leaves, dims, strict=True):
    if d is None or math.prod(x.shape) == 0:  # a zero-size leaf has nothing to project
      plans.append(None)
      continue
    batch, m, n = matrix_shape(x.shape, d)
    project_m = {"smaller": m < n, "larger": m > n, "reduction": True, "output": False}[side]
    k, dd = (n, m) if project_m else (m, n)
    plans.append(_Plan(d, project_m, batch, k, dd, min(rank, m, n)))
  return leaves, treedef, plans


def _oriented(x: jax.Array, plan: _Plan) -> jax.Array:
  v = to_matrix(x, plan.dims)
  return _mT(v) if plan.project_m else v


def _from_oriented(y: jax.Array, plan: _Plan, shape: tuple[int, ...]) -> jax.Array:
  return from_matrix(_mT(y) if plan.project_m else y, plan.dims, shape)


def _low_spec(oriented_spec: tuple) -> tuple:
  return oriented_spec[:-1] + (None,)


def _is_second_moment(path) -> bool:
  return any(isinstance(k, jax.tree_util.GetAttrKey) and k.name == "nu" for k in path)


def _transform_moments(inner, inner_state, treedef, plans, mode: str, rotations):
  """Resets or rotates the rank-shaped leaves of the inner state (see :func:`subspace`)."""
  index_tree = treedef.unflatten(list(range(len(plans))))
  owner = optax.tree_map_params(
      inner, lambda _, i: i, inner_state, index_tree, transform_non_params=lambda _: -1
  )

  def apply(path, x, i):
    plan = plans[i] if i >= 0 else None
    if plan is None or x.shape != (*plan.batch_shape, plan.k, plan.r):
      return x
    if mode == "reset":
      return jnp.zeros_like(x)
    rot = rotations[i]
    if _is_second_moment(path):
      rot = rot * rot
    return _reshard_like((x.astype(jnp.float32) @ rot).astype(x.dtype), x)

  return jax.tree_util.tree_map_with_path(apply, inner_state, owner)


def subspace(
    inner: optax.GradientTransformation,
    projector: Projector,
    *,
    scale: float | jax.Array = 1.0,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    on_refresh: str = "keep",
    side: str = "smaller",
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on low-rank projections of the matrix leaves.

  For every matrix leaf ``G`` (viewed as ``(*batch, m, n)``, see
  :mod:`optimizers.matrices`) with projected dimension ``d`` and basis ``Q``
  (``d x r``, from ``projector``):

  ``g = G Q``  (``k x r``),  ``u = inner(g)``,  ``update = scale * u Q^T``.

  Leaves that are not matrices (dims ``None``: ndim < 2 by default) go through
  ``inner`` at full rank and are not scaled. The subspace is refreshed by
  ``projector.refresh`` when ``count % projector.update_every == 0``
  (``lax.cond``; statically every step when ``update_every == 1``), including
  the first step.

  Which dimension is projected (``side``) and the memory it costs, for an
  ``m x n`` matrix with kept dimension ``k`` and rank ``r``:

  ======================== =============================== ===========================
  ``side``                 projected ``d``                 inner Adam state
  ======================== =============================== ===========================
  ``"smaller"`` (default)  ``min(m, n)`` (ties: ``n``)     ``2 max(m, n) r``
  ``"larger"``             ``max(m, n)`` (ties: ``n``)     ``2 min(m, n) r``
  ``"reduction"``          ``m``                           ``2 n r``
  ``"output"``             ``n``                           ``2 m r``
  ======================== =============================== ===========================

  plus the projector's state: :func:`dct_projector` ``r`` int32,
  :func:`svd_projector` ``d r`` float32, :func:`online_pca_projector`
  ``3 d r`` float32. The default projects the smaller dimension (the
  references' choice: the basis is the small one); with the DCT projector, whose
  state is only ``r`` integers, ``side="larger"`` gives the leanest state at the
  price of a size-``max(m, n)`` transform. ``optax.contrib.galore`` projects the
  larger dimension.

  The rank is clamped to ``min(m, n)`` per matrix (at ``r = min(m, n)`` the
  projection onto the smaller side is a full orthonormal change of basis).
  Leaves with a zero-size axis go to ``inner`` unprojected, an empty tree goes
  to ``inner`` as is, and integer or complex leaves raise ``TypeError``.

  On a refresh (``on_refresh``), the inner state's rank-shaped leaves (the
  moments of projected leaves; other leaves and counters are untouched) are:

  * ``"keep"``: left as they are (GaLore; Online Subspace Descent);
  * ``"reset"``: set to zero (counters such as Adam's ``count`` are not reset,
    so bias correction continues);
  * ``"rotate"``: mapped to the new basis by ``R = Q_old^T Q_new``
    (``r x r``): ``M -> M R``; leaves under a field named ``nu`` (optax's
    second moments) by ``R * R`` elementwise, which keeps them non-negative.
    For the DCT projector ``R`` is a partial permutation and both maps are
    exact: kept frequencies move with their moments, new ones start at zero.
    For a lagged projector (online PCA) the moments are rotated after the
    inner update, from the basis just used to the next one.

  Args:
    inner: a transformation that needs no params (``scale_by_adam``,
      ``scale_by_lion``, ``scale_by_rms``...). It receives neither params nor
      extra args.
    projector: a :class:`Projector` (``dct_projector``, ``svd_projector``,
      ``online_pca_projector``).
    scale: factor on the back-projected updates of matrix leaves (GaLore's
      ``alpha``), finite and ``> 0``.
    weight_dimension_numbers: which axes form the matrices (``None``: the last
      two axes of every leaf with ndim >= 2; a ``MatrixDims`` or optax
      Muon/GaLore dimension numbers for all such leaves; a pytree of those and
      ``None``; or a callable ``params -> pytree``). Stacked layers are batch
      axes, wherever they sit (e.g. ``MatrixDims(0, 2)`` for ``[m, L, n]``).
    on_refresh: ``"keep"``, ``"reset"`` or ``"rotate"``.
    side: ``"smaller"``, ``"larger"``, ``"reduction"`` or ``"output"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; updates have the gradient's
    sign, dtype and sharding; matrix math runs in float32.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optimizers import subspace, dct_projector
    >>> tx = subspace(optax.scale_by_adam(), dct_projector(2), scale=0.25)
    >>> params = {"w": jnp.ones((4, 6)), "b": jnp.zeros(6)}
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    >>> updates, state = tx.update(grads, state)
    >>> jax.tree.map(jnp.shape, updates)
    {'b': (6,), 'w': (4, 6)}

  References:
    Zhao et al., GaLore, https://arxiv.org/abs/2403.03507;
    Modoranu et al., https://arxiv.org/abs/2505.17967;
    Liang et al., Online Subspace Descent, https://arxiv.org/abs/2408.12857
  """
  if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
    raise TypeError(f"inner must be an optax GradientTransformation, got {inner!r}")
  if not isinstance(projector, Projector):
    raise ValueError(f"projector must be a Projector, got {type(projector).__name__}")
  value = concrete_hyperparameter(scale, "scale")
  if value is not None and not np.all((value > 0) & np.isfinite(value)):
    raise ValueError(f"scale must be finite and > 0, got scale={scale!r}")
  if on_refresh not in _ON_REFRESH:
    raise ValueError(f"on_refresh must be one of {_ON_REFRESH}, got {on_refresh!r}")
  if side not in _SIDES:
    raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
  inner = optax.with_extra_args_support(inner)
  rank, every = projector.rank, projector.update_every

  def dummy_state():
    template = jax.eval_shape(lambda: projector.init((), 1, 1, 1))
    return jax.tree.map(lambda t: jnp.zeros((), t.dtype), template)

  def transpose_states(per_leaf, treedef):
    return type(per_leaf[0])(*(treedef.unflatten(list(f)) for f in zip(*per_leaf, strict=True)))

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    if not jax.tree.leaves(params):  # e.g. optax.tree_map_params' placeholder
      return SubspaceState(count, inner.init(params), jax.tree.map(lambda _: params, dummy_state()))
    leaves, treedef, plans = _plans(params, weight_dimension_numbers, rank, side)
    lows, pstates = [], []
    for x, plan in zip(leaves, plans, strict=True):
      if plan is None:
        lows.append(x)
        pstates.append(dummy_state())
        continue
      low = jnp.zeros((*plan.batch_shape, plan.k, plan.r), x.dtype)
      pstate = projector.init(plan.batch_shape, plan.k, plan.d, plan.r)
      mesh = _explicit_mesh(x)
      if mesh is not None:
        spec = _spec_of(jax.eval_shape(lambda x, plan=plan: _oriented(x, plan), x))
        low = _reshard(low, _low_spec(spec), mesh)
        nb = len(plan.batch_shape)
        pstate = jax.tree.map(lambda a, nb=nb, spec=spec, mesh=mesh: _reshard(
            a, spec[:nb], mesh), pstate)
      lows.append(low)
      pstates.append(pstate)
    return SubspaceState(
        count, inner.init(treedef.unflatten(lows)), transpose_states(pstates, treedef)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    check_real_floating(updates, owner="subspace")
    count = state.count
    if not jax.tree.leaves(updates):  # an empty tree: nothing to project
      inner_updates, inner_state = inner.update(updates, state.inner_state, None)
      return inner_updates, state._replace(
          count=optax.safe_int32_increment(count), inner_state=inner_state)
    leaves, treedef, plans = _plans(updates, weight_dimension_numbers, rank, side)
    fields = [treedef.flatten_up_to(f) for f in state.projector_state]
    pstates = [type(state.projector_state)(*f) for f in zip(*fields, strict=True)]
    matrix = [i for i, plan in enumerate(plans) if plan is not None]
    gs = {}
    for i in matrix:
      g = _oriented(leaves[i], plans[i]).astype(jnp.promote_types(leaves[i].dtype, jnp.float32))
      gs[i] = _unshard_axes(g, (-1,))

    static_every_step = isinstance(every, int) and every == 1
    refresh_due = count % every == 0

    def refreshed(inner_state):
      lows, used, nxt = {}, {}, {}
      for i in matrix:
        lows[i], used[i], nxt[i] = projector.refresh(gs[i], pstates[i], count)
        used[i] = _reshard_like(used[i], pstates[i])
        nxt[i] = _reshard_like(nxt[i], pstates[i])
      if on_refresh == "reset":
        inner_state = _transform_moments(inner, inner_state, treedef, plans, "reset", {})
      elif on_refresh == "rotate" and not projector.lagged:
        rotations = {i: projector.change_of_basis(pstates[i], used[i]) for i in matrix}
        inner_state = _transform_moments(inner, inner_state, treedef, plans, "rotate", rotations)
      return lows, used, nxt, inner_state

    def kept(inner_state):
      same = {i: pstates[i] for i in matrix}
      return {i: projector.project(gs[i], pstates[i]) for i in matrix}, same, same, inner_state

    if static_every_step:
      lows, used, nxt, inner_state = refreshed(state.inner_state)
    else:
      lows, used, nxt, inner_state = jax.lax.cond(refresh_due, refreshed, kept, state.inner_state)

    low_leaves = list(leaves)
    for i in matrix:
      low = lows[i].astype(leaves[i].dtype)
      low_leaves[i] = _reshard(low, _low_spec(_spec_of(gs[i])), _explicit_mesh(gs[i]))
    inner_updates, inner_state = inner.update(treedef.unflatten(low_leaves), inner_state, None)
    if on_refresh == "rotate" and projector.lagged:
      def rotate_to_next(inner_state):
        rotations = {i: projector.change_of_basis(used[i], nxt[i]) for i in matrix}
        return _transform_moments(inner, inner_state, treedef, plans, "rotate", rotations)

      if static_every_step:
        inner_state = rotate_to_next(inner_state)
      else:
        inner_state = jax.lax.cond(refresh_due, rotate_to_next, lambda s: s, inner_state)

    out = treedef.flatten_up_to(inner_updates)
    for i in matrix:
      u = out[i].astype(gs[i].dtype)
      full = scale * projector.back_project(u, used[i], plans[i].d)
      full = _from_oriented(full, plans[i], leaves[i].shape).astype(leaves[i].dtype)
      out[i] = _reshard_like(full, leaves[i])
      pstates[i] = nxt[i]
    projector_state = transpose_states(pstates, treedef)
    new_state = SubspaceState(optax.safe_int32_increment(count), inner_state, projector_state)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Full optimizers.
# ---------------------------------------------------------------------------


def dct_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: float | jax.Array = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    scale: float | jax.Array = 1.0,
    update_every: int = 1,
    score: str = "l2",
    on_refresh: str = "rotate",
    side: str = "smaller",
    method: str = "auto",
    weight_dimension_numbers: WeightDimensionNumbers = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with its moments in a DCT subspace of every matrix (SVD-free).

  ``u = subspace(scale_by_adam, dct_projector)(G)``; update
  ``-lr (u + weight_decay * W)``: the decoupled weight decay acts in the full
  space and is never projected. Non-matrix leaves get plain AdamW.

  Args:
    learning_rate: scalar or schedule.
    rank: kept DCT frequencies per matrix (clamped to ``min(m, n)``).
    b1: Adam ``beta1``.
    b2: Adam ``beta2``.
    eps: Adam ``eps``.
    weight_decay: decoupled weight decay.
    mask: weight-decay mask (as ``optax.adamw``).
    scale: factor on the back-projected matrix updates.
    update_every: refresh period of the selection (default: every step).
    score: ``"l2"`` or ``"l1"`` (see :func:`dct_projector`).
    on_refresh: ``"rotate"`` (default: the moments follow their frequencies,
      exactly), ``"keep"`` or ``"reset"`` (see :func:`subspace`).
    side: projected dimension (see :func:`subspace`).
    method: DCT application, ``"auto"``, ``"matmul"`` or ``"fft"``.
    weight_dimension_numbers: matrix view (see :func:`subspace`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` returning ``-lr * direction``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optimizers import dct_adamw
    >>> params = {"w": jnp.ones((8, 16))}
    >>> opt = dct_adamw(1e-2, rank=4)
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((8, 16))}, state, params)
    >>> updates["w"].shape
    (8, 16)

  References:
    Modoranu et al., https://arxiv.org/abs/2505.17967;
    Loshchilov & Hutter, AdamW, https://arxiv.org/abs/1711.05101
  """
  projector = dct_projector(rank, update_every=update_every, score=score, method=method)
  return _projected_adamw(
      projector, learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask,
      scale=scale, weight_dimension_numbers=weight_dimension_numbers, on_refresh=on_refresh,
      side=side,
  )


def _projected_adamw(projector, learning_rate, *, b1, b2, eps, weight_decay, mask, scale,
                     weight_dimension_numbers, on_refresh, side):
  """AdamW whose matrix moments live in ``projector``'s subspace (dct_adamw, OSD)."""
  return optax.chain(
      subspace(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps), projector, scale=scale,
          weight_dimension_numbers=weight_dimension_numbers, on_refresh=on_refresh, side=side,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def online_subspace_descent(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: float | jax.Array = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    scale: float | jax.Array = 0.25,
    projector_learning_rate: float | jax.Array = 0.005,
    projector_weight_decay: float | jax.Array = 0.01,
    update_every: int = 1,
    on_refresh: str = "keep",
    side: str = "smaller",
    weight_dimension_numbers: WeightDimensionNumbers = None,
    schedule_reference: float | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Online Subspace Descent: Adam in a subspace tracked by online PCA.

  ``u = subspace(scale_by_adam, online_pca_projector)(G)``; update
  ``-lr (u + weight_decay * W)`` (decoupled weight decay in the full space).
  The projector's learning rate follows the weights' schedule ratio
  ``lr_t / lr_0`` when ``learning_rate`` is a schedule (``lr_t / schedule_reference``
  when given; required for a warm-up from zero, where ``lr_0 = 0``). The weights' Adam
  moments live in the ``r``-dimensional space and are kept across the
  (every-step) basis updates.

  Args:
    learning_rate: scalar or schedule.
    rank: rank per matrix (clamped to ``min(m, n)``).
    b1: Adam ``beta1`` of the weights.
    b2: Adam ``beta2`` of the weights.
    eps: Adam ``eps`` of the weights.
    weight_decay: decoupled weight decay of the weights.
    mask: weight-decay mask.
    scale: factor on the back-projected matrix updates (reference: 0.25).
    projector_learning_rate: AdamW learning rate of the bases.
    projector_weight_decay: AdamW weight decay of the bases (reference: 0.01).
    update_every: PCA step period (reference: 1).
    on_refresh: see :func:`subspace` (reference: ``"keep"``).
    side: projected dimension (see :func:`subspace`).
    weight_dimension_numbers: matrix view (see :func:`subspace`).
    schedule_reference: the schedule value at which the projector's learning
      rate equals ``projector_learning_rate`` (default ``learning_rate(0)``;
      pass the peak for a schedule that starts at 0).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` returning ``-lr * direction``.

  Raises:
    ValueError: ``learning_rate`` is a schedule with ``learning_rate(0) == 0``
      and no ``schedule_reference``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optimizers import online_subspace_descent
    >>> params = {"w": jnp.ones((8, 16))}
    >>> opt = online_subspace_descent(1e-2, rank=4)
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((8, 16))}, state, params)
    >>> updates["w"].shape
    (8, 16)

  References:
    Liang et al., "Memory-efficient LLM training with online subspace descent",
    https://arxiv.org/abs/2408.12857
  """
  projector = online_pca_projector(
      rank, learning_rate=projector_learning_rate, weight_decay=projector_weight_decay,
      update_every=update_every, schedule=learning_rate if callable(learning_rate) else None,
      schedule_reference=schedule_reference,
  )
  return _projected_adamw(
      projector, learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask,
      scale=scale, weight_dimension_numbers=weight_dimension_numbers, on_refresh=on_refresh,
      side=side,
  )


# ---------------------------------------------------------------------------
# Sharding helper.
# ---------------------------------------------------------------------------


def _mesh_axis_names(specs: Any) -> tuple[str, ...]:
  names: list[str] = []
  for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)):
    if not isinstance(spec, P):
      continue
    for entry in spec:
      for name in (entry,) if isinstance(entry, str) else (entry or ()):
        if name not in names:
          names.append(name)
  return tuple(names)


def subspace_partition_specs(
    optimizer: optax.GradientTransformation, params: Any, param_specs: Any
) -> Any:
  r"""PartitionSpecs of ``optimizer.init(params)`` from the params' PartitionSpecs.

  Works for any optimizer built from this module (and from optax pieces that
  create their state with ``zeros_like(params)``): the state is traced with
  ``jax.eval_shape`` on params carrying ``param_specs`` over an abstract mesh
  with ``AxisType.Explicit`` axes, where :func:`subspace` places every state
  leaf (rank-shaped moments: the parameter's batch and kept axes, rank axis
  replicated; indices and bases: the parameter's batch axes, the rest
  replicated; counters replicated). Use the result with
  ``NamedSharding(mesh, spec)`` to place the state, e.g. for a pretraining
  script; the jitted update keeps these shardings.

  Args:
    optimizer: the optimizer (a chain containing :func:`subspace` or not).
    params: the params (arrays or ``jax.ShapeDtypeStruct``; only shapes and
      dtypes are read).
    param_specs: a tree like ``params`` of ``PartitionSpec`` (or ``None`` for
      replicated).

  Returns:
    A tree like ``optimizer.init(params)`` with a ``PartitionSpec`` per leaf.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from optimizers import dct_adamw, subspace_partition_specs
    >>> params = {"w": jnp.zeros((16, 64))}
    >>> specs = subspace_partition_specs(dct_adamw(1e-3, 4), params, {"w": P(None, "model")})
    >>> specs[0].inner_state.mu["w"], specs[0].projector_state.indices["w"]
    (P('model', None), P(None,))
  """
  is_spec = lambda s: s is None or isinstance(s, P)
  names = _mesh_axis_names(param_specs)
  mesh = jax.sharding.AbstractMesh(
      (1,) * len(names), names, axis_types=(AxisType.Explicit,) * len(names)
  )
  abstract = jax.tree.map(
      lambda s, p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(mesh, s or P())),
      param_specs, params, is_leaf=is_spec,
  )
  with jax.sharding.use_abstract_mesh(mesh):
    state = jax.eval_shape(optimizer.init, abstract)
  return jax.tree.map(lambda x: P(*_spec_of(x)) if x.sharding is not None else P(), state)
