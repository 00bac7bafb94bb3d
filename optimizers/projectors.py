r"""Projectors for :func:`optimizers.subspace`: where the low-rank subspace comes from.

A :class:`Projector` is a NamedTuple of pure functions on oriented matrices
``(*batch, k, d)`` (the projected dimension ``d`` last); a basis is ``Q`` of
shape ``(*batch, d, r)`` with orthonormal columns, the low-rank gradient is
``G Q`` and the back-projection of a low-rank update ``U`` is ``U Q^T``.

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

Projector arrays (indices, bases) are sharded like the parameter's batch axes
and replicated otherwise, except the SVD bases, also sharded along the projected
axis like the parameter (the wrapper places them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optimizers._checks import (
  check_choice,
  check_int,
  check_nonnegative,
  check_period,
  check_positive,
)
from optimizers._sharding import (
  project_on_sharded_rows,
  reshard_like,
  rows_layout,
  sharded_matmul,
  unshard_axes,
)
from optimizers.dct import DCT_METHODS, dct_rows, dct_transform, top_columns
from optimizers.distributed import map_rows, owner_map, row_psum
from optimizers.linalg import frobenius_norm, top_right_singular_vectors

__all__ = [
    "Projector",
    "DctProjectorState",
    "SvdProjectorState",
    "OnlinePcaProjectorState",
    "dct_projector",
    "svd_projector",
    "online_pca_projector",
    "online_pca_loss",
    "online_pca_gradient",
]

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
    sharded_refresh: ``(gs, states, count, *, specs, strategy, names) -> (lows,
      used, nexts)``, ``refresh`` of several gradients at once (lists, one entry
      per matrix leaf) that stay in their parameters' sharding (``specs``: their
      ``PartitionSpec``, ``None`` entries to read it from the type), computed on
      the owner paths of :mod:`optimizers.distributed` (no collective inside the
      matrix math; ``strategy`` as there; the leaves' whole-matrix work shares
      one owner round trip); equal to ``refresh`` up to the rounding of sums.
      ``None``: :func:`subspace` uses ``refresh`` on the gradient with its
      projected axis unsharded.
    shards_basis: the state's bases ``(*batch, d, r)`` are sharded along ``d`` like
      the parameter's projected axis (SVD: a device keeps, and a refresh sends it,
      only the rows of ``Q`` its gradient block meets); else replicated past batch.
  """

  rank: int
  update_every: int
  init: Callable[..., Any]
  refresh: Callable[..., Any]
  project: Callable[..., jax.Array]
  back_project: Callable[..., jax.Array]
  change_of_basis: Callable[..., jax.Array]
  lagged: bool = False
  sharded_refresh: Callable[..., Any] | None = None
  shards_basis: bool = False


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
  check_int("rank", rank)
  check_period("update_every", update_every)
  check_choice("score", score, ("l1", "l2"))
  check_choice("method", method, DCT_METHODS)

  def init(batch_shape, k, d, r):
    del k, d
    return DctProjectorState(jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (*batch_shape, r)))

  def refresh(g, state, count):
    del count
    r = state.indices.shape[-1]
    t = dct_transform(g, method=method)
    idx = top_columns(t, r, score)
    low = jnp.take_along_axis(t, idx[..., None, :], axis=-1)
    new = DctProjectorState(idx)
    return low, new, new

  def sharded_refresh_one(g, state, spec, strategy, name):
    r = state.indices.shape[-1]

    def rows_fn(rows, axis_name):  # the transform is per row; the scores are sums over rows
      t = dct_transform(rows, method=method)
      idx = top_columns(t, r, score, axis_name=axis_name)
      return jnp.take_along_axis(t, idx[..., None, :], axis=-1), idx

    low, idx = map_rows(rows_fn, g, spec=spec, strategy=strategy, name=name)
    new = DctProjectorState(reshard_like(idx, state.indices))
    return low, new, new

  def sharded_refresh(gs, states, count, *, specs, strategy="auto", names):
    del count
    return _per_matrix(sharded_refresh_one, gs, states, specs, strategy, names)

  def project(g, state):  # partial products summed when g's last axis is sharded
    return project_on_sharded_rows(g, dct_rows(state.indices, g.shape[-1]).mT)

  def back_project(u, state, d):
    return u @ dct_rows(state.indices, d)

  def change_of_basis(old, new):
    return (old.indices[..., :, None] == new.indices[..., None, :]).astype(jnp.float32)

  return Projector(rank, update_every, init, refresh, project, back_project, change_of_basis,
                   sharded_refresh=sharded_refresh)


# ---------------------------------------------------------------------------
# Projectors that store their basis ``Q`` (SVD, online PCA).
# ---------------------------------------------------------------------------


def _on_basis(g: jax.Array, state: Any) -> jax.Array:
  """``g Q`` (partial products summed when ``g``'s last axis is sharded)."""
  return project_on_sharded_rows(g, state.basis)


def _from_basis(u: jax.Array, state: Any, d: int) -> jax.Array:
  """``u Q^T``."""
  del d
  return u @ state.basis.mT


def _basis_change(old: Any, new: Any) -> jax.Array:
  """``Q_old^T Q_new`` (the partial products summed when ``d`` is sharded)."""
  return sharded_matmul(old.basis.mT, new.basis)

def _top_bases(gs: list, states: list, specs: list, strategy: str, names: list,
               split: bool = False) -> list:
  """The top-``r`` right singular vectors of every gradient of ``gs`` (``r`` and the
  layout from each state's ``basis``), whole matrices on owner devices: one round trip
  for all (:func:`~optimizers.distributed.owner_map`; ``split``: each device receives
  the rows of the bases along its block of the projected axis)."""
  bases = []
  for r in sorted({st.basis.shape[-1] for st in states}):
    mine = [i for i, st in enumerate(states) if st.basis.shape[-1] == r]
    got = owner_map(functools.partial(top_right_singular_vectors, r=r), [gs[i] for i in mine],
                    specs=[specs[i] for i in mine], strategy=strategy,
                    names=[names[i] for i in mine], split_results_by_column=split)
    bases.extend(zip(mine, got, strict=True))
  return [reshard_like(b, states[i].basis) for i, b in sorted(bases, key=lambda t: t[0])]


def _per_matrix(refresh_one: Callable[..., Any], gs: list, states: list, specs: list,
                strategy: str, names: list) -> tuple[list, list, list]:
  """A ``sharded_refresh`` made of one row map per matrix leaf: ``(lows, used, nexts)``."""
  out = [refresh_one(*z, strategy, n) for *z, n in zip(gs, states, specs, names, strict=True)]
  return tuple(list(x) for x in zip(*out, strict=True)) if out else ([], [], [])


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
  check_int("rank", rank)
  check_period("update_every", update_every)

  def init(batch_shape, k, d, r):
    del k
    return SvdProjectorState(jnp.zeros((*batch_shape, d, r), jnp.float32))

  def refresh(g, state, count):
    del count
    r = state.basis.shape[-1]
    top = top_right_singular_vectors(unshard_axes(g, (-2, -1)), r)
    new = SvdProjectorState(reshard_like(top, state.basis))
    return _on_basis(g, new), new, new

  def sharded_refresh(gs, states, count, *, specs, strategy="auto", names):
    del count
    news = [SvdProjectorState(b)
            for b in _top_bases(gs, states, specs, strategy, names, split=True)]
    return [project_on_sharded_rows(g, n.basis) for g, n in zip(gs, news, strict=True)], news, news

  return Projector(rank, update_every, init, refresh, _on_basis, _from_basis, _basis_change,
                   sharded_refresh=sharded_refresh, shards_basis=True)


# ---------------------------------------------------------------------------
# Online PCA projector (Online Subspace Descent).
# ---------------------------------------------------------------------------


_PCA_INITS = ("svd", "dct")
_PEAK_HORIZON = 100_000


def schedule_peak(schedule: optax.Schedule, horizon: int = _PEAK_HORIZON) -> float:
  """The largest value of ``schedule`` over its first ``horizon`` steps (evaluated once).

  Raises ValueError when the schedule closes over traced values (no known peak) or its
  peak is not > 0.
  """
  try:
    with jax.ensure_compile_time_eval():
      values = np.asarray(jax.vmap(schedule)(jnp.arange(horizon, dtype=jnp.int32)))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as e:
    raise ValueError(
        "the schedule closes over traced values, so its peak is unknown at construction: "
        "pass schedule_reference (e.g. the peak learning rate)."
    ) from e
  peak = float(np.max(values))
  if not peak > 0:
    raise ValueError(f"the schedule's peak over its first {horizon} steps must be > 0, got "
                     f"{peak}: pass schedule_reference.")
  return peak


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
    init: str = "svd",
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
    when the weights' ``schedule`` is given, else ``learning_rate``.
    ``schedule_reference`` defaults to the schedule's peak (its largest value over
    the first 100 000 steps, evaluated once at construction), as the reference code
    divides by the configured (peak) learning rate: ``lr_Q = (1 / T_galore) * lr_t /
    lr_peak`` with ``T_galore = 200``, hence the default ``0.005``. Under a warm-up the
    basis therefore moves no faster than at the peak (a warm-up from exactly 0 needs no
    extra argument). A schedule that closes over traced values (built inside ``jit``)
    has no known peak: pass ``schedule_reference`` then.
  * Zero-gradient guard: when ``||G||_F`` is zero or not finite the step is
    skipped (``Q`` and its moments are kept), so ``Q`` never decays to zero on
    a frozen layer and a NaN gradient does not poison it (the NaN still reaches
    the update through the projection). ``||G||_F`` is computed overflow- and
    underflow-safe, so a finite ``G`` of any magnitude takes the same step.
  * Initial basis (``init``), chosen at step 0 from the first gradient before it is
    projected (PCA steps start at step ``update_every``): ``"svd"`` (the default, as the
    reference code) its top-``r`` right singular vectors (one float32 SVD per matrix, at
    step 0 only, under ``lax.cond``); ``"dct"`` the ``r`` DCT-II vectors with the
    largest ``l2`` scores (the optimal DCT subset, see :func:`dct_projector`): no SVD
    anywhere in the program. On a rank-4 gradient the DCT start leaves 0.80 of the
    energy outside the subspace at step 0 (the SVD: 0). Measured on the demo language
    model (``bench/lowrank_defaults.py``, 300 steps, rank 16, 3 seeds, re-run with the
    same figures): validation loss 2.511 with ``"svd"`` against 2.543 with ``"dct"``
    (``svd - dct`` per seed: -0.034, -0.029, -0.032; final train loss -0.038, -0.031,
    -0.030), hence the default. On CPU the SVD of stacked matrices is taken one matrix
    per LAPACK call (a batched call blocks XLA's intra-op threads on its own chunks and
    could deadlock a program over several simulated CPU devices); elsewhere it is one
    batched call.

  Args:
    rank: rank ``r`` (a Python int >= 1).
    learning_rate: AdamW learning rate of ``Q``.
    weight_decay: AdamW decoupled weight decay of ``Q`` (reference: 0.01).
    b1: Adam ``beta1`` of ``Q``.
    b2: Adam ``beta2`` of ``Q``.
    eps: Adam ``eps`` of ``Q``.
    update_every: take a PCA step every ``T`` steps (reference: every step).
    schedule: the weights' learning-rate schedule (``count -> lr``) or None.
    schedule_reference: the schedule value that maps to ``learning_rate`` (default:
      the schedule's peak).
    init: initial basis, ``"svd"`` (default) or ``"dct"`` (see above).

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
  check_int("rank", rank)
  check_period("update_every", update_every)
  check_nonnegative("learning_rate", learning_rate)
  check_nonnegative("weight_decay", weight_decay)
  if schedule is not None and not callable(schedule):
    raise ValueError(f"schedule must be a callable count -> learning rate, got {schedule!r}")
  check_choice("init", init, _PCA_INITS)
  initial_basis = init  # (`init` is the projector's init function below)
  if schedule is not None and schedule_reference is None:
    schedule_reference = schedule_peak(schedule)
  check_positive("schedule_reference", schedule_reference)
  basis_optimizer = optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.add_decayed_weights(weight_decay)
  )

  def step_size(count):
    if schedule is None:
      return learning_rate
    return learning_rate * schedule(count) / schedule_reference

  def init(batch_shape, k, d, r):
    del k
    basis = dct_rows(jnp.broadcast_to(jnp.arange(r), (*batch_shape, r)), d).mT
    return OnlinePcaProjectorState(basis, jnp.zeros_like(basis), jnp.zeros_like(basis))

  def first_basis(g, state):
    r = state.basis.shape[-1]
    if initial_basis == "svd":
      basis = top_right_singular_vectors(unshard_axes(g, (-2, -1)), r)
    else:
      basis = dct_rows(top_columns(dct_transform(g), r, "l2"), g.shape[-1]).mT
    return state._replace(basis=reshard_like(basis, state.basis))

  def pca_step(g, state, count, axis_name=None):
    # Safe for |G| ~ 1e-30 and ~ 1e30 (sum G^2 would under/overflow); `axis_name`: g holds
    # a slice of the rows (map_rows), the norm and the Gram products are summed over it.
    norm = frobenius_norm(g, axis_name=axis_name)
    ok = jnp.isfinite(norm) & (norm > 0)
    safe_norm = jnp.where(ok, norm, 1.0)
    gn = g / safe_norm
    b = gn @ state.basis
    grad = _pca_gradient(state.basis, gn, b, axis_name)
    steps_before = count // update_every - 1  # PCA steps already taken
    adam_state = optax.ScaleByAdamState(steps_before.astype(jnp.int32), state.mu, state.nu)
    direction, (adam_state, _) = basis_optimizer.update(
        grad, (adam_state, optax.EmptyState()), state.basis
    )
    new = OnlinePcaProjectorState(
        state.basis - step_size(count) * direction, adam_state.mu, adam_state.nu
    )
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b).astype(b.dtype), new, state)
    return safe_norm * b, state, reshard_like(new, state)

  def first_step(g, state):
    new = first_basis(g, state)
    return g @ new.basis, new, new

  def refresh(g, state, count):
    return jax.lax.cond(
        count == 0, lambda: first_step(g, state), lambda: pca_step(g, state, count)
    )

  def pca_rows(g, state, spec, strategy, name, count):
    """One leaf's step on whole rows (:func:`~optimizers.distributed.map_rows`): the
    online-PCA step, or at ``count == 0`` the DCT start (``init="dct"``)."""
    r, d = state.basis.shape[-1], g.shape[-1]

    def rows_fn(rows, basis, mu, nu, count, axis_name):  # rows: whole columns
      st = OnlinePcaProjectorState(basis, mu, nu)
      step = lambda: pca_step(rows, st, count, axis_name)
      def first():  # the DCT start (row transform, column scores summed over rows)
        idx = top_columns(dct_transform(rows), r, "l2", axis_name=axis_name)
        new = st._replace(basis=dct_rows(idx, d).mT)
        return rows @ new.basis, new, new

      # (the SVD start runs on owners: sharded_refresh)
      low, used, nxt = step() if initial_basis == "svd" else jax.lax.cond(count == 0, first, step)
      return low, (used, nxt)

    low, (used, nxt) = map_rows(rows_fn, g, operands=tuple(state), args=(count,), spec=spec,
                                strategy=strategy, name=name)
    return rows_layout(low, g), reshard_like(used, state), reshard_like(nxt, state)

  def sharded_refresh(gs, states, count, *, specs, strategy="auto", names):
    steps = lambda: _per_matrix(functools.partial(pca_rows, count=count), gs, states, specs,
                                strategy, names)
    if initial_basis == "dct":
      return steps()

    def svd_start():  # step 0: whole matrices on owner devices, one round trip for all
      news = [st._replace(basis=b)
              for st, b in zip(states, _top_bases(gs, states, specs, strategy, names),
                               strict=True)]
      lows = [rows_layout(project_on_sharded_rows(g, n.basis), g)
              for g, n in zip(gs, news, strict=True)]
      return lows, news, news

    return jax.lax.cond(count == 0, svd_start, steps)

  return Projector(rank, update_every, init, refresh, _on_basis, _from_basis, _basis_change,
                   lagged=True, sharded_refresh=sharded_refresh)


# ---------------------------------------------------------------------------
# The online-PCA loss.
# ---------------------------------------------------------------------------


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


def _pca_gradient(basis: jax.Array, g: jax.Array, b: jax.Array,
                  axis_name: Any = None) -> jax.Array:
  """:func:`online_pca_gradient` given ``b = g @ basis`` (``axis_name``: ``g`` and ``b``
  hold a slice of the rows, the products over rows are summed over these devices)."""
  if axis_name is None:
    c, btb = sharded_matmul(g.mT, b), sharded_matmul(b.mT, b)
  else:  # B^T B = Q^T g^T g Q = Q^T C: no second reduction
    c = row_psum(g.mT @ b, axis_name)
    btb = basis.mT @ c
  return 2.0 * (c @ (basis.mT @ basis) - 2.0 * c + basis @ btb)

