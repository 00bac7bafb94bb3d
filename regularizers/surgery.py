r"""Gradient surgery for auxiliary losses: Bloop, its baselines, and the perpendicular gradient.

Training on a main loss ``L_main`` with an auxiliary loss ``L_aux`` (a
regulariser, a second corpus, a fairness or smoothness penalty) usually follows
the mixed direction ``g + lam a`` (``g = grad L_main``, ``a = grad L_aux``).
Bloop (Hsieh et al. 2024) removes from ``a`` its component along an
exponential moving average ``m`` of the main gradients,

.. math::
  d = g + \lambda \Big(a - \frac{\langle a, m \rangle}{\|m\|^2 + \epsilon}\, m\Big),
  \qquad m \leftarrow \beta m + (1 - \beta) g,

so that, to first order, the step still descends the main loss at the rate of
``g`` while the auxiliary loss is minimised in the remaining directions. The EMA
(not the noisy batch gradient) is what makes the projection estimate the
main loss's full-batch gradient direction. The inner product and norm are
GLOBAL over the parameter tree by default (the sum of the leaves' dot
products); ``projection="per_leaf"`` projects each leaf on its own EMA leaf.

The four directions, all gradient-like transformations chained BEFORE an
optimizer and all requiring the keyword ``aux_grads`` (same tree, shapes and
dtypes as the updates):

* :func:`mixed`: ``g + lam a``.
* :func:`bloop`: the formula above, with its EMA state.
* :func:`pcgrad`: PCGrad in the symmetric form of Yu et al. (2020): the mixed
  direction when ``<g, a> >= 0``; on conflict both gradients are projected on
  the other's normal plane, ``pi(g; a) + lam pi(a; g)`` with
  ``pi(x; y) = x - <x, y>/||y||^2 y``. The projection of ``g`` does not depend
  on ``lam``, so ``pcgrad(0.0)`` still changes ``g`` on conflict.
* :func:`dynamic_barrier`: ``mu g + lam a`` with
  ``mu = max(1 - lam <g, a>/||g||^2, 0)`` (Gong et al. 2021): the vector
  closest to ``lam a`` with ``<d, g> >= ||g||^2``.

Usage::

  tx = optax.chain(regularizers.bloop(0.1), optax.adam(1e-3))
  (loss, aux_loss), (grads, aux_grads) = regularizers.main_and_aux_grads(
      two_losses, params, batch)
  updates, opt_state = tx.update(grads, opt_state, params, aux_grads=aux_grads)

:func:`main_and_aux_grads` returns both gradients from ONE forward pass when the
two losses share the model's activations (one ``jax.vjp`` of the pair of losses,
two backward passes), instead of two full ``jax.grad`` calls.

:func:`perp_grad` (Prieto et al. 2025) is unrelated to the auxiliary gradient:
per parameter tensor it removes the component of the gradient along the
weights, ``g - <g, w>/||w||^2 w``, which blocks the naive logit-scaling
direction behind softmax collapse.

Numerics: everything is computed in float32 (float64 for float64 inputs), the
outputs have the updates' dtypes, Bloop's EMA is float32. Inner products are
taken between trees divided by their largest magnitude and rescaled after, so
gradients as small as 1e-30 or as large as 1e30 neither underflow nor overflow
(a plain ``sum(g * g)`` does, past ~1e-19 and ~1e19 in float32). Zero gradients and
zero EMA / weights are guarded (the corresponding projection is skipped), so
they never give NaN; with the EMA at zero (Bloop's first step with the default
``ema_order="before"``) Bloop is exactly the mixed direction. As the projection
is invariant to the scale of ``m``, the EMA's zero-initialisation bias needs no
correction.

Non-finite values stay visible: a NaN/Inf in ``g`` or in ``aux_grads`` gives
NaN/Inf updates (Bloop and the barrier spread it over the whole tree through
the global inner products). A NaN in ``g`` also ENTERS Bloop's EMA (it would
stay there), a NaN in ``aux_grads`` does not (``a`` never enters the state).
``optax.apply_if_finite`` around the chain skips the whole update, the EMA
included, when the incoming gradient ``g`` is not finite; it inspects only its
incoming updates, so to skip steps with a non-finite auxiliary gradient as well,
also wrap the optimizer after the surgery::

  tx = optax.apply_if_finite(
      optax.chain(bloop(0.1), optax.apply_if_finite(optax.adam(1e-3), 10)), 10)

With ``optax.MultiSteps``, only the ``aux_grads`` of the last micro-step reach
the transform: accumulate the auxiliary gradient yourself. Inside
``optax.masked``/``optax.partition`` pass the full ``aux_grads``: it is masked
like the updates, and the surgery (with its global inner products) runs over the
unmasked leaves only. Integer or complex leaves raise ``TypeError``.

References:
  Hsieh, Thornton, Ndiaye, Klein, Cuturi, Ablin, `Careful with that Scalpel:
  Improving Gradient Surgery with an EMA <https://arxiv.org/abs/2402.02998>`_,
  ICML 2024.

  Yu et al., `Gradient Surgery for Multi-Task Learning
  <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.

  Gong, Liu, Liu, `Automatic and Harmless Regularization with Constrained and
  Lexicographic Optimization: A Dynamic Barrier Approach
  <https://openreview.net/forum?id=Ur7vdq3CmYz>`_, NeurIPS 2021.

  Prieto, Barsbey, Mediano, Birdal, `Grokking at the Edge of Numerical
  Stability <https://arxiv.org/abs/2501.04697>`_, ICLR 2025.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optimizers.linalg import tree_max_abs
from optimizers.matrices import (
    check_real_floating,
    check_tree_match,
    concrete_hyperparameter,
    leaf_spec,
)

__all__ = [
    "BloopState",
    "DynamicBarrierState",
    "MixedState",
    "PCGradState",
    "PerpGradState",
    "bloop",
    "dynamic_barrier",
    "main_and_aux_grads",
    "mixed",
    "pcgrad",
    "perp_grad",
]

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


class MixedState(NamedTuple):
  """State of :func:`mixed`.

  Attributes:
    main_aux_cosine: ``<g, a>/(||g|| ||a||)`` of the last step (negative means
      the two gradients conflict); 0 when either is zero. float32.
  """

  main_aux_cosine: jax.Array


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    main_aux_cosine: ``<g, a>/(||g|| ||a||)`` of the last step (negative means
      conflict: both gradients were projected); 0 when either is zero. float32.
  """

  main_aux_cosine: jax.Array


class PerpGradState(NamedTuple):
  """State of :func:`perp_grad`.

  Attributes:
    radial_fraction: the fraction of the gradient's squared norm (global) that
      was removed, ``sum_l <g_l, w_l>^2/||w_l||^2 / ||g||^2`` in ``[0, 1]``; 0 for
      a zero gradient. float32.
  """

  radial_fraction: jax.Array


class DynamicBarrierState(NamedTuple):
  """State of :func:`dynamic_barrier`.

  Attributes:
    main_aux_cosine: ``<g, a>/(||g|| ||a||)`` of the last step; 0 when either is
      zero. float32.
    main_weight: the last multiplier ``mu = max(1 - lam <g, a>/||g||^2, 0)`` of
      the main gradient. float32.
  """

  main_aux_cosine: jax.Array
  main_weight: jax.Array


# ---------------------------------------------------------------------------
# Validation and small numerics.
# ---------------------------------------------------------------------------


def _check_aux_weight(aux_weight: Any) -> None:
  value = concrete_hyperparameter(aux_weight, "aux_weight")
  if value is not None and not np.all((value >= 0) & np.isfinite(value)):
    raise ValueError(f"aux_weight must be finite and >= 0, got aux_weight={aux_weight}.")


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _mask_like(updates: Any, aux_grads: Any) -> Any:
  """``aux_grads`` with ``optax.MaskedNode`` wherever ``updates`` has one.

  Inside ``optax.masked``/``optax.partition`` the updates hold ``MaskedNode``
  leaves while the caller passes the full ``aux_grads``; the masked leaves are
  dropped so that the surgery (and its global inner products) runs over the
  unmasked leaves only. Trees that do not line up are returned unchanged (and
  rejected by :func:`_check_aux_grads`).
  """
  if not any(map(_is_masked_node, jax.tree.leaves(updates, is_leaf=_is_masked_node))):
    return aux_grads
  try:
    return jax.tree.map(lambda u, a: u if _is_masked_node(u) else a, updates, aux_grads,
                        is_leaf=_is_masked_node)
  except (ValueError, TypeError):
    return aux_grads


def _check_aux_grads(name: str, updates: Any, aux_grads: Any) -> Any:
  """``aux_grads`` present and matching ``updates`` leaf by leaf (tree, shape, dtype);
  returns it masked like ``updates`` (see :func:`_mask_like`)."""
  if aux_grads is None:
    raise ValueError(
        f"{name}: update requires the keyword argument aux_grads (the gradient of the "
        "auxiliary loss, same tree, shapes and dtypes as the updates)."
    )
  check_real_floating(updates, owner=name)
  aux_grads = _mask_like(updates, aux_grads)
  check_tree_match(updates, aux_grads, owner=name, name="aux_grads", dtypes=True)
  return aux_grads


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _nonzero(x: jax.Array) -> jax.Array:
  """``x`` with exact zeros replaced by 1: the guard of a division by a squared norm."""
  return jnp.where(x == 0, jnp.ones_like(x), x)


def _cosine(xy: jax.Array, xx: jax.Array, yy: jax.Array) -> jax.Array:
  """``<x, y>/(||x|| ||y||)`` from the dot products; 0 when either vector is zero."""
  return (xy / _nonzero(jnp.sqrt(xx) * jnp.sqrt(yy))).astype(jnp.float32)


def _vdot(x: jax.Array, y: jax.Array) -> jax.Array:
  """``<x, y>`` of two arrays as an elementwise product and a sum, which (unlike a
  ``ravel``-based dot, e.g. ``optax.tree.vdot`` with jax >= 0.10) works on leaves
  sharded with Explicit mesh axes: the result is a replicated scalar."""
  return jnp.sum(x * y)


def _tree_vdot(x: Any, y: Any) -> jax.Array:
  """``<x, y>`` global over two trees: the sum of the leaves' dot products."""
  return sum(jax.tree.leaves(jax.tree.map(_vdot, x, y)), jnp.zeros([], jnp.float32))


def _unit(tree: Any) -> tuple[jax.Array, Any]:
  """``(s, tree / s)`` with ``s = max |x|`` over the tree (1 for a zero tree).

  Inner products of the scaled trees neither overflow (``|x| ~ 1e20`` squares past
  float32's range) nor underflow (``|x| ~ 1e-20`` squares to 0), so the surgery is
  exact up to rounding for any finite input; a NaN or Inf still propagates.
  """
  s = tree_max_abs(tree)
  s = jnp.where(s > 0, s, jnp.ones_like(s))
  return s, jax.tree.map(lambda x: x / s, tree)


def _main_aux_dots(g: Any, a: Any) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """``((<g^, a^>, ||g^||^2, ||a^||^2), (s_g, s_a))``, global over the tree, for the
  max-scaled ``g^ = g / s_g`` and ``a^ = a / s_a`` (see :func:`_unit`):
  ``<g, a> / ||g||^2 = (s_a / s_g) <g^, a^> / ||g^||^2``."""
  s_g, g_hat = _unit(g)
  s_a, a_hat = _unit(a)
  dots = _tree_vdot(g_hat, a_hat), _tree_vdot(g_hat, g_hat), _tree_vdot(a_hat, a_hat)
  return dots, (s_g, s_a)


def _combine(updates: Any, g: Any, a: Any, cg: jax.Array, ca: jax.Array) -> Any:
  """``cg g + ca a`` leaf by leaf, cast to the updates' dtypes."""
  return jax.tree.map(lambda u, x, y: (cg * x + ca * y).astype(u.dtype), updates, g, a)


# ---------------------------------------------------------------------------
# The four directions.
# ---------------------------------------------------------------------------


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
  _check_aux_weight(aux_weight)
  value = concrete_hyperparameter(decay, "decay")
  if value is not None and not np.all((0 <= value) & (value < 1)):
    raise ValueError(f"decay must be in [0, 1), got decay={decay}.")
  value = concrete_hyperparameter(eps, "eps")
  if value is not None and not np.all((value >= 0) & np.isfinite(value)):
    raise ValueError(f"eps must be finite and >= 0, got eps={eps}.")
  if projection not in _PROJECTIONS:
    raise ValueError(f"projection must be one of {_PROJECTIONS}, got projection={projection!r}.")
  if ema_order not in _EMA_ORDERS:
    raise ValueError(f"ema_order must be one of {_EMA_ORDERS}, got ema_order={ema_order!r}.")

  def init_fn(params: optax.Params) -> BloopState:
    ema = jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=jnp.promote_types(p.dtype, jnp.float32)), params)
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
    aux_grads = _check_aux_grads("bloop", updates, aux_grads)
    g = jax.tree.map(_f32, updates)
    a = jax.tree.map(_f32, aux_grads)
    # Hyperparameters as float32 arrays first, so that Python floats and the
    # arrays of optax.inject_hyperparams give bit-identical results.
    lam, beta, epsilon = (jnp.asarray(x, jnp.float32) for x in (aux_weight, decay, eps))
    new_ema = jax.tree.map(
        lambda n, m: n.astype(m.dtype), optax.tree.update_moment(g, state.ema, beta, 1),
        state.ema)
    m = state.ema if ema_order == "before" else new_ema
    # Inner products of the max-scaled trees a = s_a a^, m = s_m m^ (see _unit): the
    # removed multiple of m is (s_a / s_m) r^ with r^ = <a^, m^> / (||m^||^2 + eps / s_m^2),
    # i.e. the projection is s_a r^ m^.
    s_a, a_hat = _unit(a)
    s_m, m_hat = _unit(m)
    # (XLA may rewrite eps / s / s as eps / (s * s), which is 0 / 0 when s^2 underflows.)
    eps_hat = jnp.where(epsilon > 0, epsilon / s_m / s_m, jnp.zeros_like(s_m))
    if projection == "global":
      am, mm = _tree_vdot(a_hat, m_hat), _tree_vdot(m_hat, m_hat)
      ratio = am / _nonzero(mm + eps_hat)
      ratios = jax.tree.map(lambda _: ratio, m)
      projection_ratio = ratio
    else:
      am_l = jax.tree.map(_vdot, a_hat, m_hat)
      mm_l = jax.tree.map(_vdot, m_hat, m_hat)
      ratios = jax.tree.map(lambda x, y: x / _nonzero(y + eps_hat), am_l, mm_l)
      am, mm = optax.tree.sum(am_l), optax.tree.sum(mm_l)
      projection_ratio = _tree_vdot(ratios, mm_l) / _nonzero(mm)
    aa = _tree_vdot(a_hat, a_hat)
    direction = jax.tree.map(
        lambda u, x, y, z, r: (x + lam * (y - (r * s_a) * z)).astype(u.dtype),
        updates, g, a, m_hat, ratios,
    )
    new_state = BloopState(
        ema=new_ema,
        aux_cosine=_cosine(am, aa, mm),
        projection_ratio=jnp.asarray(projection_ratio * (s_a / s_m), jnp.float32),
    )
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mixed(aux_weight: float | jax.Array) -> optax.GradientTransformationExtraArgs:
  r"""The mixed direction ``g + lam a`` (the gradient of ``L_main + lam L_aux``).

  .. math::
    d = g + \lambda a

  The baseline of :func:`bloop`, with the same calling convention; the state
  holds only the cosine of ``g`` and ``a`` (:class:`MixedState`).

  Args:
    aux_weight: ``lam >= 0``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
    keyword ``aux_grads``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from regularizers import mixed
    >>> tx = mixed(0.5)
    >>> g = jnp.array([1.0, 0.0])
    >>> tx.update(g, tx.init(g), aux_grads=jnp.array([-1.0, 1.0]))[0]
    Array([0.5, 0.5], dtype=float32)

  References:
    Hsieh et al., `Careful with that Scalpel: Improving Gradient Surgery with an
    EMA <https://arxiv.org/abs/2402.02998>`_, ICML 2024 (the mixed baseline).
  """
  _check_aux_weight(aux_weight)

  def init_fn(params: optax.Params) -> MixedState:
    del params
    return MixedState(main_aux_cosine=jnp.zeros([], jnp.float32))

  def update_fn(
      updates: optax.Updates,
      state: MixedState,
      params: optax.Params | None = None,
      *,
      aux_grads: optax.Updates | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, MixedState]:
    del params, extra_args, state
    aux_grads = _check_aux_grads("mixed", updates, aux_grads)
    g = jax.tree.map(_f32, updates)
    a = jax.tree.map(_f32, aux_grads)
    lam = jnp.asarray(aux_weight, jnp.float32)
    direction = _combine(updates, g, a, jnp.ones_like(lam), lam)
    return direction, MixedState(main_aux_cosine=_cosine(*_main_aux_dots(g, a)[0]))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pcgrad(aux_weight: float | jax.Array) -> optax.GradientTransformationExtraArgs:
  r"""PCGrad (symmetric form of Yu et al.) for a main and an auxiliary gradient.

  .. math::
    d = \begin{cases}
      g + \lambda a & \langle g, a \rangle \ge 0 \\
      \pi(g; a) + \lambda\, \pi(a; g) & \langle g, a \rangle < 0
    \end{cases}, \qquad
    \pi(x; y) = x - \frac{\langle x, y \rangle}{\|y\|^2}\, y,

  inner products global over the tree. On conflict the main gradient is
  projected too, whatever ``lam`` (``pcgrad(0.0)`` returns ``pi(g; a)``, not
  ``g``): PCGrad does not keep the main loss's first-order descent rate, which
  is the point Bloop addresses.

  Args:
    aux_weight: ``lam >= 0``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
    keyword ``aux_grads``; :class:`PCGradState` holds the main/aux cosine.

  Examples:
    >>> import jax.numpy as jnp
    >>> from regularizers import pcgrad
    >>> tx = pcgrad(0.5)
    >>> g = jnp.array([1.0, 0.0])
    >>> tx.update(g, tx.init(g), aux_grads=jnp.array([-1.0, 1.0]))[0]
    Array([0.5, 1. ], dtype=float32)

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """
  _check_aux_weight(aux_weight)

  def init_fn(params: optax.Params) -> PCGradState:
    del params
    return PCGradState(main_aux_cosine=jnp.zeros([], jnp.float32))

  def update_fn(
      updates: optax.Updates,
      state: PCGradState,
      params: optax.Params | None = None,
      *,
      aux_grads: optax.Updates | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, PCGradState]:
    del params, extra_args, state
    aux_grads = _check_aux_grads("pcgrad", updates, aux_grads)
    g = jax.tree.map(_f32, updates)
    a = jax.tree.map(_f32, aux_grads)
    (ga, gg, aa), (s_g, s_a) = _main_aux_dots(g, a)
    conflict = ga < 0
    zero = jnp.zeros_like(ga)
    # pi(g; a) = g - a_in_g a and pi(a; g) = a - g_in_a g, from the scaled dots.
    a_in_g = jnp.where(conflict, ga / _nonzero(aa) * (s_g / s_a), zero)
    g_in_a = jnp.where(conflict, ga / _nonzero(gg) * (s_a / s_g), zero)
    lam = jnp.asarray(aux_weight, jnp.float32)
    direction = _combine(updates, g, a, 1 - lam * g_in_a, lam - a_in_g)
    return direction, PCGradState(main_aux_cosine=_cosine(ga, gg, aa))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dynamic_barrier(aux_weight: float | jax.Array) -> optax.GradientTransformationExtraArgs:
  r"""The dynamic-barrier direction: the main gradient reweighted to keep descending.

  .. math::
    d = \mu g + \lambda a, \qquad
    \mu = \max\Big(1 - \lambda \frac{\langle g, a \rangle}{\|g\|^2},\, 0\Big),

  inner products global over the tree: ``d`` is the vector closest to
  ``lam a`` with ``<d, g> >= ||g||^2`` (the main loss decreases at least at the
  rate of plain gradient descent, to first order). A zero ``g`` gives ``mu = 1``.

  Args:
    aux_weight: ``lam >= 0``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
    keyword ``aux_grads``; :class:`DynamicBarrierState` holds the main/aux
    cosine and ``mu``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from regularizers import dynamic_barrier
    >>> tx = dynamic_barrier(0.5)
    >>> g = jnp.array([1.0, 0.0])
    >>> tx.update(g, tx.init(g), aux_grads=jnp.array([-1.0, 1.0]))[0]  # mu = 1.5
    Array([1. , 0.5], dtype=float32)

  References:
    Gong, Liu, Liu, `Automatic and Harmless Regularization with Constrained and
    Lexicographic Optimization: A Dynamic Barrier Approach
    <https://openreview.net/forum?id=Ur7vdq3CmYz>`_, NeurIPS 2021; as a
    baseline in Hsieh et al. <https://arxiv.org/abs/2402.02998>.
  """
  _check_aux_weight(aux_weight)

  def init_fn(params: optax.Params) -> DynamicBarrierState:
    del params
    zero = jnp.zeros([], jnp.float32)
    return DynamicBarrierState(main_aux_cosine=zero, main_weight=zero)

  def update_fn(
      updates: optax.Updates,
      state: DynamicBarrierState,
      params: optax.Params | None = None,
      *,
      aux_grads: optax.Updates | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, DynamicBarrierState]:
    del params, extra_args, state
    aux_grads = _check_aux_grads("dynamic_barrier", updates, aux_grads)
    g = jax.tree.map(_f32, updates)
    a = jax.tree.map(_f32, aux_grads)
    (ga, gg, aa), (s_g, s_a) = _main_aux_dots(g, a)
    lam = jnp.asarray(aux_weight, jnp.float32)
    mu = jnp.maximum(1 - lam * (ga / _nonzero(gg) * (s_a / s_g)), 0)
    direction = _combine(updates, g, a, mu, lam * jnp.ones_like(mu))
    new_state = DynamicBarrierState(
        main_aux_cosine=_cosine(ga, gg, aa), main_weight=mu.astype(jnp.float32))
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# The perpendicular gradient.
# ---------------------------------------------------------------------------


def perp_grad() -> optax.GradientTransformationExtraArgs:
  r"""The perpendicular gradient: per leaf, the gradient minus its component along the weights.

  .. math::
    g_\perp = g - \frac{\langle g, w \rangle}{\|w\|^2}\, w
    \qquad \text{(per parameter tensor)},

  so the step cannot grow or shrink the weights to first order, which blocks the
  naive logit-scaling direction that drives softmax collapse and speeds up
  grokking without weight decay. A leaf with zero weights is returned
  unchanged. Computed in float32; the updates keep their dtype. The state holds
  the fraction of the gradient removed (:class:`PerpGradState`).

  Args:
    (none)

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
    params)`` requires ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from regularizers import perp_grad
    >>> tx = perp_grad()
    >>> w = jnp.array([1.0, 0.0])
    >>> tx.update(jnp.array([3.0, 4.0]), tx.init(w), w)[0]
    Array([0., 4.], dtype=float32)

  References:
    Prieto, Barsbey, Mediano, Birdal, `Grokking at the Edge of Numerical
    Stability <https://arxiv.org/abs/2501.04697>`_, ICLR 2025.
  """

  def init_fn(params: optax.Params) -> PerpGradState:
    del params
    return PerpGradState(radial_fraction=jnp.zeros([], jnp.float32))

  def update_fn(
      updates: optax.Updates,
      state: PerpGradState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, PerpGradState]:
    del extra_args, state
    if params is None:
      raise ValueError("perp_grad: update requires params (the weights to project off).")
    check_real_floating(updates, owner="perp_grad")
    check_real_floating(params, owner="perp_grad", name="params")
    check_tree_match(updates, params, owner="perp_grad", name="params")
    g = jax.tree.map(_f32, updates)
    # Scaled inner products (see _unit): g = s_g g^ (global scale), w_l = s_l w^_l (per
    # leaf), c_l = <g^_l, w^_l> / ||w^_l||^2, and <g_l, w_l> w_l / ||w_l||^2 = s_g c_l w^_l.
    s_g, g_hat = _unit(g)
    w_units = [_unit(_f32(w)) for w in jax.tree.leaves(params)]
    w_hat = jax.tree.structure(params).unflatten([w for _, w in w_units])
    gw = jax.tree.map(_vdot, g_hat, w_hat)
    coefs = jax.tree.map(lambda x, ww: x / _nonzero(ww), gw, jax.tree.map(_vdot, w_hat, w_hat))
    direction = jax.tree.map(
        lambda u, x, y, c: (x - (c * s_g) * y).astype(u.dtype), updates, g, w_hat, coefs)
    removed = _tree_vdot(coefs, gw)  # sum_l <g^_l, w_l>^2 / ||w_l||^2
    radial_fraction = (removed / _nonzero(_tree_vdot(g_hat, g_hat))).astype(jnp.float32)
    return direction, PerpGradState(radial_fraction=radial_fraction)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Both gradients from one forward pass.
# ---------------------------------------------------------------------------


def main_and_aux_grads(
    loss_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    has_aux: bool = False,
) -> tuple[Any, tuple[Any, Any]]:
  r"""The main and the auxiliary loss gradients from ONE forward pass.

  ``loss_fn(params, *args)`` returns the pair ``(main_loss, aux_loss)`` of
  scalars (computed from shared activations, e.g. a task loss and a penalty on
  the logits or on hidden features). One ``jax.vjp`` runs the forward pass once
  and keeps its residuals; two backward passes with the cotangents ``(1, 0)`` and
  ``(0, 1)`` give

  .. math::
    g = \nabla_\theta L_{main}, \qquad a = \nabla_\theta L_{aux},

  so a Bloop step costs one forward and two backward passes instead of the two
  forwards and two backwards of two ``jax.grad`` calls (the forward's
  activations stay alive through both backward passes, as for one
  ``jax.grad``).

  Args:
    loss_fn: ``loss_fn(params, *args) -> (main_loss, aux_loss)``, or
      ``((main_loss, aux_loss), data)`` with ``has_aux=True``.
    params: the point to differentiate at (any pytree).
    *args: further arguments of ``loss_fn`` (not differentiated).
    has_aux: as in ``jax.value_and_grad``: ``loss_fn`` also returns data that is
      passed through (not differentiated).

  Returns:
    ``((main_loss, aux_loss), (main_grads, aux_grads))``, or
    ``(((main_loss, aux_loss), data), (main_grads, aux_grads))`` with
    ``has_aux=True``; both gradients have the tree and dtypes of ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from regularizers import main_and_aux_grads
    >>> def losses(w, x):
    ...   h = jnp.tanh(x @ w)                     # shared activations
    ...   return jnp.mean((h - 1.0) ** 2), jnp.mean(h ** 2)
    >>> (l_main, l_aux), (g, a) = main_and_aux_grads(losses, jnp.zeros(2), jnp.eye(2))
    >>> g, a
    (Array([-1., -1.], dtype=float32), Array([0., 0.], dtype=float32))

  References:
    Hsieh et al., `Careful with that Scalpel: Improving Gradient Surgery with an
    EMA <https://arxiv.org/abs/2402.02998>`_, ICML 2024.
  """

  def pair(p: Any) -> Any:
    return loss_fn(p, *args)

  if has_aux:
    losses, vjp_fn, data = jax.vjp(pair, params, has_aux=True)
  else:
    losses, vjp_fn = jax.vjp(pair, params)
  if not (isinstance(losses, tuple | list) and len(losses) == 2
          and all(jnp.shape(x) == () for x in losses)):
    raise ValueError(
        "main_and_aux_grads: loss_fn must return a pair (main_loss, aux_loss) of scalars"
        + (" and data (has_aux=True)" if has_aux else "")
        + f"; got {jax.tree.map(leaf_spec, losses)}."
    )
  main_loss, aux_loss = losses
  pair_def = jax.tree.structure(losses)
  one, zero = jnp.ones_like, jnp.zeros_like
  (main_grads,) = vjp_fn(jax.tree.unflatten(pair_def, [one(main_loss), zero(aux_loss)]))
  (aux_grads,) = vjp_fn(jax.tree.unflatten(pair_def, [zero(main_loss), one(aux_loss)]))
  values = (main_loss, aux_loss)
  return ((values, data) if has_aux else values), (main_grads, aux_grads)
