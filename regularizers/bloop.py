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

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optimizers._checks import (
    check_bool,
    check_choice,
    check_floating_dtype,
    check_interval,
    check_nonnegative,
)
from optimizers._trees import compute_dtype, max_scaled, nonzero, tree_upcast, tree_vdot, vdot
from regularizers._aux import check_aux_grads, cosine, main_aux_dots

__all__ = ["BloopState", "PCGradEmaState", "bloop", "check_ema_init", "pcgrad_ema"]

_PROJECTIONS = ("global", "per_leaf")
_EMA_ORDERS = ("before", "after")
_EMA_INITS = ("zeros", "grad", "random")


class BloopState(NamedTuple):
  """State of :func:`bloop`.

  Attributes:
    ema: the EMA ``m`` of the main gradients, the params' tree in float32 or
      ``ema_dtype`` (sharded like the params); zeros, or random with ``ema_init="random"``.
    aux_cosine: ``<a, m>/(||a|| ||m||)`` (global) of the last auxiliary gradient
      with the EMA used for its projection; 0 when either is zero. float32.
    projection_ratio: the multiple of ``m`` removed from ``a``,
      ``<a, m>/(||m||^2 + eps)``, with ``projection="global"``; with
      ``"per_leaf"`` the per-leaf ratios averaged with weights ``||m_l||^2``.
      float32. With several auxiliary losses both diagnostics have one entry
      per loss (shape ``(K,)``).
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


class PCGradEmaState(NamedTuple):
  """State of :func:`regularizers.pcgrad` with ``decay`` (PCGrad over EMAs).

  Attributes:
    ema: the EMA of the main gradients, float32, the params' tree.
    aux_ema: the EMA of the auxiliary gradients, float32, the params' tree.
    main_aux_cosine: ``<g, a>/(||g|| ||a||)`` of the last raw gradients; 0 when
      either is zero. float32.
  """

  ema: optax.Updates
  aux_ema: optax.Updates
  main_aux_cosine: jax.Array


def check_ema_init(ema_init: str, seed: Any) -> None:
  check_choice("ema_init", ema_init, _EMA_INITS)
  integer_array = (isinstance(seed, jax.Array | np.ndarray) and seed.shape == ()
                   and jnp.issubdtype(seed.dtype, jnp.integer))  # optax.inject_hyperparams
  if isinstance(seed, bool) or not (isinstance(seed, int) or integer_array):
    raise ValueError(f"seed must be an int, got seed={seed!r}.")


def _init_ema(params: Any, ema_init: str, seed: int, dtype: Any = None) -> Any:
  """Zeros (``"zeros"``, ``"grad"``: the first gradient replaces the zero EMA at its
  first update) or standard normal draws (``"random"``, drawn in float32), sharded like
  ``params``; stored in ``dtype`` (``None``: float32, or float64 for float64 params)."""
  zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=compute_dtype(p)), params)
  if ema_init == "random":
    leaves, treedef = jax.tree.flatten(zeros)
    key = jax.random.key(seed)
    zeros = treedef.unflatten([
        z + jax.random.normal(jax.random.fold_in(key, i), z.shape, z.dtype)
        for i, z in enumerate(leaves)])
  return zeros if dtype is None else jax.tree.map(lambda z: z.astype(dtype), zeros)


def _first_is(ema: Any, g: Any, ema_init: str) -> Any:
  """With ``ema_init="grad"``: ``g`` where the EMA is still exactly zero (its first
  update), the EMA otherwise (one global test, so the whole tree switches at once)."""
  if ema_init != "grad":
    return ema
  empty = tree_vdot(ema, ema) == 0
  return jax.tree.map(lambda m, x: jnp.where(empty, x.astype(m.dtype), m), ema, g)


def _ema_step(ema: Any, x: Any, beta: jax.Array, ema_init: str) -> tuple[Any, Any]:
  """``(m, beta m + (1 - beta) x)``, ``m`` the stored EMA upcast to float32 (``x`` itself at
  the first step with ``ema_init="grad"``); both in float32 (float64 for float64 EMAs)."""
  ema = _first_is(tree_upcast(ema), x, ema_init)
  new = jax.tree.map(lambda n, m: n.astype(m.dtype), optax.tree.update_moment(x, ema, beta, 1),
                     ema)
  return ema, new


def _scaled_eps(epsilon: jax.Array, s_m: jax.Array) -> jax.Array:
  """``eps / s_m^2``: the ``eps`` of ``||m||^2 + eps`` for the max-scaled ``m^ = m / s_m``.

  (XLA may rewrite ``eps / s / s`` as ``eps / (s * s)``, which is 0 / 0 when ``s^2``
  underflows: hence the guard.)
  """
  return jnp.where(epsilon > 0, epsilon / s_m / s_m, jnp.zeros_like(s_m))


def _aux_list(updates: Any, aux_grads: Any, count: int | None) -> list[Any]:
  """The checked float32 auxiliary gradients: one tree (``count`` None) or a sequence of
  ``count`` trees."""
  if count is None:
    return [tree_upcast(check_aux_grads("bloop", updates, aux_grads))]
  if not isinstance(aux_grads, list | tuple) or len(aux_grads) != count:
    got = type(aux_grads).__name__
    got += f" of {len(aux_grads)}" if isinstance(aux_grads, list | tuple) else ""
    raise ValueError(f"bloop: aux_grads must be a sequence of {count} gradient trees (one "
                     f"per aux_weight), got {got}.")
  return [tree_upcast(check_aux_grads("bloop", updates, x)) for x in aux_grads]


def _aux_term(g: Any, a: Any, lam: jax.Array, m_hat: Any, s_m: jax.Array, eps_hat: jax.Array,
              projection: str, barrier: bool, ratio_only: bool):
  """``(lam (a - removed), cosine of a and m, reported multiple of m removed)`` for one
  float32 auxiliary gradient ``a`` and the max-scaled EMA ``m = s_m m^``.

  With ``a = s_a a^``, the removed multiple of ``m`` is ``(s_a / s_m) r^`` with
  ``r^ = <a^, m^> / (||m^||^2 + eps / s_m^2)``, i.e. the projection is ``s_a r^ m^``.
  """
  s_a, a_hat = max_scaled(a)
  ratios, am, mm, projection_ratio = _ratios(a_hat, m_hat, eps_hat, projection)
  # c = r^ s_a is the multiple of m^ removed (r = c / s_m that of m); the barrier caps
  # r at 1 / lam, i.e. c at s_m / lam (inf for lam = 0).
  coefs = jax.tree.map(lambda r: r * s_a, ratios)
  projection_ratio = projection_ratio * (s_a / s_m)
  if barrier:
    coefs = jax.tree.map(lambda c: jnp.minimum(c, s_m / lam), coefs)
    projection_ratio = jnp.minimum(projection_ratio, 1 / lam)
  if ratio_only:
    removed = jax.tree.map(lambda c, x: (c / s_m) * x, coefs, g)
  else:
    removed = jax.tree.map(lambda c, y: c * y, coefs, m_hat)
  term = jax.tree.map(lambda y, z: lam * (y - z), a, removed)
  return term, cosine(am, tree_vdot(a_hat, a_hat), mm), jnp.asarray(projection_ratio, jnp.float32)


def _as_list(aux_weight: Any) -> tuple[list[Any], bool]:
  if isinstance(aux_weight, list | tuple):
    if not aux_weight:
      raise ValueError("aux_weight must be a number or a non-empty sequence of numbers, "
                       "got aux_weight=[].")
    return list(aux_weight), True
  return [aux_weight], False


def bloop(
    aux_weight: float | jax.Array | Sequence[float | jax.Array],
    *,
    decay: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-12,
    projection: str = "global",
    ema_order: str = "before",
    ema_init: str = "zeros",
    seed: int = 0,
    rescale: bool = False,
    ratio_only: bool = False,
    barrier: bool = False,
    ema_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Bloop: the auxiliary gradient projected off an EMA of the main gradients.

  .. math::
    d = s \Big[g + \lambda \Big(a - r\, m\Big)\Big], \qquad
    r = \frac{\langle a, m \rangle}{\|m\|^2 + \epsilon}, \qquad
    m \leftarrow \beta m + (1 - \beta) g,

  ``g`` the incoming (main) gradient, ``a`` the required keyword ``aux_grads``,
  ``m`` a float32 EMA in the state, ``s = 1`` (or ``1 / (1 + lam)`` with
  ``rescale``). ``ema_order="before"`` (the paper's algorithm) projects on the
  EMA of the PREVIOUS gradients and then adds ``g`` to it, so with a zero EMA
  the first step is the mixed direction ``g + lam a``; ``"after"`` (the
  authors' reference code) adds ``g`` first and projects on the updated EMA.
  With ``projection="global"`` the inner product and norm run over the whole
  tree (so ``d - g`` is orthogonal to ``m`` as one vector); with ``"per_leaf"``
  every leaf is projected on its own EMA leaf (each leaf of ``d - g``
  orthogonal to its leaf of ``m``). A zero EMA skips the projection.

  Options of the authors' reference code (apple/ml-bloop, whose defaults are
  ``ema_order="after"``, ``decay=0.9``, ``ema_init="grad"``, ``eps=1e-7``):

  * ``ema_init``: ``"zeros"`` (default), ``"grad"`` (the EMA starts at the first
    gradient: while the EMA is exactly zero, the incoming gradient replaces it
    before the update, so ``"after"`` projects on ``g`` itself at the first
    step) or ``"random"`` (standard normal draws from ``seed``). On the demo LM
    (d_model 32, 2 layers, 150 steps, Bloop 1e-3 on an L2 auxiliary loss before
    AdamW, 3 seeds; ``python -m bench.reference_defaults --groups
    bloop_ema_init``) the three are indistinguishable: validation loss 2.8334
    (zeros), 2.8341 (grad), 2.8340 (random), per-seed differences below 0.001,
    far inside the 0.09 seed spread; the default stays ``"zeros"`` (unchanged
    behaviour). On single steps the choice matters: with the reference's
    ``decay=0.9`` the directions of ``"zeros"`` and ``"grad"`` differ by 6-21%
    (relative L2) over steps 2-5 on random gradients.
  * ``rescale``: ``s = 1 / (1 + lam)`` (``1 / (1 + sum lam_k)`` with several
    auxiliary losses), the intended normalisation. The reference's Bloop writes
    ``1.0 / 1.0 + lbda``, which by operator precedence multiplies by ``1 + lam``
    (its mixed and PCGrad directions divide, as here).
  * ``ratio_only``: keep the ratio but remove it along the CURRENT main gradient,
    ``d = s [g + lam (a - r g)]``.
  * ``barrier``: cap the ratio at ``1 / lam``, ``r <- min(r, 1 / lam)``: the
    reference's dynamic barrier over the EMA (``d`` then never points against
    ``m``: ``<d, m> >= ||m||^2`` to first order when ``m`` is ``g``).

  Several auxiliary losses (beyond the reference): give ``aux_weight`` as a
  sequence ``[lam_1, ..., lam_K]`` and ``aux_grads`` as a sequence of ``K``
  gradient trees; each is projected off the same main EMA,
  ``d = s [g + sum_k lam_k (a_k - r_k m)]``, and the diagnostics hold one entry
  per loss.

  Args:
    aux_weight: ``lam >= 0``, the weight of the auxiliary loss (0 returns ``g``),
      or a sequence of weights, one per auxiliary loss.
    decay: ``beta`` in ``[0, 1)``, the EMA's decay (the paper's ``rho = 0.01``
      is ``decay=0.99``; the reference code's ``ema=0.1`` is ``decay=0.9``); 0
      with ``ema_order="after"`` projects on ``g`` itself.
    eps: ``>= 0``, added to ``||m||^2`` (per leaf with ``"per_leaf"``); an exact
      zero norm is guarded separately, so ``eps=0`` is safe.
    projection: ``"global"`` or ``"per_leaf"``.
    ema_order: ``"before"`` (paper) or ``"after"`` (reference code).
    ema_init: ``"zeros"``, ``"grad"`` or ``"random"``.
    seed: the random initialisation's seed (``ema_init="random"``).
    rescale: divide the direction by ``1 + lam``.
    ratio_only: remove ``r g`` instead of ``r m``.
    barrier: cap ``r`` at ``1 / lam`` (one auxiliary loss only).
    ema_dtype: the dtype the EMA is stored in (``None``: float32). With
      ``jnp.bfloat16`` the EMA takes half the bytes; it is upcast to float32 for
      the update and the projection, and only the stored result is rounded.

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
    >>> tx = bloop([0.5, 1.0], decay=0.0, ema_order="after", rescale=True)
    >>> tx.update(g, tx.init(g), aux_grads=[a, jnp.array([2.0, 1.0])])[0]  # (g + .5 e2 + e2)/2.5
    Array([0.4, 0.6], dtype=float32)

  References:
    Hsieh et al., `Careful with that Scalpel: Improving Gradient Surgery with an
    EMA <https://arxiv.org/abs/2402.02998>`_, ICML 2024.
  """
  weights, several = _as_list(aux_weight)
  for w in weights:
    check_nonnegative("aux_weight", w)
  check_interval("decay", decay, 0, 1)
  check_nonnegative("eps", eps)
  check_choice("projection", projection, _PROJECTIONS)
  check_choice("ema_order", ema_order, _EMA_ORDERS)
  check_ema_init(ema_init, seed)
  ema_dtype = check_floating_dtype("ema_dtype", ema_dtype)
  for name, flag in (("rescale", rescale), ("ratio_only", ratio_only), ("barrier", barrier)):
    check_bool(name, flag)
  if barrier and several:
    raise ValueError("barrier=True takes one auxiliary loss; got a sequence aux_weight "
                     f"of length {len(weights)}.")

  def init_fn(params: optax.Params) -> BloopState:
    zero = jnp.zeros([len(weights)] if several else [], jnp.float32)
    return BloopState(ema=_init_ema(params, ema_init, seed, ema_dtype), aux_cosine=zero,
                      projection_ratio=zero)

  def update_fn(
      updates: optax.Updates,
      state: BloopState,
      params: optax.Params | None = None,
      *,
      aux_grads: Any = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, BloopState]:
    del params, extra_args
    auxes = _aux_list(updates, aux_grads, len(weights) if several else None)
    g = tree_upcast(updates)
    # Hyperparameters as float32 arrays first, so that Python floats and the
    # arrays of optax.inject_hyperparams give bit-identical results.
    beta, epsilon = (jnp.asarray(x, jnp.float32) for x in (decay, eps))
    lams = [jnp.asarray(w, jnp.float32) for w in weights]
    ema, new_ema = _ema_step(state.ema, g, beta, ema_init)
    s_m, m_hat = max_scaled(ema if ema_order == "before" else new_ema)
    eps_hat = _scaled_eps(epsilon, s_m)
    terms = [_aux_term(g, a, lam, m_hat, s_m, eps_hat, projection, barrier, ratio_only)
             for lam, a in zip(lams, auxes, strict=True)]
    total = g
    for term, _, _ in terms:
      total = jax.tree.map(jnp.add, total, term)
    if rescale:
      scale = 1 / (1 + sum(lams))
      total = jax.tree.map(lambda t: scale * t, total)
    direction = jax.tree.map(lambda u, t: t.astype(u.dtype), updates, total)
    pack = jnp.stack if several else (lambda xs: xs[0])
    stored = jax.tree.map(lambda n, m: n.astype(m.dtype), new_ema, state.ema)
    new_state = BloopState(ema=stored, aux_cosine=pack([c for _, c, _ in terms]),
                           projection_ratio=pack([r for _, _, r in terms]))
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pcgrad_ema(
    aux_weight: Any, decay: Any, eps: Any, ema_init: str, seed: int, rescale: bool
) -> optax.GradientTransformationExtraArgs:
  r"""PCGrad over EMAs of both gradients (the reference code's PCGrad); see
  :func:`regularizers.pcgrad` (``decay`` given), which validates the arguments.

  .. math::
    m_g \leftarrow \beta m_g + (1 - \beta) g, \quad
    m_a \leftarrow \beta m_a + (1 - \beta) a, \\
    d = s\big[(g - \min(r_g, 0)\, m_a) + \lambda (a - \min(r_a, 0)\, m_g)\big],
    \quad r_g = \frac{\langle m_a, g\rangle}{\|m_a\|^2 + \epsilon},
    \quad r_a = \frac{\langle m_g, a\rangle}{\|m_g\|^2 + \epsilon}
  """

  def init_fn(params: optax.Params) -> PCGradEmaState:
    return PCGradEmaState(ema=_init_ema(params, ema_init, seed),
                          aux_ema=_init_ema(params, ema_init, seed + 1),
                          main_aux_cosine=jnp.zeros([], jnp.float32))

  def project(x: Any, m: Any, epsilon: jax.Array) -> Any:
    """``x - min(<m, x> / (||m||^2 + eps), 0) m`` on max-scaled trees (float32)."""
    s_x, x_hat = max_scaled(x)
    s_m, m_hat = max_scaled(m)
    eps_hat = _scaled_eps(epsilon, s_m)
    xm, mm = tree_vdot(x_hat, m_hat), tree_vdot(m_hat, m_hat)
    c = jnp.minimum(xm / nonzero(mm + eps_hat), 0) * s_x  # multiple of m^ removed
    return jax.tree.map(lambda y, z: y - c * z, x, m_hat)

  def update_fn(
      updates: optax.Updates,
      state: PCGradEmaState,
      params: optax.Params | None = None,
      *,
      aux_grads: optax.Updates | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, PCGradEmaState]:
    del params, extra_args
    aux_grads = check_aux_grads("pcgrad", updates, aux_grads)
    g, a = tree_upcast(updates), tree_upcast(aux_grads)
    lam, beta, epsilon = (jnp.asarray(x, jnp.float32) for x in (aux_weight, decay, eps))
    m_g, m_a = (_ema_step(m, x, beta, ema_init)[1] for m, x in ((state.ema, g), (state.aux_ema, a)))
    pg, pa = project(g, m_a, epsilon), project(a, m_g, epsilon)
    scale = 1 / (1 + lam) if rescale else jnp.ones_like(lam)
    direction = jax.tree.map(lambda u, x, y: (scale * (x + lam * y)).astype(u.dtype),
                             updates, pg, pa)
    dots, _ = main_aux_dots(g, a)
    return direction, PCGradEmaState(ema=m_g, aux_ema=m_a, main_aux_cosine=cosine(*dots))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
