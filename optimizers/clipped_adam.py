r"""Adam with coordinate-wise clipping of the first moment's input (Pan & Li).

Pan & Li (2023) clip the gradient coordinate-wise (the top fraction ``k`` of
magnitudes over the whole tree, :func:`optimizers.clip_coordinatewise`) before
it enters Adam's FIRST moment, and feed the unclipped gradient to the SECOND
moment::

  c_t   = clip_k(g_t)                          (global adaptive threshold)
  m_t   = b1 m_{t-1} + (1 - b1) c_t
  v_t   = b2 v_{t-1} + (1 - b2) g_t^2          (raw gradient)
  u_t   = m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t) + eps_root) + eps)

``optax.chain(clip_coordinatewise(k), optax.adam(lr))`` clips both moments'
input instead: the clipped coordinates then see a smaller ``v`` and their steps
are not damped by the large raw gradient, which is not the paper's method.

References:
  Pan & Li, `Toward Understanding Why Adam Converges Faster Than SGD for
  Transformers <https://arxiv.org/abs/2306.00204>`_, 2023.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers._checks import check_interval, check_nonnegative, check_real_floating
from optimizers.clipping import ClipCoordinatewiseState, clip_coordinatewise

__all__ = ["ScaleByClippedAdamState", "scale_by_clipped_adam", "clipped_adamw"]


class ScaleByClippedAdamState(NamedTuple):
  """State of :func:`scale_by_clipped_adam`.

  Attributes:
    count: number of updates, int32.
    mu: first moment (EMA of the clipped gradient), ``mu_dtype`` or the params'.
    nu: second moment (EMA of the squared raw gradient), the params' dtype.
    clip: the last clipping threshold and clipped fraction.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  clip: ClipCoordinatewiseState


def _check(clip_fraction: Any, b1: Any, b2: Any, eps: Any, eps_root: Any) -> None:
  check_interval("clip_fraction", clip_fraction, 0.0, 1.0)
  check_interval("b1", b1, 0.0, 1.0)
  check_interval("b2", b2, 0.0, 1.0)
  check_nonnegative("eps", eps)
  check_nonnegative("eps_root", eps_root)


def scale_by_clipped_adam(
    clip_fraction: float | jax.Array,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    *,
    mu_dtype: Any | None = None,
    method: str | None = None,
    bisect_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam's scaling with the first moment fed the coordinate-wise clipped gradient.

  .. math::
    c_t = \mathrm{clip}_k(g_t), \quad
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) c_t, \quad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
    u_t = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}}
          + \epsilon}

  where ``clip_k`` clips the top ``k = clip_fraction`` of the gradient's
  magnitudes, ranked over the WHOLE tree, to the threshold (the
  ``floor(N k)``-th largest magnitude), as :func:`optimizers.clip_coordinatewise`
  does; the second moment sees the raw gradient (Pan & Li's rule).
  ``clip_fraction = 0`` is ``optax.scale_by_adam`` exactly. Non-finite gradient
  coordinates pass through the clipping and stay visible in the output.

  Args:
    clip_fraction: fraction ``k`` of coordinates clipped, in ``[0, 1)``.
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to the root of the second moment, ``>= 0``.
    eps_root: added inside the root, ``>= 0``.
    mu_dtype: dtype of the first moment (None: the params').
    method: how the clipping threshold is found (``"exact"`` or ``"bisect"``,
      see :func:`optimizers.clip_coordinatewise`); None: its default.
    bisect_steps: bisection steps for ``"bisect"`` (None: exact threshold).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByClippedAdamState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import scale_by_clipped_adam
    >>> g = {"w": jnp.array([10.0, 1.0, -1.0, 0.5])}
    >>> tx = scale_by_clipped_adam(0.25)  # |10| is clipped to 1, in m only
    >>> u, state = tx.update(g, tx.init(g))
    >>> state.mu["w"]
    Array([ 0.1 ,  0.1 , -0.1 ,  0.05], dtype=float32)
    >>> [round(float(x), 4) for x in u["w"]]  # m / (1 - b1) / sqrt(v / (1 - b2))
    [0.1, 1.0, -1.0, 1.0]

  References:
    Pan & Li, `Toward Understanding Why Adam Converges Faster Than SGD for
    Transformers <https://arxiv.org/abs/2306.00204>`_, 2023.
  """
  _check(clip_fraction, b1, b2, eps, eps_root)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  clip_kwargs: dict[str, Any] = {"bisect_steps": bisect_steps}
  if method is not None:
    clip_kwargs["method"] = method
  clip = clip_coordinatewise(clip_fraction, **clip_kwargs)

  def init_fn(params: optax.Params) -> ScaleByClippedAdamState:
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params)
    return ScaleByClippedAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu,
                                   clip=clip.init(params))

  def update_fn(
      updates: optax.Updates,
      state: ScaleByClippedAdamState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, ScaleByClippedAdamState]:
    del params, extra_args
    check_real_floating(updates, owner="scale_by_clipped_adam")
    clipped, clip_state = clip.update(updates, state.clip)
    mu = optax.tree.update_moment(clipped, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    new_updates = jax.tree.map(
        lambda m, v, g: (m / (jnp.sqrt(v + eps_root) + eps)).astype(g.dtype),
        mu_hat, nu_hat, updates)
    mu = optax.tree.cast(mu, mu_dtype)
    return new_updates, ScaleByClippedAdamState(count=count, mu=mu, nu=nu, clip=clip_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clipped_adamw(
    learning_rate: optax.ScalarOrSchedule,
    clip_fraction: float | jax.Array,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    weight_decay: float | jax.Array = 1e-4,
    *,
    mu_dtype: Any | None = None,
    mask: Any | None = None,
    method: str | None = None,
    bisect_steps: int | None = None,
) -> optax.GradientTransformation:
  r"""AdamW whose first moment sees the coordinate-wise clipped gradient (Pan & Li).

  .. math::
    w_{t+1} = w_t - \eta_t \left( u_t + \lambda w_t \right)

  with ``u_t`` the update of :func:`scale_by_clipped_adam` (first moment: EMA of
  the gradient with its top ``clip_fraction`` of magnitudes, ranked over the
  whole tree, clipped to the threshold; second moment: EMA of the raw squared
  gradient) and decoupled weight decay ``lambda`` as in ``optax.adamw``.
  ``clip_fraction = 0`` is ``optax.adamw``. This is the paper's clipped Adam;
  ``optax.chain(clip_coordinatewise(k), optax.adamw(...))`` clips the second
  moment's input as well.

  Args:
    learning_rate: a float or an optax schedule.
    clip_fraction: fraction of coordinates clipped, in ``[0, 1)``.
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to the root of the second moment, ``>= 0``.
    eps_root: added inside the root, ``>= 0``.
    weight_decay: decoupled weight decay, ``>= 0``.
    mu_dtype: dtype of the first moment (None: the params').
    mask: which leaves get weight decay (as in ``optax.adamw``).
    method: how the clipping threshold is found (see
      :func:`optimizers.clip_coordinatewise`); None: its default.
    bisect_steps: bisection steps for ``method="bisect"``.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optimizers import clipped_adamw
    >>> params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
    >>> tx = clipped_adamw(0.1, clip_fraction=0.25, weight_decay=0.0)
    >>> g = {"w": jnp.array([10.0, 1.0, -1.0, 0.5])}
    >>> updates, _ = tx.update(g, tx.init(params), params)
    >>> [round(float(x), 4) for x in updates["w"]]
    [-0.01, -0.1, 0.1, -0.1]

  References:
    Pan & Li, `Toward Understanding Why Adam Converges Faster Than SGD for
    Transformers <https://arxiv.org/abs/2306.00204>`_, 2023.

    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  check_nonnegative("weight_decay", weight_decay)
  return optax.chain(
      scale_by_clipped_adam(clip_fraction, b1, b2, eps, eps_root, mu_dtype=mu_dtype,
                            method=method, bisect_steps=bisect_steps),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
