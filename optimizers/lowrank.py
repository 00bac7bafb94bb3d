r"""Full low-rank optimizers: AdamW with its matrix moments in a projected subspace.

Both are ``chain(subspace(scale_by_adam, projector), add_decayed_weights,
scale_by_learning_rate)``: the decoupled weight decay acts in the full space
and is never projected; non-matrix leaves get plain AdamW.

* :func:`dct_adamw`: the DCT projector (SVD-free; Modoranu et al., arXiv 2505.17967).
* :func:`online_subspace_descent`: the online-PCA projector (Liang et al., arXiv
  2408.12857).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from optimizers.matrices import WeightDimensionNumbers
from optimizers.projectors import dct_projector, online_pca_projector
from optimizers.subspace import subspace

__all__ = ["dct_adamw", "online_subspace_descent"]


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
