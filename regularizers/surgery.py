r"""Gradient surgery for auxiliary losses: Bloop and its baselines (mixed, PCGrad, dynamic barrier).

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

Numerics: everything is computed in float32 (float64 for float64 inputs), the
outputs have the updates' dtypes, Bloop's EMA is float32. Inner products are
taken between trees divided by their largest magnitude and rescaled after, so
gradients as small as 1e-30 or as large as 1e30 neither underflow nor overflow
(a plain ``sum(g * g)`` does, past ~1e-19 and ~1e19 in float32). Zero gradients and
a zero EMA is guarded (the corresponding projection is skipped), so
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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers._checks import check_bool, check_interval, check_nonnegative, leaf_spec
from optimizers._trees import nonzero, tree_upcast
from regularizers._aux import check_aux_grads, combine, cosine, main_aux_dots
from regularizers.bloop import BloopState, PCGradEmaState, bloop, check_ema_init, pcgrad_ema
from regularizers.perp_grad import PerpGradState, perp_grad

__all__ = [
    "BloopState",
    "DynamicBarrierState",
    "MixedState",
    "PCGradEmaState",
    "PCGradState",
    "PerpGradState",
    "bloop",
    "dynamic_barrier",
    "main_and_aux_grads",
    "mixed",
    "pcgrad",
    "perp_grad",
]


class MixedState(NamedTuple):
  """State of :func:`mixed` and of :func:`pcgrad` (``PCGradState`` is this class).

  Attributes:
    main_aux_cosine: ``<g, a>/(||g|| ||a||)`` of the last step (negative means
      the two gradients conflict; PCGrad then projects both); 0 when either is
      zero. float32.
  """

  main_aux_cosine: jax.Array


PCGradState = MixedState


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
# The stateless surgeries.
# ---------------------------------------------------------------------------


def _aux_surgery(
    name: str, aux_weight: Any, state_cls: type, rule: Callable[..., Any], rescale: bool = False
) -> optax.GradientTransformationExtraArgs:
  """The stateless surgeries ``d = c_g g + c_a a`` (:func:`mixed`, :func:`pcgrad`,
  :func:`dynamic_barrier`).

  ``rule(lam, dots, scales) -> (c_g, c_a, extra)`` gives the two coefficients from
  the global dot products of the max-scaled gradients (see :func:`main_aux_dots`);
  the state is ``state_cls(main_aux_cosine, *extra)``; ``rescale`` divides ``d`` by
  ``1 + lam``.
  """
  check_nonnegative("aux_weight", aux_weight)
  check_bool("rescale", rescale)

  def init_fn(params: optax.Params) -> Any:
    del params
    return state_cls(*(jnp.zeros([], jnp.float32) for _ in state_cls._fields))

  def update_fn(
      updates: optax.Updates,
      state: Any,
      params: optax.Params | None = None,
      *,
      aux_grads: optax.Updates | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, Any]:
    del params, extra_args, state
    aux_grads = check_aux_grads(name, updates, aux_grads)
    g, a = tree_upcast(updates), tree_upcast(aux_grads)
    dots, scales = main_aux_dots(g, a)
    lam = jnp.asarray(aux_weight, jnp.float32)
    cg, ca, extra = rule(lam, dots, scales)
    if rescale:
      cg, ca = cg / (1 + lam), ca / (1 + lam)
    return combine(updates, g, a, cg, ca), state_cls(cosine(*dots), *extra)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mixed(
    aux_weight: float | jax.Array, *, rescale: bool = False
) -> optax.GradientTransformationExtraArgs:
  r"""The mixed direction ``g + lam a`` (the gradient of ``L_main + lam L_aux``).

  .. math::
    d = g + \lambda a \quad (\text{or } (g + \lambda a) / (1 + \lambda)
    \text{ with } \texttt{rescale})

  The baseline of :func:`bloop`, with the same calling convention; the state
  holds only the cosine of ``g`` and ``a`` (:class:`MixedState`).

  Args:
    aux_weight: ``lam >= 0``.
    rescale: divide by ``1 + lam`` (the reference code's ``rescale``).

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

  def rule(lam, dots, scales):
    del dots, scales
    return jnp.ones_like(lam), lam, ()

  return _aux_surgery("mixed", aux_weight, MixedState, rule, rescale)


def pcgrad(
    aux_weight: float | jax.Array,
    *,
    decay: float | jax.Array | None = None,
    eps: float | jax.Array = 1e-12,
    ema_init: str = "zeros",
    seed: int = 0,
    rescale: bool = False,
) -> optax.GradientTransformationExtraArgs:
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

  With ``decay`` (the authors' Bloop code's PCGrad baseline) each gradient is
  projected off an EMA of the OTHER one, each only on its own conflict, EMAs
  updated first (``m <- decay m + (1 - decay) x``):

  .. math::
    d = s\big[(g - \min(r_g, 0)\, m_a) + \lambda (a - \min(r_a, 0)\, m_g)\big],
    \quad r_g = \frac{\langle g, m_a \rangle}{\|m_a\|^2 + \epsilon},
    \quad r_a = \frac{\langle a, m_g \rangle}{\|m_g\|^2 + \epsilon};

  ``decay=0`` is the raw-gradient form above (with ``eps``). ``ema_init`` as in
  :func:`bloop` (``"grad"``: each EMA starts at its own first gradient; the
  reference starts the auxiliary EMA at the first MAIN gradient, a copy it
  makes because its initialiser only sees the main gradient).

  Args:
    aux_weight: ``lam >= 0``.
    decay: None (raw gradients, stateless) or the EMAs' decay in ``[0, 1)``
      (the reference code's ``ema=0.1`` is ``decay=0.9``).
    eps: ``>= 0``, added to the EMAs' squared norms (``decay`` only).
    ema_init: ``"zeros"``, ``"grad"`` or ``"random"`` (``decay`` only).
    seed: seed of the random initialisation.
    rescale: divide ``d`` by ``1 + lam`` (``s = 1 / (1 + lam)``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
    keyword ``aux_grads``; :class:`PCGradState` (the class :class:`MixedState`)
    holds the main/aux cosine, or :class:`PCGradEmaState` (the two EMAs and the
    cosine) with ``decay``.

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

  def rule(lam, dots, scales):
    (ga, gg, aa), (s_g, s_a) = dots, scales
    conflict, zero = ga < 0, jnp.zeros_like(ga)
    # pi(g; a) = g - a_in_g a and pi(a; g) = a - g_in_a g, from the scaled dots.
    a_in_g = jnp.where(conflict, ga / nonzero(aa) * (s_g / s_a), zero)
    g_in_a = jnp.where(conflict, ga / nonzero(gg) * (s_a / s_g), zero)
    return 1 - lam * g_in_a, lam - a_in_g, ()

  if decay is not None:
    check_nonnegative("aux_weight", aux_weight)
    check_interval("decay", decay, 0, 1)
    check_nonnegative("eps", eps)
    check_ema_init(ema_init, seed)
    check_bool("rescale", rescale)
    return pcgrad_ema(aux_weight, decay, eps, ema_init, seed, rescale)
  return _aux_surgery("pcgrad", aux_weight, PCGradState, rule, rescale)


def dynamic_barrier(
    aux_weight: float | jax.Array,
    *,
    decay: float | jax.Array | None = None,
    eps: float | jax.Array = 1e-12,
    ema_init: str = "zeros",
    seed: int = 0,
    rescale: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The dynamic-barrier direction: the main gradient reweighted to keep descending.

  .. math::
    d = \mu g + \lambda a, \qquad
    \mu = \max\Big(1 - \lambda \frac{\langle g, a \rangle}{\|g\|^2},\, 0\Big),

  inner products global over the tree: ``d`` is the vector closest to
  ``lam a`` with ``<d, g> >= ||g||^2`` (the main loss decreases at least at the
  rate of plain gradient descent, to first order). A zero ``g`` gives ``mu = 1``.

  With ``decay`` (the authors' Bloop code's barrier) the constraint is taken
  against an EMA ``m`` of the main gradients, updated first:
  ``d = s [g + lam (a - min(r, 1/lam) m)]``, ``r = <a, m>/(||m||^2 + eps)``,
  which is ``bloop(lam, decay=decay, ema_order="after", barrier=True)``
  (``decay=0`` gives the raw form above); the state is then a
  :class:`BloopState`.

  Args:
    aux_weight: ``lam >= 0``.
    decay: None (raw gradients, stateless) or the EMA's decay in ``[0, 1)``.
    eps: ``>= 0``, added to ``||m||^2`` (``decay`` only).
    ema_init: ``"zeros"``, ``"grad"`` or ``"random"`` (``decay`` only; see
      :func:`bloop`).
    seed: seed of the random initialisation.
    rescale: divide ``d`` by ``1 + lam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
    keyword ``aux_grads``; :class:`DynamicBarrierState` holds the main/aux
    cosine and ``mu`` (a :class:`BloopState` with ``decay``).

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

  def rule(lam, dots, scales):
    (ga, gg, _), (s_g, s_a) = dots, scales
    mu = jnp.maximum(1 - lam * (ga / nonzero(gg) * (s_a / s_g)), 0)
    return mu, lam * jnp.ones_like(mu), (mu.astype(jnp.float32),)

  if decay is not None:
    return bloop(aux_weight, decay=decay, eps=eps, ema_order="after", ema_init=ema_init,
                 seed=seed, rescale=rescale, barrier=True)
  return _aux_surgery("dynamic_barrier", aux_weight, DynamicBarrierState, rule, rescale)


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
