r"""Bloop (Hsieh et al. 2024): the auxiliary gradient projected off an EMA of the main gradients.

See :mod:`regularizers.surgery` for the family (mixed, PCGrad, dynamic barrier),
the calling convention (the keyword ``aux_grads``), numerics and non-finite
values.

References:
  Hsieh, Thornton, Ndiaye, Klein, Cuturi, Ablin, `Careful with that Scalpel:
  Improving Gradient Surgery with an EMA <https://arxiv.org/abs/2402.02998>`_,
  ICML 2024.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers._checks import check_choice, check_interval, check_nonnegative
from optimizers._trees import compute_dtype, max_scaled, nonzero, tree_upcast, tree_vdot, vdot
from regularizers._aux import check_aux_grads, cosine

__all__ = ["BloopState", "bloop"]

_PROJECTIONS = ("global", "per_leaf")
_EMA_ORDERS = ("before", "after")


class BloopState(NamedTuple):
  """State of :func:`bloop`.

  Attributes:
    ema: the EMA ``m`` of the main gradients, the params' tree in float32,
      zero-initialised (sharded like the params).
    aux_cosine: ``<a, m>/(||a|| ||m||)`` (global) of the last auxiliary gradient
      with the EMA used for its projection; 0 when either is zero. float32.
    projection_ratio: the multiple of ``m`` removed from ``a``,
      ``<a, m>/(||m||^2 + eps)``, with ``projection="global"``; with
      ``"per_leaf"`` the per-leaf ratios averaged with weights ``||m_l||^2``.
      float32.
  """

  ema: optax.Updates
  aux_cosine: jax.Array
  projection_ratio: jax.Array


def _ratios(a_hat: Any, m_hat: Any, eps_hat: jax.Array, projection: str):
  """``(ratios, <a^, m^>, ||m^||^2, reported ratio)`` for the max-scaled ``a^``, ``m^``:
  ``ratios`` holds per leaf the multiple of ``m^`` removed from ``a^`` (one global
  value, or per leaf with ``projection="per_leaf"``, reported as their average
  weighted by ``||m^_l||^2``); the dot products are global over the tree."""
  if projection == "global":
    am, mm = tree_vdot(a_hat, m_hat), tree_vdot(m_hat, m_hat)
    ratio = am / nonzero(mm + eps_hat)
    return jax.tree.map(lambda _: ratio, m_hat), am, mm, ratio
  am_l = jax.tree.map(vdot, a_hat, m_hat)
  mm_l = jax.tree.map(vdot, m_hat, m_hat)
  ratios = jax.tree.map(lambda x, y: x / nonzero(y + eps_hat), am_l, mm_l)
  mm = optax.tree.sum(mm_l)
  return ratios, optax.tree.sum(am_l), mm, tree_vdot(ratios, mm_l) / nonzero(mm)


def bloop(
    aux_weight: float | jax.Array,
    *,
    decay: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-12,
    projection: str = "global",
    ema_order: str = "before",
) -> optax.GradientTransformationExtraArgs:
  r"""Bloop: the auxiliary gradient projected off an EMA of the main gradients.

  .. math::
    d = g + \lambda \Big(a - \frac{\langle a, m \rangle}{\|m\|^2 + \epsilon}\, m\Big),
    \qquad m \leftarrow \beta m + (1 - \beta) g,

  ``g`` the incoming (main) gradient, ``a`` the required keyword ``aux_grads``,
  ``m`` a float32 EMA zero-initialised in the state. ``ema_order="before"`` (the
  paper's algorithm) projects on the EMA of the PREVIOUS gradients and then adds
  ``g`` to it, so the first step is the mixed direction ``g + lam a``;
  ``"after"`` (the authors' reference code) adds ``g`` first and projects on the
  updated EMA. With ``projection="global"`` the inner product and norm run over
  the whole tree (so ``d - g`` is orthogonal to ``m`` as one vector); with
  ``"per_leaf"`` every leaf is projected on its own EMA leaf (each leaf of
  ``d - g`` orthogonal to its leaf of ``m``). A zero EMA skips the projection.

  Args:
    aux_weight: ``lam >= 0``, the weight of the auxiliary loss; 0 returns ``g``.
    decay: ``beta`` in ``[0, 1)``, the EMA's decay (the paper's ``rho = 0.01``
      is ``decay=0.99``); 0 with ``ema_order="after"`` projects on ``g`` itself.
    eps: ``>= 0``, added to ``||m||^2`` (per leaf with ``"per_leaf"``); an exact
      zero norm is guarded separately, so ``eps=0`` is safe.
    projection: ``"global"`` or ``"per_leaf"``.
    ema_order: ``"before"`` (paper) or ``"after"`` (reference code).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
    params=None, *, aux_grads)`` requires ``aux_grads``; diagnostics (cosine of
    ``a`` with the EMA, projection ratio) are fields of :class:`BloopState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from regularizers import bloop
    >>> tx = bloop(0.5, decay=0.0, ema_order="after")
    >>> g, a = jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0])
    >>> d, state = tx.update(g, tx.init(g), aux_grads=a)
    >>> d  # g + 0.5 * (a minus its component along g)
    Array([1. , 0.5], dtype=float32)

  References:
    Hsieh et al., `Careful with that Scalpel: Improving Gradient Surgery with an
    EMA <https://arxiv.org/abs/2402.02998>`_, ICML 2024.
  """
  check_nonnegative("aux_weight", aux_weight)
  check_interval("decay", decay, 0, 1)
  check_nonnegative("eps", eps)
  check_choice("projection", projection, _PROJECTIONS)
  check_choice("ema_order", ema_order, _EMA_ORDERS)

  def init_fn(params: optax.Params) -> BloopState:
    ema = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=compute_dtype(p)), params)
    zero = jnp.zeros([], jnp.float32)
    return BloopState(ema=ema, aux_cosine=zero, projection_ratio=zero)

  def update_fn(
      updates: optax.Updates,
      state: BloopState,
      params: optax.Params | None = None,
      *,
      aux_grads: optax.Updates | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, BloopState]:
    del params, extra_args
    aux_grads = check_aux_grads("bloop", updates, aux_grads)
    g, a = tree_upcast(updates), tree_upcast(aux_grads)
    # Hyperparameters as float32 arrays first, so that Python floats and the
    # arrays of optax.inject_hyperparams give bit-identical results.
    lam, beta, epsilon = (jnp.asarray(x, jnp.float32) for x in (aux_weight, decay, eps))
    new_ema = jax.tree.map(
        lambda n, m: n.astype(m.dtype), optax.tree.update_moment(g, state.ema, beta, 1),
        state.ema)
    m = state.ema if ema_order == "before" else new_ema
    # Inner products of the max-scaled trees a = s_a a^, m = s_m m^ (see max_scaled): the
    # removed multiple of m is (s_a / s_m) r^ with r^ = <a^, m^> / (||m^||^2 + eps / s_m^2),
    # i.e. the projection is s_a r^ m^.
    s_a, a_hat = max_scaled(a)
    s_m, m_hat = max_scaled(m)
    # (XLA may rewrite eps / s / s as eps / (s * s), which is 0 / 0 when s^2 underflows.)
    eps_hat = jnp.where(epsilon > 0, epsilon / s_m / s_m, jnp.zeros_like(s_m))
    ratios, am, mm, projection_ratio = _ratios(a_hat, m_hat, eps_hat, projection)
    aa = tree_vdot(a_hat, a_hat)
    direction = jax.tree.map(
        lambda u, x, y, z, r: (x + lam * (y - (r * s_a) * z)).astype(u.dtype),
        updates, g, a, m_hat, ratios,
    )
    new_state = BloopState(
        ema=new_ema,
        aux_cosine=cosine(am, aa, mm),
        projection_ratio=jnp.asarray(projection_ratio * (s_a / s_m), jnp.float32),
    )
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
