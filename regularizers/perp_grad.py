r"""The perpendicular gradient (Prieto et al. 2025): the gradient without its radial part.

Per parameter tensor it removes the component of the gradient along the weights,
``g - <g, w>/||w||^2 w``, which blocks the naive logit-scaling direction behind
softmax collapse. Inner products are taken between max-scaled tensors, so
gradients and weights of any finite magnitude neither underflow nor overflow.

References:
  Prieto, Barsbey, Mediano, Birdal, `Grokking at the Edge of Numerical
  Stability <https://arxiv.org/abs/2501.04697>`_, ICLR 2025.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers._checks import check_bool, check_real_floating, check_tree_match
from optimizers._trees import (
    max_scaled,
    nonzero,
    tree_l2_norm,
    tree_upcast,
    tree_vdot,
    upcast,
    vdot,
)

__all__ = ["PerpGradState", "perp_grad"]


class PerpGradState(NamedTuple):
  """State of :func:`perp_grad`.

  Attributes:
    radial_fraction: the fraction of the gradient's squared norm (global) that
      was removed, ``sum_l <g_l, w_l>^2/||w_l||^2 / ||g||^2`` in ``[0, 1]``; 0 for
      a zero gradient. float32.
  """

  radial_fraction: jax.Array


def perp_grad(*, rescale: bool = False) -> optax.GradientTransformationExtraArgs:
  r"""The perpendicular gradient: per leaf, the gradient minus its component along the weights.

  .. math::
    g_\perp = g - \frac{\langle g, w \rangle}{\|w\|^2}\, w
    \qquad \text{(per parameter tensor)},
    \qquad \text{with } \texttt{rescale}: \;
    g_\perp \frac{\|g\|}{\|g_\perp\|},

  so the step cannot grow or shrink the weights to first order, which blocks the
  naive logit-scaling direction that drives softmax collapse and speeds up
  grokking without weight decay. A leaf with zero weights is returned
  unchanged. Computed in float32; the updates keep their dtype. The state holds
  the fraction of the gradient removed (:class:`PerpGradState`).

  The paper's equation is the projection alone (``rescale=False``, the default);
  the authors' released OrthoGrad code also rescales each tensor's projected
  gradient back to the norm of its original gradient (``rescale=True``), so
  that a gradient mostly along ``w`` does not give a tiny step (at cosine 0.995
  with ``w`` only a tenth of its norm is left without the rescale). With an adaptive
  optimizer after it (Adam) the difference is small; with SGD it sets the step
  size. Where ``g_perp`` is zero (a zero gradient, or one exactly along ``w``)
  the rescaled output is zero, never NaN; where it is tiny (``g`` within rounding
  of ``w``'s direction) the rescale amplifies that rounding to ``||g||``, as the
  reference code does.

  Args:
    rescale: rescale each leaf's projected gradient to the norm of its original
      gradient (the authors' OrthoGrad code).

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
  check_bool("rescale", rescale)

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
    g = tree_upcast(updates)
    # Scaled inner products (see max_scaled): g = s_g g^ (global scale), w_l = s_l w^_l (per
    # leaf), c_l = <g^_l, w^_l> / ||w^_l||^2, and <g_l, w_l> w_l / ||w_l||^2 = s_g c_l w^_l.
    s_g, g_hat = max_scaled(g)
    w_units = [max_scaled(upcast(w)) for w in jax.tree.leaves(params)]
    w_hat = jax.tree.structure(params).unflatten([w for _, w in w_units])
    gw = jax.tree.map(vdot, g_hat, w_hat)
    coefs = jax.tree.map(lambda x, ww: x / nonzero(ww), gw, jax.tree.map(vdot, w_hat, w_hat))
    perp = jax.tree.map(lambda x, y, c: x - (c * s_g) * y, g, w_hat, coefs)
    if rescale:  # ||g_l|| / ||g_perp_l||, each norm overflow/underflow-safe; 0 / 0 -> 0
      perp = jax.tree.map(
          lambda p, x: p * (tree_l2_norm(x) / nonzero(tree_l2_norm(p))), perp, g)
    direction = jax.tree.map(lambda u, p: p.astype(u.dtype), updates, perp)
    removed = tree_vdot(coefs, gw)  # sum_l <g^_l, w_l>^2 / ||w_l||^2
    radial_fraction = (removed / nonzero(tree_vdot(g_hat, g_hat))).astype(jnp.float32)
    return direction, PerpGradState(radial_fraction=radial_fraction)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
